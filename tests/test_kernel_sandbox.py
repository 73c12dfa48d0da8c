"""The local server's kernel sandbox: a kernel runs as Kaggle reruns a code submission, with no network,
a time limit, and only its attached inputs; each way it can fail is one message."""
from __future__ import annotations

import socket
import textwrap
import time

import pytest

from pipeline.kaggle.local.sandbox import network_isolation, run_kernel

isolated = pytest.mark.skipif(not network_isolation(), reason="unprivileged user namespaces are off on this machine "
                                                               "(`unshare --user --net true` fails)")


def _script(tmp_path, body: str):
    path = tmp_path / "kernel.py"
    path.write_text(textwrap.dedent(body))
    return path


@isolated
def test_a_kernel_reads_its_inputs_writes_its_submission_and_reaches_no_network(tmp_path, monkeypatch):
    server = socket.create_server(("127.0.0.1", 0))  # listening here: a kernel with network reaches it
    port = server.getsockname()[1]
    (tmp_path / "competition").mkdir()
    (tmp_path / "competition" / "sample_submission.csv").write_text("id,label\n1,0.5\n")
    monkeypatch.setenv("KAGGLE_KEY", "the caller's secret")
    script = _script(tmp_path, f"""
        import os, socket
        from pathlib import Path
        root = Path(os.environ["KP_KAGGLE_ROOT"])
        sample = (root / "input" / "comp" / "sample_submission.csv").read_text()
        try:
            socket.create_connection(("127.0.0.1", {port}), timeout=5).close()
            print("network: reached")
        except OSError as exc:
            print("network:", exc)
        print("secret:", os.environ.get("KAGGLE_KEY"))
        (root / "working" / "submission.csv").write_text(sample)
        """)
    try:
        run = run_kernel(script, {"comp": tmp_path / "competition"}, tmp_path / "run", timeout_s=60)
        open_run = run_kernel(script, {"comp": tmp_path / "competition"}, tmp_path / "open", timeout_s=60, isolate=False)
    finally:
        server.close()
    assert run.status == "complete" and run.isolated and run.outputs == ["submission.csv"], run.log
    assert ("network: [Errno 101] Network is unreachable" in run.log  # unshare: no interface up
            or "network: [Errno 111] Connection refused" in run.log)  # bwrap: its own loopback, nothing listening
    assert "secret: None" in run.log
    assert (run.working / "submission.csv").read_text() == "id,label\n1,0.5\n"
    assert "network: reached" in open_run.log  # the same kernel with network: the check above can fail


def test_a_kernel_past_its_time_limit_is_stopped_and_one_without_a_submission_says_so(tmp_path):
    isolate = network_isolation()
    slow = _script(tmp_path, "import time\ntime.sleep(60)\n")
    clock = time.monotonic()
    run = run_kernel(slow, {}, tmp_path / "slow", timeout_s=1, isolate=isolate)
    assert run.status == "error" and run.failure == "the kernel exceeded its time limit of 1 s and was stopped"
    assert time.monotonic() - clock < 15
    nothing = run_kernel(_script(tmp_path, "print('done')\n"), {}, tmp_path / "nothing", timeout_s=60, isolate=isolate)
    assert nothing.status == "error" and "wrote no submission.csv" in nothing.failure and "done" in nothing.log
    failing = run_kernel(_script(tmp_path, "raise SystemExit('no model here')\n"), {}, tmp_path / "failing",
                         timeout_s=60, isolate=isolate)
    assert failing.failure == "the kernel exited with status 1" and "no model here" in failing.log


def test_past_the_time_limit_every_process_the_kernel_started_ends_with_it(tmp_path):
    from pipeline.kaggle.local.sandbox import confinement

    if confinement():
        pytest.skip(confinement())
    script = _script(tmp_path, """
        import subprocess, sys, time
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3); open('late.txt', 'w').write('x')"],
                         start_new_session=True)
        time.sleep(60)
        """)
    run = run_kernel(script, {}, tmp_path / "run", timeout_s=1)
    assert run.confined and "time limit of 1 s" in run.failure
    time.sleep(3.5)
    assert not (run.working / "late.txt").exists()


def test_the_log_and_the_working_folder_are_capped(tmp_path):
    isolate = network_isolation()
    loud = _script(tmp_path, """
        import sys
        for _ in range(200):
            sys.stdout.write("x" * 10_000 + "\\n")
        open("submission.csv", "w").write("id,label\\n")
        """)
    run = run_kernel(loud, {}, tmp_path / "loud", timeout_s=60, isolate=isolate, max_log_bytes=50_000)
    assert run.status == "complete", run.failure
    log = (tmp_path / "loud" / "kernel.log").read_bytes()
    assert 50_000 <= len(log) < 50_200 and log.rstrip().endswith(b"the log was cut at 50,000 bytes; the kernel went on]")

    big_file = _script(tmp_path, "open('submission.csv', 'wb').write(bytes(3_000_000))\n")
    run = run_kernel(big_file, {}, tmp_path / "big", timeout_s=60, isolate=isolate, max_output_bytes=1_000_000)
    assert run.failure == "the kernel exited with status 1" and "File too large" in run.log
    many = _script(tmp_path, """
        import time
        for n in range(3):
            open(f"part-{n}.bin", "wb").write(bytes(600_000))
        time.sleep(30)
        """)
    run = run_kernel(many, {}, tmp_path / "many", timeout_s=60, isolate=isolate, max_output_bytes=1_000_000)
    assert run.failure == "the kernel's working folder grew past 1,000,000 bytes and it was stopped"
    assert run.seconds < 15

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
    assert "network: [Errno 101] Network is unreachable" in run.log and "secret: None" in run.log
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

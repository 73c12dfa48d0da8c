"""Submitting through the real kaggle client to the local Kaggle-compatible server: scoring, the ledger, errors."""
from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from pipeline.cli.commands import cli
from pipeline.engine import runner
from pipeline.engine.config import load_config
from pipeline.evaluation.scoring import competition_from_files, score_file_on_test_set
from pipeline.kaggle import submissions
from pipeline.kaggle.ledger import read_ledger
from pipeline.kaggle.local.competitions import LocalCompetitions
from pipeline.kaggle.local.server import KaggleLocalServer
from tests.helpers import REPO, png_size, serve_competition, serve_digits

# digits, quick: one epoch of a small CNN, the finetune model submitted (no ensemble)
QUICK = ["finetune.phases=[{epochs: 1, lr: 0.003}]", "model.arch=cnn", "finetune.augment=null",
         "stages=[download, split, precompute, finetune, submit]", "submit.source=finetune"]
CLI_SETS = [arg for s in QUICK for arg in ("--set", s)]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A project root where the quick digits pipeline has run once (copied by each test that uses it)."""
    root = tmp_path_factory.mktemp("digits") / "project"
    shutil.copytree(REPO / "configs", root / "configs")
    runner.run(load_config("digits", root=root, sets=QUICK))
    return root


@pytest.fixture
def digits_project(digits_run, tmp_path, monkeypatch):
    root = tmp_path / "project"
    shutil.copytree(digits_run, root)
    monkeypatch.setenv("KP_ROOT", str(root))
    return root


def start_server(kaggle_env, folder, **options) -> KaggleLocalServer:
    server = KaggleLocalServer(folder, log_dir=folder.parent / "server-log", **options).start()
    for name, value in server.client_environment().items():
        kaggle_env.setenv(name, value)
    return server


def upload_through(kaggle_env, folder, **options):
    """`kp submit --upload` against a local server over `folder`, stopped afterwards; the click Result."""
    server = start_server(kaggle_env, folder, **options)
    try:
        return kp("submit", "--upload")
    finally:
        server.stop()


@pytest.fixture
def digits_server(kaggle_env, tmp_path):
    server = start_server(kaggle_env, serve_digits(tmp_path / "served"), scoring_delay_s=0.2)
    yield server
    server.stop()


def kp(*args):
    """Run `kp ARGS --comp digits` (quick settings) in-process; the click Result."""
    return CliRunner().invoke(cli, [*args, "--comp", "digits", *CLI_SETS])


def test_how_a_competition_scores_is_read_from_sample_and_solution():
    solution = pd.DataFrame({"id": ["1", "2"], "label": ["1", "0"]})
    binary = competition_from_files(pd.DataFrame({"id": ["1", "2"], "label": ["0.5", "0.5"]}), solution)
    accuracy = competition_from_files(pd.DataFrame({"ImageId": ["1", "2"], "Label": ["0", "0"]}), solution)
    multi = competition_from_files(pd.DataFrame({"img": ["a"], "c0": ["0.1"], "c1": ["0.9"]}), solution)
    assert (binary.metric, binary.task) == ("log_loss", "binary")
    assert (accuracy.metric, accuracy.id_column) == ("accuracy", "ImageId")
    assert (multi.metric, multi.task, multi.classes) == ("log_loss", "multiclass", ["c0", "c1"])


def test_server_scores_like_kaggle_and_rejects_malformed_files(kaggle_env, tmp_path):
    sample = "img,c0,c1,c2\na.jpg,0.3,0.3,0.4\nb.jpg,0.3,0.3,0.4\nc.jpg,0.3,0.3,0.4\n"
    folder = serve_competition(tmp_path / "served", "three-classes", {"sample_submission.csv": sample.encode()},
                               "img,classname\na.jpg,c0\nb.jpg,c2\nc.jpg,c1\n")
    files = {
        # rows in another order, not summing to 1, one certain miss (0): Kaggle clips to 1e-15 and renormalises
        "good.csv": "img,c0,c1,c2\nc.jpg,0.2,0.2,0.4\na.jpg,0.5,0.5,0\nb.jpg,0,1,0\n",
        "wrong-header.csv": "image,c0,c1,c2\na.jpg,1,0,0\nb.jpg,0,0,1\nc.jpg,0,1,0\n",
        "missing-id.csv": "img,c0,c1,c2\na.jpg,1,0,0\nb.jpg,0,0,1\n",
        "duplicate-id.csv": "img,c0,c1,c2\na.jpg,1,0,0\na.jpg,1,0,0\nb.jpg,0,0,1\nc.jpg,0,1,0\n",
        "nan.csv": "img,c0,c1,c2\na.jpg,1,0,0\nb.jpg,NaN,0,1\nc.jpg,0,1,0\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "good.csv.gz").write_bytes(gzip.compress(files["good.csv"].encode()))
    eps = 1e-15
    expected = -np.mean([np.log(0.5 / 1.0), np.log(eps / (1 + 2 * eps)), np.log(0.2 / 0.8)])
    reasons = {"wrong-header.csv": "wrong header: expected img,c0,c1,c2, got image,c0,c1,c2",
               "missing-id.csv": "1 missing (e.g. ['c.jpg'])", "duplicate-id.csv": "duplicate ids, e.g. 'a.jpg'",
               "nan.csv": "1 rows have missing or non-numeric values"}

    with KaggleLocalServer(folder, log_dir=tmp_path / "log", scoring_delay_s=0.1) as server:
        for name, value in server.client_environment().items():
            kaggle_env.setenv(name, value)
        refs = {name: submissions.submit_file("three-classes", tmp_path / name, f"trying {name}")
                for name in ["good.csv", "good.csv.gz", *reasons]}
        states = {name: submissions.wait_for_score("three-classes", ref, 10, 0.1, say=lambda _: None)
                  for name, ref in refs.items()}
        listed = server.competitions.submissions("three-classes")

    for name in ["good.csv", "good.csv.gz"]:
        assert states[name].status == "complete"
        assert states[name].public_score == pytest.approx(expected, abs=1e-5)
    for name, reason in reasons.items():
        assert states[name].status == "error" and reason in states[name].error, states[name]
    assert [s.ref for s in listed] == sorted(refs.values(), reverse=True)  # newest first, as Kaggle lists
    log = [json.loads(line) for line in (tmp_path / "log" / "three-classes" / "submissions.jsonl").read_text().splitlines()]
    assert sorted(entry["file_name"] for entry in log) == sorted(refs)
    assert (tmp_path / "log" / "three-classes" / "files" / f"{refs['good.csv.gz']}-good.csv.gz").is_file()


def test_upload_puts_the_leaderboard_score_beside_validation(digits_project, digits_server):
    result = kp("submit", "--upload", "-m", "first try")
    assert result.exit_code == 0, result.output
    config = load_config("digits", sets=QUICK)
    [row] = read_ledger(config.submissions_dir / "ledger.csv")
    submit = json.loads((config.work_dir / "submit" / "manifest.json").read_text())["metrics"]
    lb_accuracy, _ = score_file_on_test_set(config, config.submissions_dir / (row["file"].split("/")[-1]))
    assert row["status"] == "complete" and row["split_strategy"] == "random" and row["metric"] == "accuracy"
    assert float(row["lb_score"]) == pytest.approx(lb_accuracy, abs=1e-5) and lb_accuracy > 0.5
    assert float(row["val_score"]) == pytest.approx(submit[submit["score_name"]], abs=1e-5)
    assert float(row["difference"]) == pytest.approx(float(row["lb_score"]) - float(row["val_score"]), abs=1e-5)
    [listed] = digits_server.competitions.submissions("digit-recognizer")
    assert listed.description.startswith("first try [kp digits finetune split=random")
    assert f"fp={submit['fingerprint'][:12]}" in listed.description
    assert png_size(config.submissions_dir / "ledger.png") == (495, 450)  # one panel, 5.5 x 5 inches

    again = kp("submit", "--upload")  # the same file: no second upload
    assert again.exit_code == 0 and "already uploaded" in again.output
    assert len(digits_server.competitions.submissions("digit-recognizer")) == 1
    status = CliRunner().invoke(cli, ["status", "--comp", "digits", *CLI_SETS])
    assert "ledger" in status.output and f"{float(row['lb_score']):.5f}" in status.output
    shown = CliRunner().invoke(cli, ["ledger", "--comp", "digits", *CLI_SETS])
    assert shown.exit_code == 0 and "complete" in shown.output and "ledger.png" in shown.output
    runs = json.loads(CliRunner().invoke(cli, ["runs", "--comp", "digits", *CLI_SETS, "--json"]).stdout)
    [uploaded] = [run for run in runs if run["lb_score"] is not None]  # the finetune run the submission came from
    assert uploaded["stage"] == "finetune" and uploaded["lb_score"] == pytest.approx(float(row["lb_score"]))
    assert uploaded["fingerprint"] == json.loads((config.work_dir / "finetune" / "manifest.json").read_text())["fingerprint"]


def test_a_score_not_ready_in_time_is_read_later(digits_project, kaggle_env, tmp_path):
    server = start_server(kaggle_env, serve_digits(tmp_path / "served"), scoring_delay_s=1.0)
    try:
        result = kp("submit", "--upload", "--set", "kaggle.poll_timeout_s=0")
        assert result.exit_code == 0, result.output
        assert "not scored after 0s" in result.output
        config = load_config("digits", sets=QUICK)
        assert [r["status"] for r in read_ledger(config.submissions_dir / "ledger.csv")] == ["pending"]
        server.competitions.wait_for_scoring()
        refreshed = kp("ledger", "--refresh")
        assert refreshed.exit_code == 0, refreshed.output
        [row] = read_ledger(config.submissions_dir / "ledger.csv")
        assert row["status"] == "complete" and float(row["lb_score"]) > 0.5
    finally:
        server.stop()


def test_a_rejected_submission_shows_the_reason_and_keeps_the_file(digits_project, kaggle_env, tmp_path):
    # the server's test set lost a row since the data was downloaded: Kaggle rejects the file
    result = upload_through(kaggle_env, serve_digits(tmp_path / "served", drop_solution_rows=1), scoring_delay_s=0.1)
    assert result.exit_code == 2
    assert "Kaggle rejected submission 1" in result.output
    assert "ids do not match the test set: 1 unexpected (e.g. ['300'])" in result.output
    config = load_config("digits", sets=QUICK)
    [row] = read_ledger(config.submissions_dir / "ledger.csv")
    assert row["status"] == "error" and "1 unexpected" in row["error"] and not row["lb_score"]
    assert (config.submissions_dir / row["file"].split("/")[-1]).is_file()


def test_upload_errors_name_the_cause_and_keep_the_file(digits_project, kaggle_env, tmp_path):
    config = load_config("digits", sets=QUICK)
    written = sorted(config.submissions_dir.glob("*.csv"))
    kaggle_env.delenv("KAGGLE_USERNAME")
    result = kp("submit", "--upload")
    assert result.exit_code == 2 and "Kaggle credentials not found" in result.output
    assert str(tmp_path / "kaggle-config" / "kaggle.json") in result.output
    kaggle_env.setenv("KAGGLE_USERNAME", "pipeline-test")

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    kaggle_env.setenv("KAGGLE_API_ENVIRONMENT", "LOCALHOST")
    kaggle_env.setenv("KAGGLE_LOCAL_ENDPOINT", f"http://127.0.0.1:{port}")
    result = kp("submit", "--upload")  # asked before anything runs or is uploaded
    assert result.exit_code == 2 and "cannot reach the Kaggle server" in result.output
    assert "cannot take a submission from this account" in result.output and "nothing was run" in result.output

    result = upload_through(kaggle_env, serve_digits(tmp_path / "served"), rules_not_accepted={"digit-recognizer"})
    assert result.exit_code == 2
    assert "403 forbidden: accept the rules at https://www.kaggle.com/competitions/digit-recognizer/rules" in result.output
    assert sorted(config.submissions_dir.glob("*.csv")) == written and written
    assert read_ledger(config.submissions_dir / "ledger.csv") == []


def test_upload_needs_a_submit_stage(digits_project, digits_server):
    result = CliRunner().invoke(cli, ["all", "--upload", "--comp", "digits", "--set", "stages=[download, split]"])
    assert result.exit_code == 2 and "has no submit stage" in result.output


def test_the_kaggle_command_line_reaches_the_server_through_http_proxy(kaggle_env, tmp_path):
    """What README promises for the `kaggle` CLI: KAGGLE_API_ENVIRONMENT=LOCALHOST + HTTP_PROXY=<server>."""
    folder = serve_digits(tmp_path / "served")
    submission = tmp_path / "all-ones.csv"
    submission.write_text("ImageId,Label\n" + "".join(f"{i},1\n" for i in range(1, 301)))
    with KaggleLocalServer(folder, log_dir=tmp_path / "log", scoring_delay_s=0.1) as server:
        env = {**os.environ, "KAGGLE_API_ENVIRONMENT": "LOCALHOST", "HTTP_PROXY": server.url, "NO_PROXY": ""}
        kaggle = [str(Path(sys.executable).with_name("kaggle")), "competitions"]
        files = subprocess.run([*kaggle, "files", "digit-recognizer"], env=env, capture_output=True, text=True)
        submit = subprocess.run([*kaggle, "submit", "digit-recognizer", "-f", str(submission), "-m", "ones"],
                                env=env, capture_output=True, text=True)
        server.competitions.wait_for_scoring()
        listed = subprocess.run([*kaggle, "submissions", "digit-recognizer", "--csv"], env=env,
                                capture_output=True, text=True)
    assert "digit-recognizer.zip" in files.stdout, files.stdout + files.stderr
    assert "Successfully submitted to digit-recognizer" in submit.stdout, submit.stdout + submit.stderr
    solution = pd.read_csv(folder / "digit-recognizer" / "solution.csv")
    row = listed.stdout.strip().splitlines()[-1]
    assert "all-ones.csv" in row and "COMPLETE" in row and f"{(solution.Label == 1).mean():.5f}" in row, listed.stdout


def test_zipped_submissions_are_scored_and_a_restarted_server_keeps_its_log(tmp_path):
    folder = serve_competition(tmp_path / "served", "binary", {"sample_submission.csv": b"id,label\n1,0.5\n2,0.5\n"},
                               "id,label\n1,1\n2,0\n")
    archive = tmp_path / "sub.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("sub.csv", "id,label\n2,0.2\n1,0.6\n")
    competitions = LocalCompetitions(folder, tmp_path / "log", scoring_delay_s=0)
    token = competitions.start_upload("binary", archive.name, archive.stat().st_size)
    competitions.uploads.receive(token, io.BytesIO(archive.read_bytes()).read, archive.stat().st_size)
    first = competitions.create_submission("binary", token, "zipped")
    competitions.wait_for_scoring()
    assert first.status == "COMPLETE"
    assert float(first.public_score) == pytest.approx(-np.mean([np.log(0.6), np.log(0.8)]), abs=1e-5)
    restarted = LocalCompetitions(folder, tmp_path / "log")
    assert [(s.ref, s.status) for s in restarted.submissions("binary")] == [(first.ref, "COMPLETE")]
    again = restarted.start_upload("binary", archive.name, archive.stat().st_size)
    restarted.uploads.receive(again, io.BytesIO(archive.read_bytes()).read, archive.stat().st_size)
    assert restarted.create_submission("binary", again, "again").ref == first.ref + 1
    restarted.wait_for_scoring()


def test_the_server_answers_every_hostile_request_and_keeps_no_half_dataset(tmp_path):
    """A name with NUL or 5,000 characters, a content length of 10^15, a body that stops short, a dataset
    zip with `../` members: each gets an error reply with its reason (never a hung client), and no dataset
    version is left behind."""
    import http.client
    import zipfile

    server = KaggleLocalServer(serve_digits(tmp_path / "served"), log_dir=tmp_path / "server-log").start()
    host, port = server.httpd.server_address[:2]

    def call(method, path, body: bytes, headers=None) -> tuple[int, dict]:
        connection = http.client.HTTPConnection(host, port, timeout=10)
        connection.request(method, path, body, {"Authorization": "Basic eDp4", **(headers or {})})
        answer = connection.getresponse()
        return answer.status, json.loads(answer.read() or b"{}")

    def start(name, length) -> tuple[int, dict]:
        return call("POST", "/api/v1/blobs.BlobApiService/StartBlobUpload",
                    json.dumps({"name": name, "contentLength": length}).encode())

    try:
        status, answer = start("a\x00b.zip", 10)
        assert status == 400 and answer["message"] == ("invalid file name 'a\\x00b.zip': it holds a control character "
                                                       "(NUL, newline...)")
        status, answer = start("n" * 5000, 10)
        assert status == 400 and "(5,000 characters): longer than 255 bytes" in answer["message"]
        status, answer = start("ok.zip", 10**15)
        assert status == 400 and "contentLength 1,000,000,000,000,000 is above this server's limit" in answer["message"]
        status, answer = call("POST", "/api/v1/blobs.BlobApiService/StartBlobUpload", b"{}",
                              {"Content-Length": str(10**15)})
        assert status == 400 and "at most 16,777,216" in answer["message"]

        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            archive.writestr("../../escaped.txt", "out")
        data = buffer.getvalue()
        token = start("models.zip", len(data))[1]["token"]
        with socket.create_connection((host, port), timeout=10) as cut:  # a body cut short: the client goes away
            cut.sendall(f"PUT /upload/{token} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n\r\n".encode()
                        + data[:10])
            cut.shutdown(socket.SHUT_WR)
            reply = cut.makefile("rb").read().decode()
        assert reply.startswith("HTTP/1.0 400") and "the upload ended after 10 of" in reply
        token = start("models.zip", len(data))[1]["token"]
        assert call("PUT", f"/upload/{token}", data)[0] == 200
        status, answer = call("POST", "/api/v1/datasets.DatasetApiService/CreateDataset", json.dumps(
            {"ownerSlug": "me", "slug": "models", "files": [{"token": token}]}).encode())
        assert answer["status"] == "error" and "no version written" in answer["error"] and "'..'" in answer["error"]
        assert server.kernels.dataset_versions("me", "models") == []
        assert not list(tmp_path.rglob("escaped.txt"))
    finally:
        server.stop()


def test_a_submission_with_other_rows_than_the_sample_is_not_uploaded(digits_project, digits_server):
    config = load_config("digits", sets=QUICK)
    submission = next(config.submissions_dir.glob("*.csv"))
    lines = submission.read_text().splitlines()
    submission.write_text("\n".join(lines[:-5]) + "\n")  # five rows lost after kp wrote it
    result = kp("submit", "--upload")
    assert result.exit_code == 2 and f"{submission}: {len(lines) - 6:,} rows, while sample_submission.csv asks " \
                                     f"for {len(lines) - 1:,}; not uploaded" in result.output
    assert digits_server.competitions.submissions("digit-recognizer") == []  # no submission spent on it


def test_tensorflow_lines_at_exit_are_among_the_ones_kp_drops():
    from pipeline.cli.terminal import NATIVE_NOISE

    line = (b"W0000 00:00:1796584455.820584   31608 local_rendezvous.cc:405] Error occurred when finalizing "
            b"GeneratorDataset iterator: FAILED_PRECONDITION: Python interpreter state is not initialized.\n")
    assert NATIVE_NOISE.sub(b"", line + b"kp's own line\n") == b"kp's own line\n"

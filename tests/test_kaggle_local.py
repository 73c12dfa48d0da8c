"""Download and submit through the real kaggle client, against the local Kaggle-compatible server."""
from __future__ import annotations

import socket

import pytest

from pipeline.core.cache import Manifest
from pipeline.core.errors import PipelineError
from pipeline.engine import runner
from pipeline.engine.config import load_config
from pipeline.evaluation.scoring import score_file_on_test_set
from pipeline.kaggle import leaderboard
from pipeline.kaggle.ledger import read_ledger
from tests.helpers import COMPETITIONS, needs_shared_data

pytestmark = [needs_shared_data, pytest.mark.realdata]


@pytest.mark.parametrize("comp, n_train, n_test", [("dogscats", 1400, 200), ("mnist", 7000, 1000),
                                                   ("statefarm", 14349, 2860)])
def test_download_through_the_kaggle_client(project, kaggle_server, comp, n_train, n_test):
    config = load_config(comp)
    assert config.get("download.source") == "kaggle"
    runner.run(config, ["download"])
    metrics = Manifest.read(config.work_dir / "download").metrics
    assert (metrics["n_train"], metrics["n_test"]) == (n_train, n_test)
    slug = config.competition.slug
    assert "POST /api/v1/competitions.CompetitionApiService/DownloadDataFiles" in kaggle_server.requests
    assert f"GET /files/{slug}/{slug}.zip" in kaggle_server.requests
    assert (config.work_dir / "_cache" / "kaggle" / f"{slug}.zip").stat().st_size == \
        (COMPETITIONS / slug / f"{slug}.zip").stat().st_size


def test_rules_not_accepted_and_unknown_competition(project, kaggle_server):
    hires = ["competition.slug=state-farm-distracted-driver-detection-hires"]
    with pytest.raises(PipelineError, match="403 forbidden: accept the rules at https://www.kaggle.com/"
                                            "competitions/state-farm-distracted-driver-detection-hires/rules"):
        runner.run(load_config("statefarm", sets=hires), ["download"])
    with pytest.raises(PipelineError, match="404: no competition 'no-such-competition'"):
        runner.run(load_config("statefarm", sets=["competition.slug=no-such-competition"]), ["download"])
    assert not (project / "work" / "statefarm" / "download").exists()


def test_server_not_running(project, kaggle_env):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    kaggle_env.setenv("KAGGLE_API_ENVIRONMENT", "LOCALHOST")
    kaggle_env.setenv("KAGGLE_LOCAL_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(PipelineError, match="cannot reach the Kaggle server"):
        runner.run(load_config("dogscats"), ["download"])


def test_digit_recognizer_download_submit_and_score_through_the_client(project, kaggle_server):
    quick = ["finetune.phases=[{epochs: 1, lr: 0.003}]", "finetune.augment=null", "model.arch=cnn",
             "stages=[download, split, precompute, finetune, submit]", "submit.source=finetune"]
    config = load_config("mnist", extra_files=[project / "configs" / "offline" / "mnist-kaggle.yaml"], sets=quick)
    assert config.get("download.source") == "kaggle"
    runner.run(config)
    row = leaderboard.upload(config, "mnist through the client", say=lambda _: None)
    slug = config.competition.slug
    lb_accuracy, _ = score_file_on_test_set(config, row["file"], COMPETITIONS / slug / "solution.csv")
    assert row["status"] == "complete" and float(row["lb_score"]) == pytest.approx(lb_accuracy, abs=1e-5)
    assert lb_accuracy > 0.9  # one epoch of a small CNN on 5,600 digits
    assert [r["ref"] for r in read_ledger(config.submissions_dir / "ledger.csv")] == [str(row["ref"])]

"""The download stage through the real kaggle client, against the local Kaggle-compatible server."""
from __future__ import annotations

import socket

import pytest

from pipeline import runner
from pipeline.cache import Manifest
from pipeline.config import load_config
from pipeline.errors import PipelineError
from pipeline.kaggle_local import KaggleLocalServer
from tests.conftest import COMPETITIONS, needs_shared_data

pytestmark = [needs_shared_data, pytest.mark.realdata]


@pytest.fixture
def kaggle_env(monkeypatch, tmp_path):
    """Test credentials in a throwaway config folder; nothing from the real ~/.kaggle."""
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "kaggle-config"))
    monkeypatch.setenv("KAGGLE_USERNAME", "pipeline-test")
    monkeypatch.setenv("KAGGLE_KEY", "not-a-real-key")
    monkeypatch.delenv("KAGGLE_API_TOKEN", raising=False)
    return monkeypatch


@pytest.fixture
def server(kaggle_env):
    with KaggleLocalServer(COMPETITIONS, rules_not_accepted={"state-farm-distracted-driver-detection-hires"}) as s:
        for name, value in s.client_environment().items():
            kaggle_env.setenv(name, value)
        yield s


@pytest.mark.parametrize("comp, n_train, n_test", [("dogscats", 1400, 200), ("mnist", 7000, 1000),
                                                   ("statefarm", 14349, 2860)])
def test_download_through_the_kaggle_client(project, server, comp, n_train, n_test):
    config = load_config(comp)
    assert config.get("data.source") == "kaggle"
    runner.run(config, ["download"])
    metrics = Manifest.read(config.work_dir / "download").metrics
    assert (metrics["n_train"], metrics["n_test"]) == (n_train, n_test)
    slug = config.competition.slug
    assert "POST /api/v1/competitions.CompetitionApiService/DownloadDataFiles" in server.requests
    assert f"GET /files/{slug}/{slug}.zip" in server.requests
    assert (config.work_dir / "_cache" / "kaggle" / f"{slug}.zip").stat().st_size == \
        (COMPETITIONS / slug / f"{slug}.zip").stat().st_size


def test_rules_not_accepted_and_unknown_competition(project, server):
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

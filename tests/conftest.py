"""Shared test fixtures: a throwaway project root, Kaggle test credentials, the local Kaggle server.

Helpers that tests import by name are in tests/helpers.py.
"""
from __future__ import annotations

import shutil

import pytest

from tests.helpers import COMPETITIONS, REPO


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project root in tmp_path with a copy of the repo's configs; kp reads and writes only there."""
    root = tmp_path / "project"
    shutil.copytree(REPO / "configs", root / "configs")
    monkeypatch.setenv("KP_ROOT", str(root))
    return root


@pytest.fixture
def kaggle_env(monkeypatch, tmp_path):
    """Test credentials in a throwaway config folder; nothing from the real ~/.kaggle."""
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "kaggle-config"))
    monkeypatch.setenv("KAGGLE_USERNAME", "pipeline-test")
    monkeypatch.setenv("KAGGLE_KEY", "not-a-real-key")
    monkeypatch.delenv("KAGGLE_API_TOKEN", raising=False)
    return monkeypatch


@pytest.fixture
def kaggle_server(kaggle_env, tmp_path):
    """The local Kaggle-compatible server over ../shared/data's competitions, the client pointed at it.
    The hires State Farm competition answers 403 (rules not accepted)."""
    from pipeline.kaggle.local.server import KaggleLocalServer

    with KaggleLocalServer(COMPETITIONS, rules_not_accepted={"state-farm-distracted-driver-detection-hires"},
                           log_dir=tmp_path / "server-log", scoring_delay_s=0.2) as server:
        for name, value in server.client_environment().items():
            kaggle_env.setenv(name, value)
        yield server

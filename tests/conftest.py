"""Shared test fixtures: a throwaway project root, Kaggle test credentials, the local Kaggle server.

Helpers that tests import by name are in tests/helpers.py.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.helpers import COMPETITIONS, REPO

# The files that take longest (a minute or more of `make test` each, 2026-12-04), run first: `make test`
# hands whole files to its two workers in collection order (`--dist loadfile --no-loadscope-reorder`),
# and a long file handed out last would leave one worker idle while the other finishes it. Ordered by
# their measured totals (2026-12-06), so that the two workers finish together.
LONGEST_FIRST = ("test_tune.py", "test_sweep.py", "test_faults.py", "test_scratch.py", "test_transfer.py",
                 "test_blend.py", "test_augment.py", "test_package.py", "test_compute.py", "test_kaggle_local.py",
                 "test_backbones.py", "test_cli.py", "test_bench.py", "test_leaderboard.py", "test_make.py",
                 "test_report.py", "test_code_competition.py", "test_device.py", "test_pseudo.py", "test_lr_find.py",
                 "test_cache.py", "test_cv.py")


def pytest_collection_modifyitems(items):
    """Put the tests of the `LONGEST_FIRST` files first, in that order; the rest keep theirs."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project root in tmp_path with a copy of the repo's configs; kp reads and writes only there."""
    root = tmp_path / "project"
    shutil.copytree(REPO / "configs", root / "configs")
    monkeypatch.setenv("KP_ROOT", str(root))
    return root


@pytest.fixture(scope="session")
def _warm_roots():
    """Project roots already built this session, by name."""
    return {}


@pytest.fixture
def warm_project(_warm_roots, tmp_path_factory, tmp_path, monkeypatch):
    """`warm_project(name, build, base=None)`: this test's own copy of a project root in which
    `build(root)` ran once for the whole session (a synthetic competition run through its stages):
    tests share the warm run's work instead of repeating it, and none sees another's changes.

    `build` writes its inputs beside the root (`root.parent`), which the copies keep pointing at.
    `base`: (name, build) of a warm root to start from (its work is reused, not repeated).
    """
    def warm(name: str, build, base=None) -> Path:
        if name not in _warm_roots:
            root = tmp_path_factory.mktemp(f"warm-{name}") / "project"
            if base is None:
                shutil.copytree(REPO / "configs", root / "configs")
            else:
                warm(*base)
                shutil.copytree(_warm_roots[base[0]].parent, root.parent, symlinks=True, dirs_exist_ok=True)
            with pytest.MonkeyPatch.context() as patch:
                patch.setenv("KP_ROOT", str(root))
                build(root)
            _warm_roots[name] = root
        return _warm_roots[name]

    def copy(name: str, build, base=None) -> Path:
        source = warm(name, build, base)
        root = tmp_path / "project"
        shutil.copytree(source, root, symlinks=True)
        monkeypatch.setenv("KP_ROOT", str(root))
        return root

    return copy


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

"""Units computed as Ray tasks (`compute.backend: ray`) on a local Ray cluster: the same results as the
local backend, and a worker killed mid-unit costs only that unit. Skipped where Ray is not installed."""
from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

from pipeline.core.artifacts import TEMPORARY_MARK, TMP_PREFIX
from pipeline.core.cache import Manifest
from pipeline.core.errors import PipelineError
from pipeline.engine import runner
from pipeline.engine.config import load_config
from pipeline.evaluation.predictions import load_predictions
from tests.helpers import make_statefarm_like, statefarm_like_config

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]'; make test installs it)")
pytestmark = pytest.mark.ray

TINY_ENSEMBLE = [
    "competition.image_size=[32, 32]", "stages=[download, split, precompute, ensemble, submit]",
    "precompute.backbone=vgg16", "precompute.weights=none", "precompute.batch_size=8",
    "model.arch=pool", "model.hidden=[16]", "model.dropout=[0.5]",
    "finetune.phases=[{epochs: 3, lr: 0.001}]", "finetune.batch_size=8", "ensemble.n=3", "submit.source=ensemble",
]
RAY = ["compute.backend=ray", "compute.local_cpus=2"]


@pytest.fixture(scope="module", autouse=True)
def one_cluster():
    """One local Ray cluster for the module (starting one costs seconds), shut down after it."""
    yield
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture
def synth(project, tmp_path):
    archive = make_statefarm_like(tmp_path / "data", drivers=4, classes=3, per_driver_class=4, test=6)
    statefarm_like_config(project, archive)
    return project


# 23 s (2026-12-04). The fast tier checks Ray tasks against the local backend on precompute's shards and on a
# sweep's trials; this one, on ensemble members, runs with the slow tier.
@pytest.mark.slow
def test_ensemble_members_as_ray_tasks_equal_the_local_backend(synth):
    local = load_config("synth", sets=TINY_ENSEMBLE)
    runner.run(local)
    remote = load_config("synth", sets=[*TINY_ENSEMBLE, *RAY, f"paths.work={synth / 'work-ray'}"])
    runner.run(remote)
    a, b = (Manifest.read(config.work_dir / "ensemble") for config in (local, remote))
    assert a.fingerprint == b.fingerprint  # where units run is in no fingerprint
    assert b.metrics["trained"] == 3 and [m["key"] for m in a.metrics["members"]] == [m["key"] for m in b.metrics["members"]]
    p, q = (load_predictions(config.work_dir / "ensemble") for config in (local, remote))
    np.testing.assert_array_equal(p.valid_probs, q.valid_probs)  # deterministic ops: bit for bit
    np.testing.assert_array_equal(p.test_probs, q.test_probs)


@pytest.mark.slow  # 30 s: it starts the local Ray cluster and kills a worker; the default tier keeps Ray's equality tests
def test_a_worker_killed_mid_unit_fails_that_unit_only_and_the_rerun_computes_just_it(synth):
    sets = [*TINY_ENSEMBLE, *RAY, "finetune.phases=[{epochs: 40, lr: 0.001}]"]
    config = load_config("synth", sets=[*sets, "compute.retries=0"])
    runner.run(config, ["precompute", "split"])
    store = config.work_dir / "_runs" / "ensemble-members"
    killed: list[str] = []

    def kill_first_worker():
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not killed:
            for tmp in store.glob(f"{TMP_PREFIX}*"):
                key, pid = tmp.name[len(TMP_PREFIX):].split(TEMPORARY_MARK)[0].rsplit("-", 1)  # .tmp-KEY-PID.kp-X
                os.kill(int(pid), signal.SIGKILL)  # the Ray worker writing this unit
                killed.append(key)
                return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_first_worker)
    killer.start()
    with pytest.raises(PipelineError, match=r"1 of 3 units failed on Ray .*member \d/3 \(seed 100\d\)"):
        runner.run(config, ["ensemble"])
    killer.join()
    assert len(killed) == 1
    stored = {path.name for path in store.iterdir() if not path.name.startswith(TMP_PREFIX)}
    assert killed[0] not in stored and len(stored) == 2

    runner.run(load_config("synth", sets=sets), ["ensemble"])  # Ray's retries back on: it completes
    members = Manifest.read(config.work_dir / "ensemble").metrics["members"]
    assert [m["key"] for m in members if not m["reused"]] == killed


def test_precompute_in_shards_on_ray_writes_the_same_arrays_as_one_pass(synth):
    from pipeline.data.arrays import load_array

    sets = [*TINY_ENSEMBLE, "stages=[download, split, precompute]"]
    local = load_config("synth", sets=sets)
    runner.run(local)
    remote = load_config("synth", sets=[*sets, *RAY, "compute.shard_size=20", f"paths.work={synth / 'work-ray'}"])
    runner.run(remote)
    meta = Manifest.read(remote.work_dir / "precompute").metrics
    assert meta["timings"]["train"]["shards"] == 2 and meta["timings"]["test"]["shards"] == 1  # 48 rows, batches of 8: 24
    for subset in ("train", "test"):
        np.testing.assert_array_equal(load_array(local.work_dir / "precompute" / f"{subset}.npy"),
                                      load_array(remote.work_dir / "precompute" / f"{subset}.npy"))
    assert Manifest.read(local.work_dir / "precompute").fingerprint == Manifest.read(remote.work_dir / "precompute").fingerprint
    assert not any((remote.work_dir / "_runs" / "precompute-shards").glob("*/shard.npy"))  # stitched, then dropped


def test_a_worker_that_cannot_see_the_images_says_so(tmp_path):
    from pipeline.models.extractor import write_shard

    with pytest.raises(PipelineError, match=r"cannot see the images \(/nowhere/img_1.jpg\): the work folder must be "
                                            r"on a filesystem every Ray worker shares"):
        write_shard(None, {}, ["/nowhere/img_1.jpg"], "", tmp_path)


@pytest.mark.slow
def test_a_cluster_with_token_authentication_reached_without_its_token_is_one_clear_message(tmp_path, monkeypatch):
    import subprocess
    import sys
    from pathlib import Path

    from pipeline.core.executor import Compute, connect

    ray_cli = str(Path(sys.executable).with_name("ray"))
    head = {**os.environ, "HOME": str(tmp_path), "RAY_AUTH_MODE": "token"}
    subprocess.run([ray_cli, "get-auth-token", "--generate"], env=head, check=True, capture_output=True)
    subprocess.run([ray_cli, "start", "--head", "--port", "6391", "--num-cpus", "1", "--include-dashboard=false"],
                   env=head, check=True, capture_output=True, timeout=120)
    try:
        if ray.is_initialized():
            ray.shutdown()
        monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
        with pytest.raises(PipelineError, match="compute.address 127.0.0.1:6391: the Ray cluster refused the connection"
                                                ".* export RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH="):
            connect(Compute(backend="ray", address="127.0.0.1:6391"))
    finally:
        subprocess.run([ray_cli, "stop", "--force"], env=head, capture_output=True, timeout=120)


@pytest.mark.slow  # 35 s; Ray against local stays in the default tier for precompute's shards
def test_a_sweeps_trials_as_ray_tasks_score_as_on_the_local_backend(warm_project):
    import json

    from click.testing import CliRunner

    from pipeline.cli.commands import cli
    from tests.test_cv import CV, _cross_validated

    root = warm_project("cv", _cross_validated)
    work = root / "work" / "synth"
    local = Manifest.read(work / "cv")  # the warm run, on the local backend: the grid's first trial
    for store in ("cv", "cv-folds"):  # put the local results aside: every Ray trial must train
        (work / "_runs" / store).rename(work / "_runs" / f"{store}-local")
    remote = CliRunner().invoke(cli, ["sweep", "--comp", "synth", *(a for s in [*CV, *RAY] for a in ("--set", s)),
                                      "--grid", "cv.seed=0,1", "--name", "ray"])
    assert remote.exit_code == 0, remote.output
    assert "sent to Ray (2 of 2 slots busy)" in remote.output  # both trials at once
    first, second = [json.loads(line) for line in (work / "sweeps" / "ray" / "trials.jsonl").read_text().splitlines()]
    assert first["ran"] == second["ran"] == ["cv"] and first["val_log_loss"] != second["val_log_loss"]
    assert first["fingerprint"] == local.fingerprint and first["val_log_loss"] == local.metrics["val_log_loss"]
    assert first["fold_scores"] == {str(r["fold"]): r["val_log_loss"] for r in local.metrics["fold_runs"]}
    p = load_predictions(work / "_runs" / "cv-local" / local.fingerprint)
    q = load_predictions(work / "_runs" / "cv" / first["fingerprint"])
    np.testing.assert_array_equal(p.valid_probs, q.valid_probs)  # bit for bit
    np.testing.assert_array_equal(p.test_probs, q.test_probs)

"""kp package and the kernel it writes: a source's models bundled with precompute's network, run again
offline on the competition's test images from the bundle alone (in a fresh venv installed from the
bundle's wheels, in the slow test), reproduce kp's own test probabilities. A cv bundle pushed and run
through the local Kaggle server: tests/test_code_competition.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.cli.commands import cli
from pipeline.engine.config import load_config
from pipeline.evaluation.predictions import load_predictions
from pipeline.engine import runner
from tests.helpers import SHARED_DATA, make_statefarm_like, needs_shared_data, statefarm_like_config
from tests.test_cv import CV, _cross_validated
from tests.test_transfer import TINY_VGG


def _options(sets):
    return [arg for assignment in sets for arg in ("--set", assignment)]


def _packaged(warm_project, sets, *extra):
    """`kp package` on a copy of the warm cv project with `sets`: (config, the bundle, its record, kp's output)."""
    warm_project("cv", _cross_validated)
    result = CliRunner().invoke(cli, ["package", "--comp", "synth", *_options(sets), *extra])
    assert result.exit_code == 0, result.output
    config = load_config("synth", sets=sets)
    bundle = config.work_dir / "package" / "bundle"
    return config, bundle, json.loads((bundle / "bundle.json").read_text()), result.output


def test_the_projects_wheel_holds_every_file_of_the_package(tmp_path):
    import zipfile

    from pipeline.shipping.packaging import project_wheel
    from tests.helpers import REPO

    names = set(zipfile.ZipFile(project_wheel(tmp_path)).namelist())
    files = [p for folder in ("pipeline", "stages") for p in (REPO / folder).rglob("*")
             if p.is_file() and "__pycache__" not in p.parts]
    assert [str(p.relative_to(REPO)) for p in files if str(p.relative_to(REPO)) not in names] == []


TTA_SMOOTHED = [s.replace("cv, submit", "augment, finetune, smooth, submit").replace("submit.source=cv", "submit.source=smooth")
                for s in CV] + ["augment.passes=2", "augment.test_passes=2", "finetune.tta=true", "finetune.augmented=false",
                                "smooth.source=finetune", "smooth.weight=0.5"]


def test_a_packaged_model_averages_the_same_test_passes_and_smooths_as_the_smooth_stage_did(warm_project, tmp_path):
    from pipeline.shipping.kernel import write_submission

    config, bundle, record, _ = _packaged(warm_project, TTA_SMOOTHED)
    plan = record["predict"]
    assert record["source"] == "smooth" and plan["of"]["tta"]["passes"] == 2 and len(record["models"]) == 1
    assert plan["neighbours"]["weight"] == 0.5 and record["fingerprints"]["finetune"]
    assert record["timing"]["max_abs_difference"] < 1e-5 and record["timing"]["rows_timed"] == 6
    write_submission(bundle, config.work_dir / "download" / "raw", tmp_path, say=lambda _: None)
    smoothed, model = (load_predictions(config.work_dir / stage).test_probs for stage in ("smooth", "finetune"))
    assert np.abs(smoothed - model).max() > 1e-3  # smoothing moved the rows of the mean over the clean rows and 2 passes
    np.testing.assert_allclose(np.load(tmp_path / "test_probs.npy"), smoothed, atol=1e-6, rtol=0)

    # the estimate at kernel.hidden_rows against kernel.time_limit_s, as today's settings give them, stops
    # `kp kernel push` before anything is uploaded (the bundle just written is reused, not packaged again)
    over = TTA_SMOOTHED + ["kernel.time_limit_s=30", "kernel.hidden_rows=1000000", "kernel.wheels=null"]
    result = CliRunner().invoke(cli, ["kernel", "push", "--comp", "synth", *_options(over)])
    assert result.exit_code == 2 and "the kernel would not finish within Kaggle's limit" in result.output
    assert "Estimate for 1,000,000 hidden test images" in result.output and "OVER the limit of 0m30s" in result.output
    assert json.loads((bundle / "bundle.json").read_text())["created"] == record["created"]


def test_a_stage_that_predicts_nothing_is_one_clear_message(warm_project):
    warm_project("cv", _cross_validated)
    split = CliRunner().invoke(cli, ["package", "--comp", "synth", *_options(CV), "--source", "split"])
    assert split.exit_code == 2 and "kp package --source split: not a predicting stage; one of blend, cv," in split.output


@pytest.mark.slow  # 69 s (2026-12-04): 0.5 GB of wheels, a fresh venv installing them with no index
def test_a_bundle_with_wheels_installs_offline_in_a_fresh_venv_and_its_kernel_reproduces_kp(warm_project, tmp_path):
    import venv

    config, bundle, record, _ = _packaged(warm_project, CV, "--wheels", f"{sys.version_info.major}.{sys.version_info.minor}")
    assert record["wheels"]["files"] > 20 and any(p.name.startswith("kaggle_pipeline-") for p in (bundle / "wheels").iterdir())

    venv.create(tmp_path / "fresh", with_pip=True)  # no kp, no TensorFlow: the kernel installs both from the bundle
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PIP_", "VIRTUAL_ENV"))}
    env.update({"PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1",  # no index, no mirror: the bundle's wheels only
                "KP_COMPETITION_INPUT": str(config.work_dir / "download" / "raw"), "KP_KERNEL_OUTPUT": str(tmp_path / "out")})
    run = subprocess.run([str(tmp_path / "fresh" / "bin" / "python"), str(bundle / "kernel.py")], env=env,
                         capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "out" / "test_probs.npy"),
                               load_predictions(config.work_dir / "cv").test_probs, atol=1e-6, rtol=0)

    from pipeline.kaggle.local.sandbox import confinement, run_kernel
    if confinement() is None:  # the same kernel as the local server runs it: the venv read-only, kp installed beside it
        kernel = tmp_path / "kernel.py"
        kernel.write_text((bundle / "kernel.py").read_text())
        inputs = {config.section("kernel").names(config.comp)[0]: bundle,
                  config.competition.slug: config.work_dir / "download" / "raw"}
        sandboxed = run_kernel(kernel, inputs, tmp_path / "sandboxed", timeout_s=900,
                               python=str(tmp_path / "fresh" / "bin" / "python"))
        assert sandboxed.status == "complete", sandboxed.log
        np.testing.assert_allclose(np.load(sandboxed.working / "test_probs.npy"),
                                   load_predictions(config.work_dir / "cv").test_probs, atol=1e-6, rtol=0)


def kernel_reproduces(sets: list[str], source: str, out, hidden: int = 6) -> dict:
    """`kp package --source SOURCE` on the synthetic competition's warm project under `sets`, then its kernel
    from the bundle alone in this process: its test probabilities must be the source's own to 1e-5, and
    `kp package` must have timed it. Returns the bundle's record."""
    from pipeline.shipping.kernel import write_submission

    config = load_config("synth", sets=sets)
    result = CliRunner().invoke(cli, ["package", "--comp", "synth", *_options(sets), "--source", source])
    assert result.exit_code == 0, result.output
    assert f"Estimate for {hidden} hidden test images" in result.output and "within the limit of 9h00m" in result.output
    bundle = config.work_dir / "package" / "bundle"
    record = json.loads((bundle / "bundle.json").read_text())
    assert record["timing"]["max_abs_difference"] <= 1e-5 and record["timing"]["within_limit"]
    write_submission(bundle, config.work_dir / "download" / "raw", out, say=lambda _: None)
    own = load_predictions(config.work_dir / source)
    np.testing.assert_allclose(np.load(out / "test_probs.npy"), own.test_probs, atol=1e-5, rtol=0)
    return record


MOBILENET_CACHE_FILE = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5"  # Keras' own name


@needs_shared_data
def test_imagenet_weights_are_taken_from_keras_cache_or_named_when_absent(project, tmp_path, monkeypatch):
    """`weights: imagenet` as Keras keeps it in $KERAS_HOME/models (the real ImageNet file, offline): the
    bundle holds the network's weights, and the kernel built from them reproduces finetune to 1e-5."""
    cache = tmp_path / "keras"
    (cache / "models").mkdir(parents=True)
    (cache / "models" / MOBILENET_CACHE_FILE).symlink_to(SHARED_DATA / "weights" / MOBILENET_CACHE_FILE)
    monkeypatch.setattr("keras.src.backend.config._KERAS_DIR", str(cache))  # $KERAS_HOME, read when Keras was imported
    archive = make_statefarm_like(tmp_path / "data", drivers=3, classes=3, per_driver_class=2, test=4)
    statefarm_like_config(project, archive)
    sets = [s for s in TINY_VGG if not s.startswith("precompute.")] + [
        "precompute.backbone=mobilenetv2", "precompute.alpha=0.35", "precompute.weights=imagenet", "model.arch=pool",
        "model.hidden=[]", "model.dropout=[]", "competition.clip=[0.001, 0.999]"]
    runner.run(load_config("synth", sets=sets))
    record = kernel_reproduces(sets, "finetune", tmp_path / "out", hidden=4)
    assert record["networks"] == ["network/00/mobilenetv2-imagenet.weights.h5"]

    monkeypatch.setattr("keras.src.backend.config._KERAS_DIR", str(tmp_path / "empty"))  # offline, not in the cache
    result = CliRunner().invoke(cli, ["package", "--comp", "synth", *_options(sets), "--source", "finetune"])
    assert result.exit_code == 2 and "MobileNetV2's ImageNet weights are not in Keras' cache" in result.output

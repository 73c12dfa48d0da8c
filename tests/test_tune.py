"""The tune stage: the trained head back on its backbone, top blocks unfrozen, trained end to end on images.

Tiny State-Farm-shaped images (32x32) through MobileNetV2 0.35 with calibrated random weights
(`calibrated_mobilenetv2_weights`: with Keras' default batchnorm statistics random features vanish).
"""
from __future__ import annotations

import json
import shutil
import signal

import keras
import numpy as np
import pandas as pd
import pytest

from pipeline.core.artifacts import BACKUP_JOURNAL, BACKUP_METADATA, MODEL_FILE
from pipeline.core.cache import Manifest
from pipeline.core.errors import PipelineError
from pipeline.engine import runner
from pipeline.engine.config import load_config
from pipeline.evaluation.predictions import load_predictions
from pipeline.models.unfreeze import backbone_blocks
from pipeline.training.fit import FitOptions, Phase, fit
from tests.helpers import calibrated_mobilenetv2_weights, make_statefarm_like, start_kp, statefarm_like_config

AUGMENT = """
augment:
  test_passes: 2
  transforms:
    - Affine: {rotate: [-10, 10], translate_percent: {x: [-0.1, 0.1], y: [-0.1, 0.1]}, p: 1.0}
"""


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    return calibrated_mobilenetv2_weights(tmp_path_factory.mktemp("weights") / "mobilenetv2_tiny.weights.h5")


def tiny_tune(weights, *extra: str) -> list[str]:
    return ["competition.image_size=[32, 32]", "stages=[download, split, precompute, finetune, tune, submit]",
            "precompute.backbone=mobilenetv2", "precompute.alpha=0.35", f"precompute.weights={weights}",
            "precompute.dtype=float32", "precompute.batch_size=16", "model.arch=pool", "model.hidden=[16]",
            "model.dropout=[0.25]", "finetune.phases=[{epochs: 3, lr: 0.003}]", "finetune.batch_size=16",
            "tune.unfreeze=2", "tune.epochs=2", "tune.warmup_epochs=1", "tune.lr=0.001", "tune.batch_size=8",
            "submit.source=tune", *extra]


@pytest.fixture
def synth(project, tmp_path):
    archive = make_statefarm_like(tmp_path / "data", drivers=4, classes=3, per_driver_class=4, test=6)
    statefarm_like_config(project, archive, extra=AUGMENT)
    return project


def weights_by_layer(model) -> dict[str, list[np.ndarray]]:
    return {layer.name: [np.asarray(w) for w in layer.get_weights()] for layer in model.layers if layer.weights}


def _tuned_sets(weights_file) -> list[str]:
    return tiny_tune(weights_file, "tune.tta=true", "stages=[download, split, precompute, finetune, tune, ensemble, submit]",
                     "ensemble.source=tune", "ensemble.n=2", "tune.epochs=1", "tune.warmup_epochs=0")


@pytest.fixture
def tuned(warm_project, weights_file):
    """The synthetic competition through finetune, tune (with TTA) and an ensemble of 2 tuned members,
    run once per session and copied per test."""
    def build(root):
        archive = make_statefarm_like(root.parent / "data", drivers=4, classes=3, per_driver_class=4, test=6)
        statefarm_like_config(root, archive, extra=AUGMENT)
        runner.run(load_config("synth", sets=_tuned_sets(weights_file)))

    warm_project("tuned", build)
    return load_config("synth", sets=_tuned_sets(weights_file))


def test_tune_trains_only_the_top_blocks_and_the_head_with_batchnorm_in_inference_mode(tuned, weights_file):
    work = tuned.work_dir
    metrics = Manifest.read(work / "tune").metrics
    assert metrics["unfrozen_blocks"] == ["block_16", "Conv_1"] and metrics["total_blocks"] == 19
    assert metrics["epochs"] == 1 and metrics["tta_passes"] == 2 and "val_log_loss_no_tta" in metrics
    assert metrics["source_val_log_loss"] == Manifest.read(work / "finetune").metrics["val_log_loss"]

    tuned = keras.models.load_model(work / "tune" / MODEL_FILE)
    start = keras.applications.MobileNetV2(include_top=False, weights=str(weights_file), input_shape=(32, 32, 3),
                                           alpha=0.35, pooling="avg")
    before, after = weights_by_layer(start), weights_by_layer(tuned)
    blocks = {layer.name: name for name, layers in backbone_blocks(start) for layer in layers}
    changed = {name for name in before if any(not np.array_equal(a, b) for a, b in zip(before[name], after[name]))}
    batchnorm = {layer.name for layer in start.layers if isinstance(layer, keras.layers.BatchNormalization)}
    assert changed, "no backbone weight moved"
    assert not changed & batchnorm, f"batchnorm weights or moving statistics changed: {sorted(changed & batchnorm)}"
    assert {blocks[name] for name in changed} <= {"block_16", "Conv_1"}, sorted(changed)
    assert {"block_16_project", "Conv_1"} <= changed
    head_before = keras.models.load_model(work / "finetune" / MODEL_FILE).get_weights()
    head_after = tuned.get_layer(tuned.layers[-1].name).get_weights()
    assert all(not np.array_equal(a, b) for a, b in zip(head_before, head_after))


def test_tunes_rate_decays_to_zero_and_it_submits_probabilities(tuned):
    work = tuned.work_dir
    history = pd.read_csv(work / "tune" / "history.csv")
    assert history["epoch"].tolist() == [0] and history["learning_rate"].round(8).tolist() == [0.0]  # cosine to 0
    predictions = load_predictions(work / "tune")
    assert predictions.valid_probs.shape == (12, 3) and predictions.test_probs.shape == (6, 3)
    assert np.allclose(predictions.test_probs.sum(axis=1), 1, atol=1e-5)
    assert Manifest.read(work / "submit").metrics["source"] == "tune"


def test_ensemble_members_can_follow_the_tune_recipe(tuned):
    config, work = tuned, tuned.work_dir
    ensemble = Manifest.read(work / "ensemble").metrics  # members that follow the tune recipe, averaged
    members = [load_predictions(config.work_dir / "_runs" / "ensemble-members" / m["key"]) for m in ensemble["members"]]
    assert [m["seed"] for m in ensemble["members"]] == [1000, 1001] and ensemble["source"] == "tune"
    np.testing.assert_allclose(load_predictions(work / "ensemble").valid_probs,
                               np.mean([m.valid_probs for m in members], axis=0), rtol=1e-6)
    assert not np.allclose(members[0].valid_probs, members[1].valid_probs)
    member = json.loads((config.work_dir / "_runs" / "ensemble-members" / ensemble["members"][0]["key"]
                         / "unit.json").read_text())
    assert member["arch"] == "pool + backbone" and member["unfrozen_blocks"] == ["block_16", "Conv_1"]


def test_lr_find_on_tune_tests_its_model_and_images_and_changes_nothing_cached(tuned):
    """`kp lr-find --stage tune`: the range test on tune's model and streamed images, nothing cached touched."""
    from pipeline.training.lr_find import find_for_stage

    config = tuned
    files = {stage: (config.work_dir / stage / MODEL_FILE).read_bytes() for stage in ("finetune", "tune")}
    fingerprints = {stage: Manifest.read(config.work_dir / stage).fingerprint for stage in files}
    view, inputs = runner.stage_inputs(config, "tune")
    record = find_for_stage(view, "tune", inputs, config.work_dir / "lr_find" / "tune", steps=20, apply=True)
    assert record["batches"] > 10 and record["current_lr"] == 0.001
    assert 1e-7 < record["suggestions"]["minimum_over_10"] < 10
    suggested = float(f"{record['suggestions']['minimum_over_10']:.3g}")
    assert f"lr: {suggested}" in (config.work_dir / "lr_find" / "tune" / "overlay.yaml").read_text()
    assert {stage: (config.work_dir / stage / MODEL_FILE).read_bytes() for stage in files} == files
    assert {stage: Manifest.read(config.work_dir / stage).fingerprint for stage in files} == fingerprints


def test_discriminative_rates_reach_the_optimizer(tmp_path):
    """SGD without momentum: a variable at factor 0.5 moves exactly half as far as at factor 1, and at 0 not at all."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    outputs = keras.layers.Dense(3, activation="softmax", name="top")(keras.layers.Dense(5, name="low")(inputs))
    x, y = np.random.default_rng(0).normal(size=(32, 4)).astype("float32"), np.arange(32) % 3
    moves, initial = {}, keras.Model(inputs, outputs).get_weights()
    for factor in (0.0, 0.5, 1.0):
        model = keras.Model(inputs, outputs)
        model.set_weights(initial)
        start = model.get_layer("low").get_weights()[0].copy()
        factors = {v.path: factor for v in model.get_layer("low").trainable_variables}
        fit(model, (x, y), (x, y), FitOptions(phases=[Phase(1, 0.1)], schedule="phases", optimizer="sgd", momentum=0.0,
            batch_size=32, out_dir=tmp_path, verbose=0, rate_factors=factors))
        moves[factor] = model.get_layer("low").get_weights()[0] - start
    assert np.abs(moves[0.0]).max() == 0 and np.abs(moves[1.0]).max() > 1e-4
    np.testing.assert_allclose(moves[0.5], moves[1.0] / 2, rtol=1e-4, atol=1e-8)


@pytest.mark.slow  # 32 s (2026-12-06): a kp process SIGKILLed mid-tune, then resumed; the fast tier keeps test_cache's SIGKILL mid-write
def test_a_killed_tune_resumes_after_its_last_finished_epoch_and_ends_as_an_uninterrupted_run(synth, weights_file):
    sets = tiny_tune(weights_file, "tune.epochs=4")  # the head has dropout: its draws resume too
    config = load_config("synth", sets=sets)
    runner.run(config, ["finetune"])
    backups = config.work_dir / "_cache" / "tune-model-backup"
    process = start_kp(synth, "tune", "--comp", "synth", *[arg for s in sets for arg in ("--set", s)])
    try:
        wait_for_epochs(process, backups, 2)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        process.kill()
    backup, = backups.iterdir()
    reached = json.loads((backup / BACKUP_METADATA).read_text())["epoch"]
    assert 2 <= reached < 4 and len(json.loads((backup / BACKUP_JOURNAL).read_text())) == reached

    runner.run(config, ["tune"])
    metrics = Manifest.read(config.work_dir / "tune").metrics
    assert metrics["resumed_at"] == reached and metrics["epochs"] == 4
    assert pd.read_csv(config.work_dir / "tune" / "history.csv")["epoch"].tolist() == [0, 1, 2, 3]
    assert not backups.exists() or not any(backups.iterdir()), "the backup outlived the finished run"

    resumed = load_predictions(config.work_dir / "tune")
    shutil.rmtree(config.work_dir / "_runs" / "tune-model")  # the trained model is a unit: drop it to train again
    runner.run(config, ["tune"], force=True)  # the same training, never interrupted
    uninterrupted = load_predictions(config.work_dir / "tune")
    assert Manifest.read(config.work_dir / "tune").metrics["resumed_at"] == 0
    np.testing.assert_array_equal(resumed.valid_probs, uninterrupted.valid_probs)
    np.testing.assert_array_equal(resumed.test_probs, uninterrupted.test_probs)


def wait_for_epochs(process, backups, epochs: int, timeout: float = 240.0) -> None:
    """Wait until the run in `process` has backed up `epochs` epochs (fails the test if it ends first)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for metadata in backups.glob(f"*/{BACKUP_METADATA}"):
            try:
                if json.loads(metadata.read_text())["epoch"] >= epochs:
                    return
            except (ValueError, KeyError):  # being written
                pass
        if process.poll() is not None:
            pytest.fail(f"kp finished before the kill:\n{process.stdout.read().decode()}")
        time.sleep(0.05)
    pytest.fail("timed out waiting for the backup")


@pytest.mark.parametrize("setting, message", [
    ("tune.unfreeze=true", "expected a number of top blocks"),
    ("tune.unfreeze=-1", "expected a number of top blocks"),
    ("tune.warmup_epochs=2", "warmup_epochs (2) must be fewer than epochs (2)"),
    ("tune.image_size=[16, 16]", "at least 32 pixels"),
    ("tune.source=ensemble", "tune.source"),
])
def test_bad_tune_settings_are_one_config_error(synth, setting, message):
    with pytest.raises(PipelineError, match="tune") as error:
        load_config("synth", sets=tiny_tune("none", setting))
    assert message in str(error.value)


def test_tune_refuses_a_head_trained_on_features_of_another_shape():
    from pipeline.models.heads import build_head
    from pipeline.models.unfreeze import stack

    backbone = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(64, 64, 3), alpha=0.35)
    head = build_head((1, 1, 1280), 3, "fc", [8], [0.0])  # trained on 32x32 last-conv features
    with pytest.raises(PipelineError, match=r"the backbone makes features of shape \(2, 2, 1280\) at this image "
                                            r"size, but the head was trained on \(1, 1, 1280\)"):
        stack(backbone, head)
    assert stack(backbone, build_head((2, 2, 1280), 3, "fc", [8], [0.0])).output_shape == (None, 3)


@pytest.mark.slow  # 8 tune trainings (about a minute on 2 cores)
def test_cv_folds_can_fine_tune_their_backbone_with_epochs_chosen_on_another_fold(warm_project, weights_file):
    """cv.source tune: each fold's head, then its backbone, trained on the other folds' images for the epochs
    chosen on the next fold; fold f's images are only predicted."""
    sets = tiny_tune(weights_file, "stages=[download, split, precompute, cv, submit]", "split.strategy=group_kfold",
                     "split.folds=4", "cv.source=tune", "tune.epochs=2", "tune.warmup_epochs=0", "submit.source=cv")

    def build(root):
        archive = make_statefarm_like(root.parent / "data", drivers=4, classes=3, per_driver_class=4, test=6)
        statefarm_like_config(root, archive, extra=AUGMENT)
        runner.run(load_config("synth", sets=sets))

    warm_project("cv-tune", build)
    config = load_config("synth", sets=sets)
    work = config.work_dir
    m = Manifest.read(work / "cv").metrics
    assert m["source"] == "tune" and m["validation"] == "cv4-oof" and m["trained"] == 4
    split = pd.read_csv(work / "split" / "split.csv", dtype={"id": str})
    assert load_predictions(work / "cv").valid_ids == split["id"].tolist()
    for run in m["fold_runs"]:
        unit = work / "_runs" / "cv-folds" / run["key"]
        record = json.loads((unit / "unit.json").read_text())
        assert record["arch"] == "pool + backbone" and set(record["chosen_epochs"]) == {"finetune", "tune"}
        selection = pd.read_csv(unit / "selection" / "history.csv")
        assert record["chosen_epochs"]["tune"] == int(selection["val_loss"].to_numpy().argmin()) + 1
        history = pd.read_csv(unit / "history.csv")
        assert len(history) == record["chosen_epochs"]["tune"]  # exactly the chosen epochs
        assert history.get("val_loss", pd.Series([np.nan])).isna().all()  # fold f never scored in training
        held_out = split["fold"].to_numpy() == run["fold"] - 1
        assert load_predictions(unit).valid_ids == split["id"][held_out].tolist()
        assert record["n_train"] == int((~held_out).sum()) and record["n_valid"] == int(held_out.sum())
    assert not any((work / "_cache").glob("cv-folds-backup/*"))  # each fold's epoch backups went once it was stored


def test_a_packaged_tuned_network_and_ensemble_of_them_take_the_images_themselves(tuned, weights_file, tmp_path):
    from tests.test_package import kernel_reproduces

    sets = _tuned_sets(weights_file)
    for source, models in (("tune", 1), ("ensemble", 2)):
        record = kernel_reproduces(sets, source, tmp_path / source)
        plan = record["predict"]
        assert plan["reads"] == "images" and plan["tta"]["passes"] == 2 and len(record["models"]) == models
        assert list(record["timing"]["images_per_s"]) == [f"images through {source}'s networks"]
        assert record["networks"] == []  # a tuned model holds its backbone: no network file besides it

"""The augment stage and what consumes it: passes aligned with precompute's rows, no validation row's
augmented copy in training, cached passes reused and resumed, transforms checked at config time,
and test-time augmentation averaging exactly the per-pass predictions."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from pipeline.core.cache import Manifest
from pipeline.core.errors import PipelineError
from pipeline.core.runs import last_action
from pipeline.data.arrays import load_array
from pipeline.data.augmentation import RowAugmenter
from pipeline.data.features import load_split_features
from pipeline.data.images import decode_resize
from pipeline.engine import runner
from pipeline.engine.config import load_config
from pipeline.evaluation.predictions import load_predictions
from pipeline.models.extractor import build_extractor
from tests.helpers import REPO, make_statefarm_like, png_size, start_kp, statefarm_like_config, wait_for_partial
from tests.test_transfer import TINY_VGG

TRANSFORMS = "augment.transforms=[{Affine: {rotate: [-20, 20], scale: [0.9, 1.1], p: 1.0}}, {HorizontalFlip: {p: 0.5}}]"
AUGMENTED = [s.replace("finetune, submit", "augment, finetune, submit") for s in TINY_VGG] + [
    TRANSFORMS, "augment.passes=3", "augment.test_passes=2"]


@pytest.fixture
def synth(project, tmp_path):
    """A State-Farm-shaped competition of 48 tiny training images (4 drivers) and 6 test images."""
    archive = make_statefarm_like(tmp_path / "data", drivers=4, classes=3, per_driver_class=4, test=6)
    statefarm_like_config(project, archive)
    return project


def _augmented(root):
    archive = make_statefarm_like(root.parent / "data", drivers=4, classes=3, per_driver_class=4, test=6)
    statefarm_like_config(root, archive)
    runner.run(load_config("synth", sets=AUGMENTED), ["split", "augment"])


@pytest.fixture
def augmented_run(warm_project):
    """The synthetic competition through split and augment (run once per session, copied per test)."""
    warm_project("augmented", _augmented)
    return load_config("synth", sets=AUGMENTED)


def _raw_image(work, subset: str, row: int) -> np.ndarray:
    """Row `row` of `subset` as the augment stage sees it before augmenting: decoded, resized, uint8."""
    index = pd.read_csv(work / "download" / "index.csv", dtype=str, keep_default_na=False)
    path = work / "download" / "raw" / index[index.subset == subset].path.iloc[row]
    image = decode_resize(tf.constant(str(path)), (32, 32)).numpy()
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def test_every_pass_is_row_for_row_the_augmented_image_through_precomputes_network(augmented_run):
    config, work = augmented_run, augmented_run.work_dir
    clean = {s: load_array(work / "precompute" / f"{s}.npy") for s in ("train", "test")}
    for subset, count in (("train", 3), ("test", 2)):
        rows = pd.read_csv(work / "augment" / f"{subset}_rows.csv", dtype=str)
        assert rows.equals(pd.read_csv(work / "precompute" / f"{subset}_rows.csv", dtype=str))
        passes = [load_array(work / "augment" / "passes" / f"{subset}_{k}.npy") for k in range(1, count + 1)]
        for array in passes:
            assert array.shape == clean[subset].shape and array.dtype == clean[subset].dtype
            assert not np.array_equal(array, clean[subset])
        assert not np.array_equal(passes[0], passes[1])

    extractor = build_extractor(config.section("precompute"), config.root, (32, 32))
    transforms = config.get("augment.transforms")
    for subset, number, row in (("train", 1, 0), ("train", 3, 29), ("test", 2, 5)):
        seed = (0, ("train", "test").index(subset), number)
        image = RowAugmenter(transforms, seed)(_raw_image(work, subset, row), row)
        direct = np.asarray(extractor.forward.on_pixels(image[None]))[0]
        stored = load_array(work / "augment" / "passes" / f"{subset}_{number}.npy")[row]
        np.testing.assert_allclose(stored.astype(np.float32), direct, rtol=2e-3, atol=2e-2)

    meta = json.loads((work / "augment" / "meta.json").read_text())
    assert [(p["subset"], p["pass"], p["seed"]) for p in meta["pass_runs"]] == [
        ("train", 1, [0, 0, 1]), ("train", 2, [0, 0, 2]), ("train", 3, [0, 0, 3]), ("test", 1, [0, 1, 1]),
        ("test", 2, [0, 1, 2])]
    assert all(p["images_per_s"] > 0 for p in meta["pass_runs"]) and meta["speed_vs_precompute"] > 0
    assert png_size(work / "augment" / "preview.png") == (864, 864)  # 6 images, each with passes 1-5


def test_a_pass_that_changes_nothing_equals_precompute_even_with_random_weights(synth):
    """With `weights: none` precompute and augment must still build the same network."""
    config = load_config("synth", sets=[s for s in AUGMENTED if not s.startswith("augment.transforms")]
                         + ["augment.transforms=[{HorizontalFlip: {p: 0.0}}]", "augment.passes=1",
                            "augment.test_passes=0", "competition.image_size=[36, 48]"])
    runner.run(config, ["augment"])
    work = config.work_dir
    np.testing.assert_allclose(load_array(work / "augment" / "passes" / "train_1.npy").astype(np.float32),
                               load_array(work / "precompute" / "train.npy").astype(np.float32), rtol=0.02, atol=0.05)


def test_no_validation_rows_augmented_copy_is_trained_on(augmented_run):
    work = augmented_run.work_dir
    split = pd.read_csv(work / "split" / "split.csv", dtype={"id": str})
    valid = (split.side == "valid").to_numpy()
    data = load_split_features(work / "precompute", work / "split", ["c0", "c1", "c2"], passes_dir=work / "augment",
                               train_passes=True, tta=True)
    passes = [np.asarray(load_array(work / "augment" / "passes" / f"train_{k}.npy"), np.float32) for k in (1, 2, 3)]
    clean = np.asarray(load_array(work / "precompute" / "train.npy"), np.float32)
    assert data.train_passes == 3 and len(data.x_train) == 4 * (~valid).sum()
    expected = np.concatenate([clean[~valid], *(p[~valid] for p in passes)])
    np.testing.assert_array_equal(data.x_train, expected)
    trained = {row.tobytes() for row in data.x_train}
    for array in (clean, *passes):
        assert not any(row.tobytes() in trained for row in array[valid])
    assert [len(v) for v in data.valid_passes] == [valid.sum()] * 2  # TTA: the first test_passes passes
    np.testing.assert_array_equal(data.valid_passes[1], passes[1][valid])


def test_raising_passes_computes_only_the_new_ones(augmented_run):
    work = augmented_run.work_dir
    before = {k: (work / "augment" / "passes" / f"train_{k}.npy").read_bytes() for k in (1, 2, 3)}
    runner.run(load_config("synth", sets=AUGMENTED + ["augment.passes=5"]), ["augment"])
    metrics = Manifest.read(work / "augment").metrics
    assert (metrics["computed"], metrics["reused"]) == (2, 5)
    assert [p["reused"] for p in metrics["pass_runs"]] == [True, True, True, False, False, True, True]
    for k, data in before.items():
        assert (work / "augment" / "passes" / f"train_{k}.npy").read_bytes() == data
    runner.run(load_config("synth", sets=AUGMENTED), ["augment"])  # back to 3: the first run, restored
    assert last_action(work, "augment")["action"] == "restored"


@pytest.mark.slow  # 16-18 s (2026-12-06): a kp process SIGKILLed mid-pass; the fast tier keeps test_cache's SIGKILL mid-write
def test_a_killed_augment_run_keeps_its_finished_passes_and_accepts_no_partial_one(synth):
    sets = [a for s in AUGMENTED + ["augment.passes=6", "augment.test_passes=0"] for a in ("--set", s)]
    runner.run(load_config("synth", sets=AUGMENTED), ["precompute"])
    work = load_config("synth", sets=AUGMENTED).work_dir
    store = work / "_runs" / "augment-passes"
    process = start_kp(synth, "augment", "--comp", "synth", *sets)
    wait_for_partial(process, store, "train.npy")
    deadline = time.monotonic() + 120
    while not any(not p.name.startswith(".") for p in store.iterdir()):  # until a pass is finished
        assert process.poll() is None and time.monotonic() < deadline, "augment ended before it could be killed"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = {p.name for p in store.iterdir() if not p.name.startswith(".")}
    assert 1 <= len(finished) < 6
    result = subprocess.run([sys.executable, "-m", "pipeline", "augment", "--comp", "synth", *sets], cwd=REPO,
                            env={**os.environ, "KP_ROOT": str(synth)}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = Manifest.read(work / "augment").metrics
    assert metrics["reused"] == len(finished) and metrics["computed"] == 6 - len(finished)
    assert not list(store.glob(".tmp-*"))
    for k in range(1, 7):
        assert load_array(work / "augment" / "passes" / f"train_{k}.npy").shape == (48, 1, 1, 512)


@pytest.mark.parametrize("transforms, expected", [
    ("[{Affin: {rotate: 10}}]", r"augment.transforms: .*'Affin' is not an albumentations transform \(did you mean 'Affine'\?\)"),
    ("[{Affine: {rotat: 10}}]", r"augment.transforms: .*transforms\[0\].Affine: Argument\(s\) 'rotat' are not valid"),
    ("[{HorizontalFlip: {p: 0.5}}, {Affine: {rotate: ten}}]", r"transforms\[1\].Affine: .*rotate"),
    ("[{Affine: {}, HorizontalFlip: {}}]", r"transforms\[0\]: expected one mapping"),
])
def test_transforms_are_checked_by_albumentations_when_the_config_loads(synth, transforms, expected):
    with pytest.raises(PipelineError, match=expected):
        load_config("synth", sets=AUGMENTED[:-3] + [f"augment.transforms={transforms}"])
    load_config("synth", sets=AUGMENTED[:-3] + [f"augment.transforms={transforms}"], shallow=True)  # kp status


def test_test_passes_beyond_passes_and_a_missing_augment_stage_are_config_errors(synth):
    with pytest.raises(PipelineError, match="test_passes .3. must not exceed passes .2."):
        load_config("synth", sets=AUGMENTED + ["augment.passes=2", "augment.test_passes=3"])
    with pytest.raises(PipelineError, match="'finetune' needs 'augment', which is not listed"):
        load_config("synth", sets=TINY_VGG + ["finetune.tta=true"])


def test_tta_predictions_are_the_mean_of_the_per_pass_predictions(augmented_run):
    config = load_config("synth", sets=AUGMENTED + ["finetune.augmented=true", "finetune.tta=true"])
    runner.run(config, ["finetune"])
    work = config.work_dir
    metrics = Manifest.read(work / "finetune").metrics
    assert metrics["train_passes"] == 3 and metrics["tta_passes"] == 2 and metrics["n_train"] == 36
    model = keras.models.load_model(work / "finetune" / "model.keras")
    data = load_split_features(work / "precompute", work / "split", ["c0", "c1", "c2"], passes_dir=work / "augment",
                               tta=True)
    saved = load_predictions(work / "finetune")
    for clean, passes, probs in ((data.x_valid, data.valid_passes, saved.valid_probs),
                                 (data.x_test, data.test_passes, saved.test_probs)):
        each = [model.predict_on_batch(np.asarray(x, np.float32)) for x in (clean, *passes)]
        np.testing.assert_allclose(probs, np.mean(each, axis=0), rtol=1e-5, atol=1e-6)
    from pipeline.evaluation.metrics import evaluate

    no_tta = evaluate(data.y_valid, model.predict_on_batch(data.x_valid))
    assert metrics["val_log_loss_no_tta"] == pytest.approx(no_tta["val_log_loss"], abs=2e-5)
    assert metrics["tta_log_loss_gain"] == pytest.approx(metrics["val_log_loss_no_tta"] - metrics["val_log_loss"],
                                                         abs=2e-5)


def test_pixel_passes_for_a_from_scratch_model_are_augmented_images_normalised_alike(project):
    """`backbone: none`: a pass holds the same 0..255 pixels, moved, under precompute's normalisation."""
    config = load_config("digits", sets=["stages=[download, split, precompute, augment, finetune]",
                                         "augment.passes=2", "augment.test_passes=1",
                                         "augment.transforms=[{Affine: {rotate: [-10, 10], p: 1.0}}]",
                                         "finetune.augment=null", "finetune.augmented=true", "finetune.tta=true",
                                         "finetune.phases=[{epochs: 1, lr: 0.001}]", "model.arch=linear"])
    runner.run(config)
    work = config.work_dir
    meta = json.loads((work / "precompute" / "meta.json").read_text())
    clean = load_array(work / "precompute" / "train.npy")
    moved = load_array(work / "augment" / "passes" / "train_2.npy")
    assert moved.shape == clean.shape and not np.array_equal(moved, clean)
    pixels = moved.astype(np.float64) * meta["std"] + meta["mean"]
    np.testing.assert_allclose(pixels, np.round(pixels), atol=1e-3)  # whole 0..255 values, same statistics
    assert pixels.min() > -1e-3 and pixels.max() < 255 + 1e-3
    assert abs(pixels.mean() - meta["mean"]) < 1.0  # a rotation by 10 degrees keeps the ink
    finetune = Manifest.read(work / "finetune").metrics
    assert finetune["train_passes"] == 2 and finetune["tta_passes"] == 1


def test_ensemble_members_can_follow_bnretrain_and_are_cached_by_source(augmented_run):
    sets = [s.replace("augment, finetune, submit", "augment, finetune, ensemble") for s in AUGMENTED] + [
        "ensemble.n=2", "bnretrain.phases=[{epochs: 1, lr: 0.001}]", "bnretrain.augmented=true"]
    runner.run(load_config("synth", sets=sets + ["ensemble.source=bnretrain"]), ["ensemble"])
    work = augmented_run.work_dir
    bn = Manifest.read(work / "ensemble").metrics
    assert bn["source"] == "bnretrain" and bn["trained"] == 2
    member = json.loads((work / "_runs" / "ensemble-members" / bn["members"][0]["key"] / "unit.json").read_text())
    assert member["insertion_change"] < 1e-4 and member["train_passes"] == 3 and "finetune_val_log_loss" in member
    runner.run(load_config("synth", sets=sets + ["ensemble.source=finetune"]), ["ensemble"])
    plain = Manifest.read(work / "ensemble").metrics
    assert plain["trained"] == 2 and {m["key"] for m in plain["members"]}.isdisjoint(m["key"] for m in bn["members"])
    before = Manifest.read(work / "ensemble")
    runner.run(load_config("synth", sets=sets + ["ensemble.source=finetune", "bnretrain.dropout=0.2"]), ["ensemble"])
    after = Manifest.read(work / "ensemble")  # finetune members never read bnretrain: not even the stage reruns
    assert after.fingerprint == before.fingerprint and after.finished == before.finished

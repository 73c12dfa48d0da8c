"""From-scratch models on digits: pixel caching, the model ladder, augmentation, the ensemble stage."""
from __future__ import annotations

import hashlib
import json
import shutil

import keras
import numpy as np
import pandas as pd
import pytest

from pipeline.core.cache import Manifest
from pipeline.data.features import load_split_features
from pipeline.engine import runner
from pipeline.engine.config import load_config
from pipeline.evaluation.predictions import load_predictions
from pipeline.models.scratch import LADDER, build_scratch_model
from pipeline.training.augment import augmented_batches, build_augmenter
from pipeline.training.fit import FitOptions, Phase, fit
from tests.helpers import png_size

QUICK = ["finetune.phases=[{epochs: 1, lr: 0.003}]", "model.arch=cnn", "finetune.augment=null"]


def digits(sets=(), stages=None):
    config = load_config("digits", sets=list(QUICK) + list(sets))
    runner.run(config, stages)
    return config


def test_pixels_are_normalised_with_training_statistics_only(project):
    config = digits(stages=["precompute"])
    work = config.work_dir
    meta = json.loads((work / "precompute" / "meta.json").read_text())
    raw = work / "download" / "raw"
    train_pixels = pd.read_csv(raw / "train.csv").drop(columns="label").to_numpy(np.float64)
    test_pixels = pd.read_csv(raw / "test.csv").to_numpy(np.float64)
    assert meta["mean"] == pytest.approx(train_pixels.mean(), abs=1e-4)
    assert meta["std"] == pytest.approx(train_pixels.std(), rel=1e-5)
    assert meta["mean"] != pytest.approx(np.concatenate([train_pixels, test_pixels]).mean(), abs=1e-3)
    train = np.load(work / "precompute" / "train.npy")
    test = np.load(work / "precompute" / "test.npy")
    assert train.shape == (1497, 8, 8, 1) and test.shape == (300, 8, 8, 1) and train.dtype == np.float32
    assert abs(train.mean()) < 1e-4 and train.std() == pytest.approx(1.0, abs=1e-4)
    np.testing.assert_allclose(test.reshape(300, -1), (test_pixels - meta["mean"]) / meta["std"], atol=1e-4)


@pytest.mark.parametrize("arch", LADDER)
def test_each_ladder_step_builds_trains_and_beats_chance(project, arch, tmp_path):
    config = digits(stages=["precompute", "split"])
    data = load_split_features(config.work_dir / "precompute", config.work_dir / "split", config.competition.classes)
    keras.utils.set_random_seed(0)
    model = build_scratch_model(arch, (8, 8, 1), 10, [64], [0.5], conv_dropout=0.25)
    train = (data.x_train[:400], data.y_train[:400])
    history, _, _ = fit(model, train, (data.x_valid, data.y_valid), FitOptions(phases=[Phase(1, 0.003)], schedule="phases",
                        optimizer="adam", momentum=0.0, batch_size=16, out_dir=tmp_path, verbose=0))
    assert history["val_accuracy"][0] > 0.3, history  # chance is 0.1
    kinds = {type(layer).__name__ for layer in model.layers}
    assert ("Conv2D" in kinds) == arch.startswith("cnn")
    assert ("BatchNormalization" in kinds) == (arch in ("cnn_bn", "cnn_bn_do", "cnn_strided"))
    assert ("Dropout" in kinds) == (arch in ("cnn_bn_do", "cnn_strided"))
    assert ("MaxPooling2D" in kinds) == (arch in ("cnn", "cnn_bn", "cnn_bn_do"))  # cnn_strided learns its downsampling


def test_course_padding_for_mnist_and_same_padding_for_tiny_digits():
    assert build_scratch_model("cnn", (28, 28, 1), 10, [512], [0.0]).get_layer("pool2").output.shape[1:3] == (4, 4)
    assert build_scratch_model("cnn", (8, 8, 1), 10, [512], [0.0]).get_layer("pool2").output.shape[1:3] == (2, 2)
    strided = build_scratch_model("cnn_strided", (28, 28, 1), 10, [128], [0.4], conv_dropout=0.4)
    assert strided.get_layer("conv1_down").output.shape[1:3] == (12, 12)  # 28 -> 26 -> 24 -> 12 (5x5, stride 2)
    assert strided.get_layer("conv2_down").output.shape[1:3] == (4, 4)  # 12 -> 10 -> 8 -> 4
    assert strided.count_params() == 327_242


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_augmentation_touches_only_training_batches(project):
    augment = "finetune.augment={rotate: 8, shift: 0.1, shear: 10, zoom: 0.1}"
    config = digits(sets=[augment, "finetune.seed=1"], stages=["finetune"])
    cached = {name: _sha(config.work_dir / "precompute" / name) for name in ("train.npy", "test.npy")}
    first = load_predictions(config.work_dir / "finetune")
    config = digits(sets=[augment, "finetune.seed=2"], stages=["finetune"])
    # the cached arrays the model is validated and tested on are bit-identical after two runs
    assert {name: _sha(config.work_dir / "precompute" / name) for name in cached} == cached
    assert load_predictions(config.work_dir / "finetune").valid_ids == first.valid_ids

    data = load_split_features(config.work_dir / "precompute", config.work_dir / "split", config.competition.classes)
    augmenter = build_augmenter(config.section("finetune").augment, fill=float(data.x_train.min()))
    batch = lambda seed: augmented_batches(data.x_train, data.y_train, 32, augmenter, seed)[0]
    (a, ya), (b, _), (c, _) = batch(1), batch(1), batch(2)
    np.testing.assert_array_equal(a, b)  # same seed, same batch
    assert not np.array_equal(a, c)  # another seed draws other changes
    original = data.x_train[np.random.default_rng([1, 0]).permutation(len(data.x_train))[:32]]
    assert not np.allclose(a, original) and np.array_equal(ya, data.y_train[
        np.random.default_rng([1, 0]).permutation(len(data.x_train))[:32]])  # labels follow their images


def test_raising_ensemble_size_reuses_members_and_average_is_the_ensemble(project):
    config = digits(sets=["ensemble.n=2"], stages=["ensemble"])
    first = Manifest.read(config.work_dir / "ensemble").metrics
    assert first["trained"] == 2
    config = digits(sets=["ensemble.n=3"], stages=["ensemble"])
    result = Manifest.read(config.work_dir / "ensemble").metrics
    assert result["trained"] == 1 and [m["reused"] for m in result["members"]] == [True, True, False]
    assert [m["val_log_loss"] for m in result["members"][:2]] == [m["val_log_loss"] for m in first["members"]]
    members = [load_predictions(config.work_dir / "_runs" / "ensemble-members" / m["key"]) for m in result["members"]]
    ensemble = load_predictions(config.work_dir / "ensemble")
    np.testing.assert_allclose(ensemble.valid_probs, np.mean([m.valid_probs for m in members], axis=0), atol=1e-6)
    np.testing.assert_allclose(ensemble.test_probs, np.mean([m.test_probs for m in members], axis=0), atol=1e-6)
    assert result["mean_member_val_log_loss"] == pytest.approx(np.mean([m["val_log_loss"] for m in result["members"]]),
                                                               abs=1e-5)
    assert png_size(config.work_dir / "ensemble" / "members.png") == (900, 360)  # log loss and accuracy panels


def test_digits_end_to_end_submits_the_ensemble_and_the_same_config_gives_the_same_bytes(project):
    config = digits(sets=["ensemble.n=2"])
    submit = Manifest.read(config.work_dir / "submit").metrics
    assert submit["source"] == "ensemble" and submit["score_name"] == "val_accuracy" and submit["val_accuracy"] > 0.8
    written = pd.read_csv(submit["file"])
    assert written.columns.tolist() == ["ImageId", "Label"] and len(written) == 300
    assert written.ImageId.tolist() == list(range(1, 301)) and set(written.Label) <= set(range(10))
    solution = pd.read_csv(config.work_dir / "download" / "solution.csv")
    assert (written.Label == solution.Label).mean() > 0.8  # a benchmark-style check; no stage reads this

    # deterministic mode (the default): the members trained again from scratch give the same bytes
    probs = np.load(config.work_dir / "ensemble" / "test_probs.npy")
    submitted = open(submit["file"], "rb").read()
    shutil.rmtree(config.work_dir / "_runs" / "ensemble-members")
    runner.run(config, ["ensemble", "submit"], force=True)
    assert Manifest.read(config.work_dir / "ensemble").metrics["trained"] == 2
    assert np.array_equal(np.load(config.work_dir / "ensemble" / "test_probs.npy"), probs)
    assert open(submit["file"], "rb").read() == submitted

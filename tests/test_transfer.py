"""Transfer learning: precompute -> finetune -> submit with VGG16 (weights=None) on tiny images,
feature alignment against a direct forward pass, inverted dropout, and learning-rate changes."""
from __future__ import annotations

import json

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from pipeline.core.cache import Manifest
from pipeline.core.errors import PipelineError
from pipeline.data.arrays import load_array
from pipeline.data.features import load_split_features
from pipeline.data.images import decode_resize
from pipeline.engine import runner
from pipeline.engine.config import load_config
from pipeline.evaluation.plots import plot_confusion, plot_history
from pipeline.models.heads import build_head
from pipeline.training.fit import FitOptions, Phase, cosine_schedule, current_learning_rate, fit, make_optimizer
from tests.helpers import make_statefarm_like, png_size, statefarm_like_config

TINY_VGG = [
    "competition.image_size=[32, 32]", "competition.clip=[0.02, 0.9]",
    "stages=[download, split, precompute, finetune, submit]",
    "precompute.backbone=vgg16", "precompute.weights=none", "precompute.batch_size=8",
    "model.arch=fc", "model.hidden=[16, 16]", "model.dropout=[0.5, 0.25]",
    "finetune.phases=[{epochs: 2, lr: 0.001}, {epochs: 1, lr: 0.0001}]", "finetune.batch_size=16",
]


@pytest.fixture
def tiny_vgg_run(project, tmp_path):
    archive = make_statefarm_like(tmp_path / "data", drivers=4, classes=3, per_driver_class=4, test=6)
    statefarm_like_config(project, archive)
    config = load_config("synth", sets=TINY_VGG)
    runner.run(config)
    return config


def test_vgg16_pipeline_end_to_end_on_tiny_images(tiny_vgg_run):
    config = tiny_vgg_run
    work = config.work_dir
    features = load_array(work / "precompute" / "train.npy")
    assert features.shape == (48, 1, 1, 512) and features.dtype == np.float16
    assert load_array(work / "precompute" / "test.npy").shape == (6, 1, 1, 512)

    finetune = Manifest.read(work / "finetune")
    assert finetune.metrics["arch"] == "fc" and finetune.metrics["epochs"] == 3
    for name in ("model.keras", "history.csv", "valid_probs.npy", "test_probs.npy"):
        assert (work / "finetune" / name).stat().st_size > 0, name
    assert png_size(work / "finetune" / "loss.png") == (900, 360)  # loss and accuracy: two panels of 5 x 4 inches
    assert png_size(work / "finetune" / "confusion.png") == (225, 225)  # 3 classes: (1 + 0.5 x 3) inches a side
    history = pd.read_csv(work / "finetune" / "history.csv")
    assert history["learning_rate"].round(7).tolist() == [0.001, 0.001, 0.0001]
    assert "model.imagenet_init needs precompute.backbone vgg16 with weights imagenet" in finetune.warnings[0]

    submit = Manifest.read(work / "submit").metrics
    written = pd.read_csv(submit["file"], dtype={"img": str})
    sample = pd.read_csv(work / "download" / "raw" / "sample_submission.csv", dtype={"img": str})
    assert list(written.columns) == list(sample.columns)
    assert written.img.tolist() == sample.img.tolist()
    values = written.iloc[:, 1:].to_numpy()
    assert values.min() >= 0.02 and values.max() <= 0.9
    meta = json.loads(open(submit["file"].replace(".csv", ".json")).read())
    assert meta["fingerprint"] == Manifest.read(work / "submit").fingerprint
    assert meta["split_strategy"] == "group" and meta["val_log_loss_clipped"] == submit["val_log_loss_clipped"]


def test_precomputed_rows_equal_a_direct_forward_pass(project, tmp_path):
    """With a weights file, the stage's model is known: its stored rows match a direct pass."""
    archive = make_statefarm_like(tmp_path / "data", drivers=3, classes=3, per_driver_class=3, test=4)
    statefarm_like_config(project, archive)
    base = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
    weights = tmp_path / "vgg16_tiny.weights.h5"
    base.save_weights(weights)
    config = load_config("synth", sets=[s for s in TINY_VGG if not s.startswith("precompute.weights")]
                         + [f"precompute.weights={weights}"])
    runner.run(config, ["precompute"])
    work = config.work_dir
    stored = load_array(work / "precompute" / "train.npy")
    rows = pd.read_csv(work / "precompute" / "train_rows.csv", dtype=str)
    index = pd.read_csv(work / "download" / "index.csv", dtype=str, keep_default_na=False)
    path_of = dict(zip(index.id, index.path))
    for i in (0, 5, len(rows) - 1):
        image = decode_resize(tf.constant(str(work / "download" / "raw" / path_of[rows.id[i]])), (32, 32))
        direct = base(keras.applications.vgg16.preprocess_input(image[None]), training=False).numpy()[0]
        np.testing.assert_allclose(stored[i].astype(np.float32), direct, rtol=2e-3, atol=2e-2)


def test_misaligned_split_is_refused(tiny_vgg_run):
    work = tiny_vgg_run.work_dir
    split = pd.read_csv(work / "split" / "split.csv", dtype={"id": str})
    shuffled = work / "shuffled"
    shuffled.mkdir()
    split.sample(frac=1, random_state=0).to_csv(shuffled / "split.csv", index=False)
    with pytest.raises(PipelineError, match="disagree at row .* not aligned with the rows"):
        load_split_features(work / "precompute", shuffled, ["c0", "c1", "c2"])


def with_dropout(model, rates: dict[str, float] | float):
    """The same model with new dropout rates and the very same weights (no rescaling: inverted dropout)."""
    import keras

    config = model.get_config()
    for layer in config["layers"]:
        if layer["class_name"] == "Dropout":
            name = layer["config"]["name"]
            new = rates if isinstance(rates, float) else rates.get(name, layer["config"]["rate"])
            layer["config"]["rate"] = float(new)
    rebuilt = keras.Model.from_config(config)
    rebuilt.set_weights(model.get_weights())
    return rebuilt


def test_changing_dropout_keeps_inference_outputs_identical():
    keras.utils.set_random_seed(0)
    model = build_head((4, 4, 8), 3, "fc", [32, 32], [0.5, 0.5])
    x = np.random.default_rng(0).normal(size=(20, 4, 4, 8)).astype(np.float32)
    before = model.predict(x, verbose=0)
    for rates in (0.0, 0.8, {"dropout1": 0.1}):
        after = with_dropout(model, rates).predict(x, verbose=0)
        np.testing.assert_array_equal(before, after)
    assert [l.rate for l in with_dropout(model, 0.0).layers if isinstance(l, keras.layers.Dropout)] == [0.0, 0.0]
    # the course's fix (halve the weights after removing dropout) changes the outputs: wrong for Keras
    halved = with_dropout(model, 0.0)
    for layer in halved.layers:
        if layer.name in ("fc2", "predictions"):
            kernel, bias = layer.get_weights()
            layer.set_weights([kernel * 0.5, bias])
    assert not np.allclose(before, halved.predict(x, verbose=0), atol=1e-3)


def _weights_per_epoch(model, phases, schedule="phases", warmup_epochs=0):
    x = np.random.default_rng(1).normal(size=(64, 6)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    snapshots = []

    class Snapshot(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            snapshots.append([w.copy() for w in self.model.get_weights()])

    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory() as folder:
        history, _, _ = fit(model, (x, y), (x, y), FitOptions(phases=phases, schedule=schedule, optimizer="sgd",
                            momentum=0.0, batch_size=16, out_dir=Path(folder), verbose=0,
                            warmup_epochs=warmup_epochs, callbacks=[Snapshot()]))
    return snapshots, history


def test_a_learning_rate_change_really_reaches_the_optimizer():
    keras.utils.set_random_seed(0)
    model = build_head((6,), 2, "pool", [8], [0.0])
    snapshots, history = _weights_per_epoch(model, [Phase(2, 0.1), Phase(2, 0.0)])
    assert history["learning_rate"] == pytest.approx([0.1, 0.1, 0.0, 0.0])
    moved = lambda a, b: any(not np.array_equal(u, v) for u, v in zip(a, b))
    assert moved(snapshots[0], snapshots[1])  # lr 0.1: training changes the weights
    assert not moved(snapshots[1], snapshots[2]) and not moved(snapshots[2], snapshots[3])  # lr 0: frozen
    assert current_learning_rate(model.optimizer) == 0.0


def test_the_rate_read_back_is_the_one_the_next_update_uses():
    """`current_learning_rate` (what history.csv's learning_rate column holds) follows a schedule's steps:
    one SGD step at the rate read back moves a weight by exactly rate x gradient."""
    schedule = cosine_schedule(0.2, epochs=4, steps_per_epoch=1, warmup_epochs=2)
    optimizer = make_optimizer("sgd", schedule, momentum=0.0)
    weight = keras.Variable(np.zeros(1, np.float32))
    for step in range(4):
        rate = current_learning_rate(optimizer)
        assert rate == pytest.approx(float(schedule(step)), abs=1e-7)
        before = float(weight.numpy()[0])
        optimizer.apply([keras.ops.ones(1)], [weight])  # gradient 1
        assert before - float(weight.numpy()[0]) == pytest.approx(rate, abs=1e-7)


def test_training_plots_show_the_history_and_the_confusion_counts(tmp_path):
    history = {"loss": [1.0, 0.5, 0.25], "val_loss": [1.1, 0.7, 0.6], "accuracy": [0.3, 0.6, 0.9],
               "val_accuracy": [0.3, 0.5, 0.55]}
    figure = plot_history(history, tmp_path / "loss.png", "t")
    assert [ax.get_ylabel() for ax in figure.axes] == ["loss", "accuracy"]
    for ax, key in zip(figure.axes, ("loss", "accuracy")):
        assert [list(line.get_ydata()) for line in ax.lines] == [history[key], history[f"val_{key}"]]
        assert list(ax.lines[0].get_xdata()) == [1, 2, 3]
    labels, predicted = np.array([0, 0, 1, 2, 2, 2]), np.array([0, 1, 1, 2, 2, 0])
    figure = plot_confusion(labels, predicted, ["a", "b", "c"], tmp_path / "confusion.png", "t")
    shown = figure.axes[0].images[0].get_array()
    np.testing.assert_array_equal(shown, [[1, 1, 0], [0, 1, 0], [1, 0, 2]])  # rows: true, columns: predicted
    assert [text.get_text() for text in figure.axes[0].texts] == [str(n) for n in np.asarray(shown).ravel()]


def test_cosine_schedule_decays_within_training():
    keras.utils.set_random_seed(0)
    model = build_head((6,), 2, "pool", [], [])
    _, history = _weights_per_epoch(model, [Phase(4, 0.2)], schedule="cosine")
    assert history["learning_rate"][0] < 0.2 and all(a > b for a, b in zip(history["learning_rate"], history["learning_rate"][1:]))
    assert history["learning_rate"][-1] < 0.02


def test_cosine_warmup_rises_to_the_peak_then_decays_to_zero():
    keras.utils.set_random_seed(0)
    model = build_head((6,), 2, "pool", [], [])
    # 64 rows / batch 16 = 4 steps an epoch; the logged rate is the optimizer's after each epoch
    _, history = _weights_per_epoch(model, [Phase(4, 0.2)], schedule="cosine", warmup_epochs=2)
    assert history["learning_rate"] == pytest.approx([0.1, 0.2, 0.1, 0.0], abs=1e-6)


def test_fc_head_takes_vgg16_top_weights_when_shapes_match():
    """The ImageNet-init path minus the download: VGG16's fc1/fc2 (here random) land in the head."""
    from pipeline.models.heads import copy_dense_weights

    top = keras.applications.VGG16(include_top=True, weights=None)
    head = build_head((7, 7, 512), 10, "fc", [4096, 4096], [0.5, 0.5])
    assert copy_dense_weights(top, head, ["fc1", "fc2", "predictions"]) == ["fc1", "fc2"]  # not the 1000-way layer
    for name in ("fc1", "fc2"):
        for mine, theirs in zip(head.get_layer(name).get_weights(), top.get_layer(name).get_weights()):
            np.testing.assert_array_equal(mine, theirs)
    conv_head = build_head((14, 14, 512), 10, "fc", [4096, 4096], [0.5, 0.5])  # last-conv cut: pooled first
    assert conv_head.get_layer("block5_pool").output.shape[1:] == (7, 7, 512)


def test_batchnorm_inserted_into_a_trained_head_changes_no_prediction():
    from pipeline.models.batchnorm import BN_EPSILON, with_batchnorm

    keras.utils.set_random_seed(3)
    rng = np.random.default_rng(3)
    x = rng.normal(2.0, 3.0, size=(512, 20)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 4).astype(np.int64) + (x[:, 2] > 2)
    head = build_head((20,), 3, "pool", [32, 16], [0.5, 0.25])
    head.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    head.fit(x, y, epochs=3, batch_size=64, verbose=0)
    before = head.predict(x, verbose=0)

    bn = with_batchnorm(head, x, dropout=0.1)
    np.testing.assert_allclose(bn.predict(x, verbose=0), before, atol=1e-5)
    assert [layer.name for layer in bn.layers if isinstance(layer, keras.layers.BatchNormalization)] == \
        ["fc1_bn", "fc2_bn"]
    assert {layer.rate for layer in bn.layers if isinstance(layer, keras.layers.Dropout)} == {0.1}
    gamma, beta, mean, variance = bn.get_layer("fc1_bn").get_weights()
    np.testing.assert_allclose(gamma, np.sqrt(variance + BN_EPSILON), rtol=1e-6)
    np.testing.assert_allclose(beta, mean)

    # the course's initialisation, gamma = variance, changes the predictions
    bn.get_layer("fc1_bn").set_weights([variance, beta, mean, variance])
    assert np.abs(bn.predict(x, verbose=0) - before).max() > 1e-2


def test_bnretrain_inserts_batchnorm_without_a_change_then_retrains(tiny_vgg_run):
    config = load_config("synth", sets=[s.replace("finetune, submit", "finetune, bnretrain, submit") for s in TINY_VGG]
                         + ["bnretrain.phases=[{epochs: 2, lr: 0.001}]", "bnretrain.dropout=0.1",
                            "submit.source=bnretrain"])
    runner.run(config)  # download .. finetune are reused from the fixture's run
    work = config.work_dir
    bn = Manifest.read(work / "bnretrain").metrics
    assert bn["insertion_change"] < 1e-5 and bn["epochs"] == 2 and bn["dropout"] == 0.1
    assert bn["finetune_val_log_loss"] == Manifest.read(work / "finetune").metrics["val_log_loss"]
    assert bn["log_loss_gain"] == pytest.approx(bn["finetune_val_log_loss"] - bn["val_log_loss"], abs=1e-5)
    model = keras.models.load_model(work / "bnretrain" / "model.keras")
    assert [layer.name for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)] == \
        ["fc1_bn", "fc2_bn"]
    assert {layer.rate for layer in model.layers if isinstance(layer, keras.layers.Dropout)} == {0.1}
    assert Manifest.read(work / "submit").metrics["source"] == "bnretrain"


def test_bnretrain_refuses_a_from_scratch_model(project):
    from pipeline.core.errors import PipelineError

    config = load_config("digits", sets=["stages=[download, split, precompute, finetune, bnretrain]",
                                         "finetune.phases=[{epochs: 1, lr: 0.001}]", "model.arch=linear",
                                         "finetune.augment=null"])
    with pytest.raises(PipelineError, match="model.arch 'linear' is a from-scratch model that has it already"):
        runner.run(config)


def test_label_smoothing_trains_on_smoothed_targets_and_chooses_the_epoch_on_plain_log_loss(tmp_path):
    import keras

    from pipeline.training.fit import FitOptions, Phase, fit, smoothed_sparse_crossentropy

    y = np.array([0, 2, 1, 2])
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.3, 0.4, 0.3], [0.2, 0.2, 0.6]], dtype="float32")
    smoothed = keras.losses.CategoricalCrossentropy(label_smoothing=0.1)(np.eye(3)[y], probs)
    np.testing.assert_allclose(float(smoothed_sparse_crossentropy()(0.1)(y, probs)), float(smoothed), rtol=1e-6)

    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 8)).astype("float32")
    labels = (x[:, 0] > 0).astype("int64")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(2, activation="softmax")])
    history, best, best_loss = fit(model, (x[:64], labels[:64]), (x[64:], labels[64:]), FitOptions(phases=[Phase(6, 0.05)],
                                   schedule="phases", optimizer="adam", momentum=0.9, batch_size=16, out_dir=tmp_path,
                                   verbose=0, label_smoothing=0.2))
    assert best == int(np.argmin(history["val_log_loss"])) and best_loss == min(history["val_log_loss"])
    assert all(s > p for s, p in zip(history["val_loss"], history["val_log_loss"]))  # smoothing costs on confident rows


def test_ema_writes_the_moving_average_into_the_model_at_every_epoch_end(tmp_path):
    import keras

    from pipeline.training.fit import FitOptions, Phase, fit

    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 8)).astype("float32")
    labels = (x[:, 0] > 0).astype("int64")

    def trained(ema):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(2, activation="softmax")])
        history, _, _ = fit(model, (x[:64], labels[:64]), (x[64:], labels[64:]), FitOptions(phases=[Phase(1, 0.05)],
                            schedule="phases", optimizer="sgd", momentum=0.0, batch_size=16, out_dir=tmp_path, verbose=0,
                            ema=ema))
        return model, history

    plain, _ = trained(None)
    averaged, history = trained(0.5)
    optimizer = averaged.optimizer
    assert optimizer.use_ema and optimizer.ema_momentum == 0.5 and optimizer.ema_overwrite_frequency == 4  # 64 / 16
    for weights, average in zip(averaged.trainable_variables, optimizer._model_variables_moving_average):
        np.testing.assert_allclose(np.asarray(weights), np.asarray(average), rtol=1e-6)  # the model holds the average
    assert not np.allclose(np.asarray(averaged.trainable_variables[0]), np.asarray(plain.trainable_variables[0]))
    expected = keras.losses.SparseCategoricalCrossentropy()(labels[64:], averaged.predict(x[64:], verbose=0))
    assert history["val_loss"][0] == pytest.approx(float(expected), rel=1e-4)  # validation scored the average


def test_mixup_on_cached_rows_mixes_rows_and_targets_with_the_same_weight():
    from pipeline.training.mixup import mixed_rows

    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 6)).astype("float32")
    y = rng.integers(0, 3, 40)
    batches = mixed_rows(x, y, 3, 16, 0.4, seed=7)
    assert len(batches) == 3
    mixed, targets = batches[0]
    assert mixed.shape == (16, 6) and targets.shape == (16, 3)
    np.testing.assert_allclose(targets.sum(axis=1), 1.0, rtol=1e-6)
    order = np.random.default_rng([7, 0]).permutation(40)
    rows = np.sort(order[:16])  # the epoch's first batch
    for i in range(16):  # each mixed row is w * its row + (1 - w) * a partner of the batch, its target the same blend
        solved = [(j, w) for j in range(16) for w in [np.dot(mixed[i] - x[rows[j]], x[rows[i]] - x[rows[j]])
                                                       / max(np.sum((x[rows[i]] - x[rows[j]]) ** 2), 1e-12)]
                  if np.allclose(w * x[rows[i]] + (1 - w) * x[rows[j]], mixed[i], atol=1e-5)]
        j, w = solved[0]
        np.testing.assert_allclose(targets[i], w * np.eye(3)[y[rows[i]]] + (1 - w) * np.eye(3)[y[rows[j]]], atol=1e-4)
    np.testing.assert_array_equal(batches[0][0], mixed)  # the same draw for the same (seed, epoch, batch)
    batches.on_epoch_end()
    assert not np.allclose(batches[0][0], mixed)  # a new epoch draws afresh


def test_image_mixup_cutmix_and_gradient_accumulation_train_on_soft_targets(tmp_path):
    import keras
    import tensorflow as tf

    from pipeline.training.fit import FitOptions, Phase, fit
    from pipeline.training.mixup import image_mixer

    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (24, 16, 16, 3)).astype("float32")
    labels = rng.integers(0, 3, 24)
    mix = image_mixer(0.4, 1.0, 3, seed=3)
    assert image_mixer(None, None, 3, seed=3) is None
    mixed, targets = mix(tf.constant(images[:8]), tf.constant(labels[:8]))
    assert mixed.shape == (8, 16, 16, 3) and targets.shape == (8, 3)
    np.testing.assert_allclose(np.asarray(targets).sum(axis=1), 1.0, rtol=1e-5)
    assert (np.asarray(targets).max(axis=1) < 1.0).any()  # some labels are mixed
    train = tf.data.Dataset.from_tensor_slices((images, labels)).batch(8).repeat(2).map(mix)
    valid = tf.data.Dataset.from_tensor_slices((images, labels)).batch(8)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dense(3, activation="softmax")])
    history, _, _ = fit(model, train, valid, FitOptions(phases=[Phase(2, 0.01)], schedule="phases", optimizer="adam", momentum=0.9,
                        batch_size=8, out_dir=tmp_path, verbose=0, steps_per_epoch=3, soft_targets=True, accumulate=3))
    assert model.optimizer.gradient_accumulation_steps == 3 and int(model.optimizer.iterations) == 2  # 6 steps, 2 updates
    expected = keras.losses.SparseCategoricalCrossentropy()(labels, model.predict(images, verbose=0))
    assert history["val_loss"][-1] == pytest.approx(float(expected), rel=1e-4)  # validation on the plain labels


def test_curves_go_to_tensorboard_beside_the_run_cache_entry_not_into_it(tmp_path):
    import keras
    import tensorflow as tf

    from pipeline.core.runs import RunStore, curves_dir
    from pipeline.training.fit import FitOptions, Phase, fit

    expected = tmp_path / "work" / "synth" / "_tensorboard" / "cv-folds" / "0123456789abcdef" / "selection"
    with RunStore(tmp_path / "work" / "synth" / "_runs" / "cv-folds").write("0123456789abcdef") as writing:
        entry = writing / "selection"  # inside the temporary folder the store writes the entry in
        entry.mkdir()
        assert curves_dir(entry) == expected and curves_dir(tmp_path) is None
        rng = np.random.default_rng(0)
        x = rng.normal(size=(32, 4)).astype("float32")
        y = (x[:, 0] > 0).astype("int64")
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])
        fit(model, (x, y), (x, y), FitOptions(phases=[Phase(2, 0.01)], schedule="phases", optimizer="adam", momentum=0.9,
            batch_size=16, out_dir=entry, verbose=0, curves=True))
        assert not [p for p in entry.rglob("*") if "tfevents" in p.name]  # the entry's bytes stay the run's own
    events = [p for p in expected.rglob("*") if "tfevents" in p.name]
    tags = {value.tag for path in events for record in tf.data.TFRecordDataset(str(path))
            for value in tf.compat.v1.Event.FromString(record.numpy()).summary.value}
    assert {"epoch_loss", "epoch_accuracy", "epoch_learning_rate"} <= tags

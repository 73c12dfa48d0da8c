"""One trained model, start to finish: the recipes finetune and bnretrain run once and ensemble runs per member.

`train_model`: build the network `model.arch` names (`pipeline.models.build`) -> train it on the
split's training rows (plus augment's passes of them with `finetune.augmented`; augmented on the
fly when `finetune.augment` is set and the inputs are pixels; plus pseudo-labelled test rows, a
share of every batch, when a student is `taught`, see `pipeline.training.pseudo`) with the configured optimizer and
learning-rate schedule, keeping the best epoch by validation loss -> save the model, its history,
loss and confusion plots, and the valid/test probabilities (averaged over augment's test passes
with `tta`). `retrain_with_batchnorm`: the same for a trained head with batchnorm inserted
(`pipeline.models.batchnorm`) and the `bnretrain` settings. With `finetune.deterministic`
TensorFlow's op determinism is on, so the same config gives the same bytes. Config keys read here
must be declared by every stage that calls it: `model`, `finetune`, `precompute.backbone`,
`precompute.weights` (and `bnretrain`). Imports Keras.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from pipeline.core.artifacts import CONFUSION_PLOT, LOSS_PLOT, MEMBER_HEAD_DIR, MODEL_FILE
from pipeline.core.errors import PipelineError
from pipeline.data.features import SplitFeatures, load_split_features
from pipeline.models.scratch import LADDER

IDENTITY_TOLERANCE = 1e-4  # largest change of a validation probability batchnorm insertion may cause


def load_training_data(config, inputs: dict[str, Path], augmented: bool, tta: bool, sides=None) -> SplitFeatures:
    """The split's rows of precompute's arrays, with augment's passes when `augmented` / `tta` ask for them.

    Args:
        config: the calling stage's view of the config (reads `competition.classes`).
        inputs: upstream output folders by stage name (`precompute`, `split`, and `augment` when used).
        augmented: train on the clean rows plus every augmented pass of them.
        tta: average predictions over the clean rows and the augmented test passes.
        sides: (train, valid) row masks instead of the split's sides (`load_split_features`).
    """
    return load_split_features(inputs["precompute"], inputs["split"], config.competition.classes,
                               passes_dir=inputs.get("augment"), train_passes=augmented, tta=tta, sides=sides)


def load_recipe_data(config, inputs: dict[str, Path], sections: dict, sides=None) -> dict[str, SplitFeatures]:
    """`load_training_data` for each recipe's section (`augmented`, `tta`), loaded once per distinct pair."""
    loaded, data = {}, {}
    for name, section in sections.items():
        flags = (section.augmented, section.tta)
        if flags not in loaded:
            loaded[flags] = load_training_data(config, inputs, *flags, sides=sides)
        data[name] = loaded[flags]
    return data


def set_determinism(enabled: bool) -> None:
    """TensorFlow's op determinism on or off for this process (it is a process-wide switch)."""
    from tensorflow.python.framework import config as tf_config

    if enabled:
        tf_config.enable_op_determinism()
    else:
        tf_config.disable_op_determinism()


def train_model(config, data: SplitFeatures, seed: int, out_dir: Path, log=print, warn=print,
                title: str = "", verbose: int = 2, stop_after: int | None = None, teaching=None) -> dict:
    """Train one model with `seed` into `out_dir`.

    Args:
        config: the calling stage's view of the config.
        data: the split's rows of the cached features (or pixels).
        seed: weight initialisation, shuffling and augmentation draws.
        out_dir: where the model, history, plots and predictions go.
        stop_after: train this many epochs of the schedule and keep the last, never looking at the
            validation rows while training (they are only predicted); None: keep the best epoch by
            validation loss.
        teaching: a `pipeline.training.pseudo.Teaching`: also train on the test rows with the
            teacher's probabilities as soft labels, its share of every batch.

    Returns:
        Its metrics: the validation scores (`pipeline.evaluation.metrics.evaluate`), best epoch, timing.
    """
    import keras

    from pipeline.models.build import build_model
    from pipeline.training.augment import augmented_batches, build_augmenter
    from pipeline.training.fit import Phase, fit

    s = config.section("finetune")
    set_determinism(s.deterministic)
    keras.utils.set_random_seed(seed)
    model, arch = build_model(config, data.x_train.shape[1:], len(data.classes), warn)
    passes = f" (clean + {data.train_passes} augmented passes)" if data.train_passes else ""
    log(f"{arch}: {model.count_params():,} parameters, {len(data.x_train):,} train{passes} / {len(data.x_valid):,} "
        f"valid rows of {data.x_train.shape[1:]}, seed {seed}")
    train = (data.x_train, data.y_train)
    if s.augment:
        if arch not in LADDER:
            raise PipelineError("finetune.augment augments pixels, but this model trains on cached conv features "
                                "(precompute.backbone is not none); set finetune.augment: null")
        if teaching is not None:
            raise PipelineError("pseudo-labelling trains on cached rows; it cannot be combined with finetune.augment "
                                "(augmentation on the fly): set finetune.augment: null")
        augmenter = build_augmenter(s.augment, fill=float(np.min(data.x_train)))
        train = augmented_batches(data.x_train, data.y_train, s.batch_size, augmenter, seed)
    train, pseudo_rows = taught(train, data, teaching, s.batch_size, seed, log)

    start = time.perf_counter()
    history, best_epoch, _ = fit(
        model, train, (data.x_valid, data.y_valid), phases=[Phase(p.epochs, p.lr) for p in s.phases],
        schedule=s.schedule, optimizer=s.optimizer, momentum=s.momentum, batch_size=s.batch_size,
        out_dir=out_dir, verbose=verbose, warmup_epochs=s.warmup_epochs, stop_after=stop_after,
        soft_targets=teaching is not None,
    )
    train_seconds = time.perf_counter() - start
    metrics = {
        **finish_training(model, data, history, best_epoch, out_dir, f"{title} {arch}"),
        "train_seconds": round(train_seconds, 2),
        "seconds_per_epoch": round(train_seconds / max(1, len(history["loss"])), 3),
        "arch": arch,
        "augmented_on_the_fly": bool(s.augment),
        "deterministic": s.deterministic,
        "parameters": int(model.count_params()),
        "seed": seed,
        "n_train": len(data.x_train) // (data.train_passes + 1),
        "train_passes": data.train_passes,
        "n_valid": len(data.x_valid),
        **pseudo_rows,
    }
    return metrics


def taught(train, data: SplitFeatures, teaching, batch_size: int, seed: int, log):
    """`train` unchanged without `teaching`; with it, batches mixing the labelled rows with the taught
    test rows (`pipeline.training.pseudo.mixed_batches`) and the counts for the metrics."""
    if teaching is None:
        return train, {}
    from pipeline.training.pseudo import mixed_batches, pseudo_share

    pseudo = teaching.rows(data)
    share = pseudo_share(batch_size, teaching.weight)
    passes = f" ({len(pseudo.x):,} rows with their passes)" if len(pseudo.x) > teaching.keep.sum() else ""
    log(f"pseudo-labels: {int(teaching.keep.sum()):,} of {len(teaching.keep):,} test rows{passes}, "
        f"{share} added to every {batch_size} labelled rows")
    return (mixed_batches(data.x_train, data.y_train, pseudo, batch_size, teaching.weight, seed),
            {"pseudo_rows": int(teaching.keep.sum()), "pseudo_rows_with_passes": len(pseudo.x),
             "pseudo_per_batch": share})


def retrain_with_batchnorm(config, head, data: SplitFeatures, seed: int, out_dir: Path, log=print,
                           title: str = "", verbose: int = 2, stop_after: int | None = None,
                           teaching=None) -> dict:
    """Insert batchnorm into a trained dense head without changing a prediction, reset its dropout,
    and retrain it with the `bnretrain` settings into `out_dir`.

    Args:
        config: the calling stage's view of the config (reads `bnretrain`, `finetune.deterministic`).
        head: the trained Keras head (finetune's model).
        data: the rows to retrain on (the same features the head was trained on).
        seed: shuffling and dropout draws.
        out_dir: where the model, history, plots and predictions go.
        stop_after: as `train_model`'s.
        teaching: as `train_model`'s.

    Returns:
        Its metrics (as `train_model`'s), with `insertion_change`: the largest change of a validation
        probability the insertion caused (an error above `IDENTITY_TOLERANCE`).
    """
    import keras

    from pipeline.models.batchnorm import with_batchnorm
    from pipeline.models.inference import predict_in_chunks
    from pipeline.training.fit import Phase, fit

    s = config.section("bnretrain")
    before = predict_in_chunks(head, data.x_valid)
    model = with_batchnorm(head, data.x_train, dropout=s.dropout)
    change = float(np.abs(predict_in_chunks(model, data.x_valid) - before).max()) if len(before) else 0.0
    if change > IDENTITY_TOLERANCE:
        raise RuntimeError(f"inserting batchnorm changed a validation probability by {change:.2e}")
    log(f"batchnorm inserted after {sum(isinstance(l, keras.layers.BatchNormalization) for l in model.layers)} "
        f"hidden layers; largest change of a validation probability {change:.1e}; dropout -> {s.dropout}")
    set_determinism(config.get("finetune.deterministic"))
    keras.utils.set_random_seed(seed)
    train, pseudo_rows = taught((data.x_train, data.y_train), data, teaching, s.batch_size, seed, log)
    start = time.perf_counter()
    history, best_epoch, _ = fit(model, train, (data.x_valid, data.y_valid),
                                 phases=[Phase(p.epochs, p.lr) for p in s.phases], schedule="phases",
                                 optimizer=s.optimizer, momentum=0.9, batch_size=s.batch_size, out_dir=out_dir,
                                 verbose=verbose, stop_after=stop_after, soft_targets=teaching is not None)
    seconds = time.perf_counter() - start
    return {
        **finish_training(model, data, history, best_epoch, out_dir, f"{title} + batchnorm"),
        "insertion_change": change,
        "dropout": s.dropout,
        "seconds_per_epoch": round(seconds / max(1, len(history["loss"])), 3),
        "seed": seed,
        "train_passes": data.train_passes,
        **pseudo_rows,
    }


def train_recipe(config, source: str, data: dict[str, SplitFeatures], seed: int, out_dir: Path, log=print,
                 warn=print, title: str = "", stop_after: dict[str, int] | None = None, teaching=None) -> dict:
    """One model by a stage's recipe into `out_dir`: finetune's, or finetune's then bnretrain's on its
    head (kept in `out_dir/head/`), as ensemble members and fold models are trained.

    Args:
        config: the calling stage's view of the config (reads what both recipes read).
        source: finetune | bnretrain.
        data: the rows each recipe trains on, by recipe name (each with its own passes / TTA).
        seed: the model's seed.
        out_dir: where the final model, history, plots and predictions go.
        stop_after: epochs per recipe name (see `train_model`); None: best epoch by validation loss.
        teaching: pseudo-labels for every step of the recipe (see `train_model`).

    Returns:
        The final model's metrics; for bnretrain also finetune's `finetune_val_log_loss`,
        `finetune_val_accuracy` and `finetune_best_epoch`.
    """
    import keras

    stop_after = stop_after or {}
    if source == "finetune":
        return train_model(config, data["finetune"], seed, out_dir, log, warn, title=title, verbose=0,
                           stop_after=stop_after.get("finetune"), teaching=teaching)
    (out_dir / MEMBER_HEAD_DIR).mkdir()
    head = train_model(config, data["finetune"], seed, out_dir / MEMBER_HEAD_DIR, log, warn, title=title, verbose=0,
                       stop_after=stop_after.get("finetune"), teaching=teaching)
    metrics = retrain_with_batchnorm(config, keras.models.load_model(out_dir / MEMBER_HEAD_DIR / MODEL_FILE),
                                     data["bnretrain"], seed, out_dir, log, title=title, verbose=0,
                                     stop_after=stop_after.get("bnretrain"), teaching=teaching)
    return {**metrics, "arch": head["arch"], "finetune_val_log_loss": head["val_log_loss"],
            "finetune_val_accuracy": head["val_accuracy"], "finetune_best_epoch": head["best_epoch"]}


def finish_training(model, data: SplitFeatures, history: dict, best_epoch: int, out_dir: Path, title: str) -> dict:
    """What every trained model leaves behind: `model.keras`, the valid/test probabilities, `loss.png`
    and `confusion.png` in `out_dir`. With augmented passes of the validation and test rows (`tta`)
    the probabilities are the mean over the clean rows and every pass, on both sides alike, so the
    validation score measures what is submitted.

    Returns:
        The validation scores (`evaluate`), the best epoch (1-based) and the number of epochs; with
        TTA also `tta_passes`, the scores without it (`*_no_tta`) and `tta_log_loss_gain`.
    """
    from pipeline.evaluation.predictions import Predictions
    from pipeline.models.inference import predict_averaged

    model.save(out_dir / MODEL_FILE)
    valid_probs, valid_each = predict_averaged(model, [data.x_valid, *data.valid_passes])
    test_probs, _ = predict_averaged(model, [data.x_test, *data.test_passes])
    predictions = Predictions(data.valid_ids, data.y_valid, valid_probs, data.test_ids, test_probs)
    return record_training(predictions, valid_each, data.classes, history, best_epoch, out_dir, title)


def record_training(predictions, valid_each: list[np.ndarray], classes: list[str], history: dict, best_epoch: int,
                    out_dir: Path, title: str) -> dict:
    """What every trained model leaves besides itself: the probabilities, `loss.png` and `confusion.png`.

    Args:
        predictions: the validation and test probabilities (with TTA: the mean over the versions).
        valid_each: the validation probabilities of each version (the clean rows first); one entry: no TTA.
        classes: the class names.
        history: the training history (`loss`, `val_loss`, ... per epoch).
        best_epoch: the kept epoch (0-based).
        out_dir: where the files go.
        title: the plots' title.

    Returns:
        The validation scores (`evaluate`), the best epoch (1-based) and the number of epochs; with
        TTA also `tta_passes`, the scores without it (`*_no_tta`) and `tta_log_loss_gain`.
    """
    from pipeline.evaluation.metrics import evaluate
    from pipeline.evaluation.plots import plot_confusion, plot_history
    from pipeline.evaluation.predictions import save_predictions

    save_predictions(out_dir, predictions)
    y_valid, valid_probs = predictions.valid_labels, predictions.valid_probs
    scores = evaluate(y_valid, valid_probs)
    if len(valid_each) > 1:
        clean = evaluate(y_valid, valid_each[0])
        scores = {**scores, "tta_passes": len(valid_each) - 1,
                  **{f"{name}_no_tta": value for name, value in clean.items()},
                  "tta_log_loss_gain": round(clean["val_log_loss"] - scores["val_log_loss"], 5)}
    heading = f"{title}: val loss {scores['val_log_loss']:.4f}, acc {scores['val_accuracy']:.4f}"
    plot_history(history, out_dir / LOSS_PLOT, heading)
    plot_confusion(y_valid, np.argmax(valid_probs, axis=1), classes, out_dir / CONFUSION_PLOT, heading)
    return {**scores, "best_epoch": best_epoch + 1, "epochs": len(history["loss"])}

"""One trained model, start to finish: the recipe finetune runs once and ensemble runs per member.

build the network `model.arch` names (`pipeline.models.build`) -> train it on the split's training
rows (augmented when `finetune.augment` is set and the inputs are pixels) with the configured
optimizer and learning-rate schedule, keeping the best epoch by validation loss -> save the model,
its history, loss and confusion plots, and the valid/test probabilities. With
`finetune.deterministic` TensorFlow's op determinism is on, so the same config gives the same bytes.
Config keys read here must be declared by every stage that calls it (finetune, ensemble): `model`,
`finetune`, `precompute.backbone`, `precompute.weights`. Imports Keras.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from pipeline.core.artifacts import CONFUSION_PLOT, LOSS_PLOT, MODEL_FILE
from pipeline.core.errors import PipelineError
from pipeline.data.features import SplitFeatures
from pipeline.models.scratch import LADDER


def set_determinism(enabled: bool) -> None:
    """TensorFlow's op determinism on or off for this process (it is a process-wide switch)."""
    from tensorflow.python.framework import config as tf_config

    if enabled:
        tf_config.enable_op_determinism()
    else:
        tf_config.disable_op_determinism()


def train_model(config, data: SplitFeatures, seed: int, out_dir: Path, log=print, warn=print,
                title: str = "", verbose: int = 2) -> dict:
    """Train one model with `seed` into `out_dir`.

    Args:
        config: the calling stage's view of the config.
        data: the split's rows of the cached features (or pixels).
        seed: weight initialisation, shuffling and augmentation draws.
        out_dir: where the model, history, plots and predictions go.

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
    log(f"{arch}: {model.count_params():,} parameters, {len(data.x_train):,} train / {len(data.x_valid):,} "
        f"valid rows of {data.x_train.shape[1:]}, seed {seed}")
    train = (data.x_train, data.y_train)
    if s.augment:
        if arch not in LADDER:
            raise PipelineError("finetune.augment augments pixels, but this model trains on cached conv features "
                                "(precompute.backbone is not none); set finetune.augment: null")
        augmenter = build_augmenter(s.augment, fill=float(np.min(data.x_train)))
        train = augmented_batches(data.x_train, data.y_train, s.batch_size, augmenter, seed)

    start = time.perf_counter()
    history, best_epoch, _ = fit(
        model, train, (data.x_valid, data.y_valid), phases=[Phase(p.epochs, p.lr) for p in s.phases],
        schedule=s.schedule, optimizer=s.optimizer, momentum=s.momentum, batch_size=s.batch_size,
        out_dir=out_dir, verbose=verbose, warmup_epochs=s.warmup_epochs,
    )
    train_seconds = time.perf_counter() - start
    metrics = {
        **finish_training(model, data, history, best_epoch, out_dir, f"{title} {arch}"),
        "train_seconds": round(train_seconds, 2),
        "seconds_per_epoch": round(train_seconds / max(1, len(history["loss"])), 3),
        "arch": arch,
        "augmented": bool(s.augment),
        "deterministic": s.deterministic,
        "parameters": int(model.count_params()),
        "seed": seed,
        "n_train": len(data.x_train),
        "n_valid": len(data.x_valid),
    }
    return metrics


def finish_training(model, data: SplitFeatures, history: dict, best_epoch: int, out_dir: Path, title: str) -> dict:
    """What every trained model leaves behind: `model.keras`, the valid/test probabilities, `loss.png`
    and `confusion.png` in `out_dir`.

    Returns:
        The validation scores (`evaluate`), the best epoch (1-based) and the number of epochs.
    """
    from pipeline.evaluation.metrics import evaluate
    from pipeline.evaluation.plots import plot_confusion, plot_history
    from pipeline.evaluation.predictions import Predictions, save_predictions
    from pipeline.models.inference import predict_in_chunks

    model.save(out_dir / MODEL_FILE)
    valid_probs = predict_in_chunks(model, data.x_valid)
    test_probs = predict_in_chunks(model, data.x_test)
    save_predictions(out_dir, Predictions(data.valid_ids, data.y_valid, valid_probs, data.test_ids, test_probs))
    scores = evaluate(data.y_valid, valid_probs)
    heading = f"{title}: val loss {scores['val_log_loss']:.4f}, acc {scores['val_accuracy']:.4f}"
    plot_history(history, out_dir / LOSS_PLOT, heading)
    plot_confusion(data.y_valid, np.argmax(valid_probs, axis=1), data.classes, out_dir / CONFUSION_PLOT, heading)
    return {**scores, "best_epoch": best_epoch + 1, "epochs": len(history["loss"])}

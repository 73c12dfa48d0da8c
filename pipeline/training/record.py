"""What every trained model leaves behind, whichever recipe trained it: the model, its probabilities, its scores.

`finish` saves the model and its validation and test probabilities (with augmented passes of the
validation and test rows, `tta`, the mean over the clean rows and every pass, on both sides alike,
so the validation score measures what is submitted) and returns its scores; `record` does the same
for probabilities computed elsewhere (the tune recipe's image stream). Nothing here draws: the
stages draw `loss.png` and `confusion.png` from these files (`pipeline.evaluation.model_outputs`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.core.artifacts import MODEL_FILE


def set_determinism(enabled: bool) -> None:
    """TensorFlow's op determinism on or off for this process (it is a process-wide switch)."""
    from tensorflow.python.framework import config as tf_config

    if enabled:
        tf_config.enable_op_determinism()
    else:
        tf_config.disable_op_determinism()


def finish(model, data, history: dict, best_epoch: int, out_dir: Path) -> dict:
    """Save `model` (`model.keras`) and its probabilities on `data`'s validation and test rows into `out_dir`.

    Args:
        model: the trained Keras model (its best epoch's weights).
        data: a `pipeline.data.features.SplitFeatures`.
        history: the training history (`loss`, `val_loss`, ... per epoch).
        best_epoch: the kept epoch (0-based).
        out_dir: where the files go.

    Returns:
        As `record`.
    """
    from pipeline.evaluation.predictions import Predictions
    from pipeline.models.inference import predict_averaged

    model.save(out_dir / MODEL_FILE)
    valid_probs, valid_each = predict_averaged(model, [data.x_valid, *data.valid_passes])
    test_probs, _ = predict_averaged(model, [data.x_test, *data.test_passes])
    predictions = Predictions(data.valid_ids, data.y_valid, valid_probs, data.test_ids, test_probs)
    return record(predictions, valid_each, history, best_epoch, out_dir)


def record(predictions, valid_each: list[np.ndarray], history: dict, best_epoch: int, out_dir: Path) -> dict:
    """Save the probabilities into `out_dir` and score them.

    Args:
        predictions: the validation and test probabilities (with TTA: the mean over the versions).
        valid_each: the validation probabilities of each version (the clean rows first); one entry: no TTA.
        history: the training history.
        best_epoch: the kept epoch (0-based).
        out_dir: where the files go.

    Returns:
        The validation scores (`evaluate`), the best epoch (1-based) and the number of epochs; with
        TTA also `tta_passes`, the scores without it (`*_no_tta`) and `tta_log_loss_gain`.
    """
    from pipeline.evaluation.metrics import evaluate
    from pipeline.evaluation.predictions import save_predictions

    save_predictions(out_dir, predictions)
    scores = evaluate(predictions.valid_labels, predictions.valid_probs)
    if len(valid_each) > 1:
        clean = evaluate(predictions.valid_labels, valid_each[0])
        scores = {**scores, "tta_passes": len(valid_each) - 1,
                  **{f"{name}_no_tta": value for name, value in clean.items()},
                  "tta_log_loss_gain": round(clean["val_log_loss"] - scores["val_log_loss"], 5)}
    return {**scores, "best_epoch": best_epoch + 1, "epochs": len(history["loss"])}

"""Inference with a built model: a compiled forward pass for precompute, chunked prediction for heads,
and its average over augmented versions of the rows (test-time augmentation).

Imports TensorFlow / Keras inside the functions only.
"""
from __future__ import annotations

import numpy as np


def compiled_forward(model):
    """The model's inference as a tf.function: faster than model.predict on these CPUs (see README)."""
    import tensorflow as tf

    return tf.function(lambda images: model(images, training=False), reduce_retracing=True)


def predict_in_chunks(model, x, chunk: int = 2048) -> np.ndarray:
    """Predict over a (possibly memory-mapped) array a slice at a time: memory stays flat.

    Args:
        model: a Keras model.
        x: an (n, ...) array; read `chunk` rows at a time.
        chunk: rows per call.

    Returns:
        (n, k) float32 outputs.
    """
    parts = [np.asarray(model.predict_on_batch(np.asarray(x[i:i + chunk], dtype=np.float32)))
             for i in range(0, len(x), chunk)]
    return np.concatenate(parts) if parts else np.zeros((0, model.output_shape[-1]), np.float32)


def predict_averaged(model, versions: list) -> tuple[np.ndarray, list[np.ndarray]]:
    """Test-time augmentation: the mean of the model's outputs over versions of the same rows.

    Args:
        model: a Keras model.
        versions: arrays of the same rows in the same order (the clean rows, then augmented passes).

    Returns:
        (the mean over versions, each version's own outputs).
    """
    each = [predict_in_chunks(model, x) for x in versions]
    return np.mean(each, axis=0, dtype=np.float64).astype(np.float32), each

"""Mixup (Zhang et al., 2018): each training row blended with another row of its batch, the targets alike.

On cached feature rows (`finetune.mixup`) the batches are made here (`MixedRows`); on images in tune
(`tune.mixup`, `tune.cutmix`) Keras' own `MixUp` and `CutMix` layers mix each streamed batch
(`image_mixer`). Either way the targets become probability rows, so the model trains on categorical
cross-entropy against soft targets while the validation rows keep their plain labels.
"""
from __future__ import annotations

import math

import numpy as np


def mixed_rows(x: np.ndarray, y: np.ndarray, classes: int, batch_size: int, alpha: float, seed: int):
    """Training batches of `x` mixed within each batch: a keras PyDataset (`fit` shuffles their order).

    Args:
        x: the training rows.
        y: their class indices.
        classes: the number of classes.
        batch_size: rows per batch.
        alpha: each row's weight is drawn from Beta(alpha, alpha) (0.2-0.4 is usual); its partner is
            another row of the batch, which gets 1 - weight.
        seed: the rows of each batch and the draws come from (seed, epoch, batch).

    Returns:
        A `keras.utils.PyDataset` of (rows, target probabilities).
    """
    import keras

    class MixedRows(keras.utils.PyDataset):
        def __init__(self):
            super().__init__()
            self.epoch = 0

        def __len__(self):
            return math.ceil(len(x) / batch_size)

        def __getitem__(self, index):
            order = np.random.default_rng([seed, self.epoch]).permutation(len(x))
            rows = np.sort(order[index * batch_size:(index + 1) * batch_size])
            draw = np.random.default_rng([seed, self.epoch, index + 1])
            weight = draw.beta(alpha, alpha, size=len(rows)).astype(np.float32)
            partner = draw.permutation(len(rows))
            features, targets = np.asarray(x[rows], np.float32), np.eye(classes, dtype=np.float32)[y[rows]]
            shape = (-1,) + (1,) * (features.ndim - 1)
            mixed = weight.reshape(shape) * features + (1 - weight.reshape(shape)) * features[partner]
            return mixed, weight[:, None] * targets + (1 - weight[:, None]) * targets[partner]

        def on_epoch_end(self):
            self.epoch += 1

    return MixedRows()


def image_mixer(mixup: float | None, cutmix: float | None, classes: int, seed: int):
    """A function for `dataset.map` on (images, class indices) batches: Keras' CutMix (`cutmix`: its
    factor) then MixUp (`mixup`: its alpha), each when set, labels turned into mixed probability rows;
    None when neither is set."""
    if mixup is None and cutmix is None:
        return None
    import keras
    import tensorflow as tf

    layers = ([keras.layers.CutMix(factor=cutmix, seed=seed)] if cutmix is not None else []) + \
        ([keras.layers.MixUp(alpha=mixup, seed=seed + 1)] if mixup is not None else [])

    def mix(images, labels):
        batch = {"images": images, "labels": tf.one_hot(labels, classes)}
        for layer in layers:
            batch = layer(batch, training=True)
        return batch["images"], batch["labels"]

    return mix

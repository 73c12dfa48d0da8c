"""The scratch recipe (finetune's, for a model on pixels): the course's MNIST ladder, trained from nothing.

What the head recipe does, for the from-scratch models of `model.arch` (linear, hidden, cnn,
cnn_bn, cnn_bn_do, cnn_strided) on precompute's normalised pixels (`precompute.backbone: none`), which may also
be augmented on the fly (`finetune.augment`: random affine changes drawn per batch from the seed,
training rows only). The head recipe hands over to it when `model.arch` names such a model; its
settings are finetune's, its epochs are counted as its own. Imports Keras inside the functions.
"""
from __future__ import annotations

import numpy as np

from pipeline.core.config_reader import ConfigReader
from pipeline.training.recipes.base import Recipe
from pipeline.training.recipes.head import HeadRecipe


class ScratchRecipe(HeadRecipe):
    """finetune's recipe for a from-scratch model on pixels."""

    name = "scratch"
    section = "finetune"
    takes = "pixels"
    reads = ("model", "precompute.backbone", "training.deterministic", "competition.classes")

    def resolved(self, config: ConfigReader) -> Recipe:
        return self

    def batches(self, config: ConfigReader, data, seed: int):
        """The training rows, augmented on the fly when `finetune.augment` is set."""
        from pipeline.training.augment import augmented_batches, build_augmenter

        s = self.settings(config)
        if not s.augment:
            return data.x_train, data.y_train
        augmenter = build_augmenter(s.augment, fill=float(np.min(data.x_train)))
        return augmented_batches(data.x_train, data.y_train, s.batch_size, augmenter, seed)


RECIPE = ScratchRecipe()

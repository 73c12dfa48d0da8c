"""Training-time augmentation for from-scratch models, through albumentations, on train rows only.

The config's `finetune.augment` ({rotate, shift, shear, zoom, flip}) becomes an albumentations
`Affine` (+ `HorizontalFlip` when `flip`; never for digits). `AugmentedBatches` feeds Keras: it
shuffles and augments the training arrays batch by batch, reseeding albumentations per batch from
(seed, epoch, batch), so runs repeat exactly and no two batches share their random draws. Valid and
test arrays never pass through here. Imports albumentations and Keras.
"""
from __future__ import annotations

import os

import numpy as np

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no PyPI check at import


def build_augmenter(settings, fill: float):
    """An albumentations Compose from the `finetune.augment` settings (rotate, shift, shear, zoom,
    flip); `fill` is the background value of the (normalised) images."""
    import albumentations as A

    rotate, shift, shear, zoom = settings.rotate, settings.shift, settings.shear, settings.zoom
    transforms = [A.Affine(rotate=(-rotate, rotate), translate_percent=(-shift, shift), shear=(-shear, shear),
                           scale=(1 - zoom, 1 + zoom), fill=fill, border_mode=0, p=1.0)]
    if settings.flip:
        transforms.append(A.HorizontalFlip(p=0.5))
    return A.Compose(transforms)


def augmented_batches(x: np.ndarray, y: np.ndarray, batch_size: int, augmenter, seed: int):
    """A keras.utils.PyDataset of shuffled, augmented (images, labels) batches."""
    import keras

    class AugmentedBatches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__(workers=1, use_multiprocessing=False)
            self.epoch = 0
            self.order = np.random.default_rng([seed, 0]).permutation(len(x))

        def __len__(self):
            return int(np.ceil(len(x) / batch_size))

        def __getitem__(self, batch):
            rows = self.order[batch * batch_size:(batch + 1) * batch_size]
            augmenter.set_random_seed(int(np.random.default_rng([seed, self.epoch, batch]).integers(2**31)))
            images = np.stack([augmenter(image=np.asarray(x[r], dtype=np.float32))["image"] for r in rows])
            return images.reshape((len(rows), *x.shape[1:])), y[rows]

        def on_epoch_end(self):
            self.epoch += 1
            self.order = np.random.default_rng([seed, self.epoch]).permutation(len(x))

    return AugmentedBatches()

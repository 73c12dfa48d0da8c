"""precompute's frozen network as one object: image files in, feature rows out (the augment stage reuses it).

`build_extractor` builds the backbone the `precompute` section names, cut where it says, with a
compiled forward pass and the backbone's preprocessing; `Extractor.write` streams image files
through the parallel decoder (optionally augmenting each decoded image) into a memory-mapped
`.npy` and returns its throughput. Imports TensorFlow / Keras inside the functions only.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

RANDOM_WEIGHTS_SEED = 0  # `weights: none`: the same random network in every run


@dataclass
class Extractor:
    """A frozen feature network ready to run over image files."""

    name: str
    forward: Callable  # preprocessed image batch -> feature batch (compiled)
    preprocess: Callable | None  # RGB 0..255 -> what the network expects; None: feed 0..255
    row_shape: tuple[int, ...]
    size: tuple[int, int]  # (height, width) images are decoded at
    dtype: str  # storage dtype of the rows
    batch_size: int

    def write(self, paths: list[Path], out: Path, progress=None, augment=None) -> dict:
        """Write one feature row per image of `paths`, in order, into `out` (.npy).

        Args:
            paths: image files.
            out: the array to write (memory-mapped, never held in memory).
            progress: a tqdm-like bar updated per batch, or None.
            augment: `augment(image, row)` applied to each decoded uint8 image before preprocessing.

        Returns:
            {"images", "seconds", "images_per_s"} of this run.
        """
        from pipeline.data.features import write_features

        start = time.perf_counter()
        write_features(self.forward, paths, out, self.row_shape, self.dtype, self.size, self.batch_size,
                       self.preprocess, progress=progress, augment=augment)
        seconds = time.perf_counter() - start
        return {"images": len(paths), "seconds": round(seconds, 2),
                "images_per_s": round(len(paths) / max(seconds, 1e-9), 1)}


def build_extractor(settings, root: Path, size: tuple[int, int]) -> Extractor:
    """The network of a `precompute` config section.

    Args:
        settings: the `precompute` section (backbone, alpha, weights, cut, preprocess, dtype, batch_size).
        root: the project root, against which a relative weights path resolves.
        size: (height, width) of the images.

    Returns:
        An `Extractor`. With `weights: none` its random weights come from a fixed seed, so that
        precompute and augment, in separate runs, build the same network.
    """
    import keras

    from pipeline.models.backbones import build_feature_model, resolve_weights
    from pipeline.models.inference import compiled_forward

    height, width = size
    weights = resolve_weights(settings.weights, root)
    if weights is None:
        keras.utils.set_random_seed(RANDOM_WEIGHTS_SEED)
    features = build_feature_model(settings.backbone, weights, (height, width, 3), settings.cut, settings.alpha)
    return Extractor(
        name=features.name,
        forward=compiled_forward(features.model),
        preprocess=features.preprocess if settings.preprocess == "backbone" else None,
        row_shape=tuple(int(d) for d in features.model.output.shape[1:]),
        size=(height, width),
        dtype=settings.dtype,
        batch_size=settings.batch_size,
    )

"""precompute's frozen network as one object: image files in, feature rows out (the augment stage reuses it).

`build_extractor` builds the backbone the `precompute` section names, cut where it says, with a
compiled forward pass run as the `compute` section's device plan says (`pipeline.models.device`:
on a GPU mixed precision, XLA, uint8 pixels, device prefetch) and the backbone's preprocessing;
`Extractor.write` streams image files through the parallel decoder (optionally augmenting each
decoded image) into a memory-mapped `.npy` and returns its throughput and the plan it ran with.
Imports TensorFlow / Keras inside the functions only.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.artifacts import SHARD_FILE
from pipeline.core.config_reader import ConfigReader
from pipeline.core.errors import PipelineError
from pipeline.models.inference import Forward

RANDOM_WEIGHTS_SEED = 0  # `weights: none`: the same random network in every run


@dataclass
class Extractor:
    """A frozen feature network ready to run over image files."""

    name: str
    forward: Forward  # image batches (as `forward.batches` streams them) -> feature rows (compiled)
    row_shape: tuple[int, ...]
    size: tuple[int, int]  # (height, width) images are decoded at
    dtype: str  # storage dtype of the rows

    def write(self, paths: list[Path], out: Path, progress=None, augment=None) -> dict:
        """Write one feature row per image of `paths`, in order, into `out` (.npy).

        Args:
            paths: image files.
            out: the array to write (memory-mapped, never held in memory).
            progress: a tqdm-like bar updated per batch, or None.
            augment: `augment(image, row)` applied to each decoded uint8 image before preprocessing.

        Returns:
            {"images", "seconds", "images_per_s", "batch_size"} of this run.
        """
        from pipeline.data.features import write_features

        start = time.perf_counter()
        write_features(self.forward, paths, out, self.row_shape, self.dtype, self.size, progress=progress,
                       augment=augment)
        seconds = time.perf_counter() - start
        return {"images": len(paths), "seconds": round(seconds, 2),
                "images_per_s": round(len(paths) / max(seconds, 1e-9), 1), "batch_size": self.forward.batch_size}

    def device(self) -> dict:
        """The device plan the forward pass runs with, its batch size resolved (for `meta.json`)."""
        return {**self.forward.plan.record(), "batch_size": self.forward.batch_size}


def feature_size(config: ConfigReader) -> tuple[int, int]:
    """(height, width) precompute feeds its network: `precompute.image_size`, else `competition.image_size`
    (a feature set of `features` may set its own, e.g. 260x260 for EfficientNet-Lite2)."""
    return tuple(config.get("precompute.image_size") or config.competition.image_size)


def build_extractor(settings, root: Path, size: tuple[int, int], compute=None) -> Extractor:
    """The network of a `precompute` config section.

    Args:
        settings: the `precompute` section (backbone, alpha, weights, cut, preprocess, dtype, batch_size).
        root: the project root, against which a relative weights path resolves.
        size: (height, width) of the images.
        compute: the `compute` section (its device settings), or None: all `auto`.

    Returns:
        An `Extractor`. With `weights: none` its random weights come from a fixed seed, so that
        precompute and augment, in separate runs, build the same network.
    """
    import keras

    from pipeline.models.backbones import build_feature_model, resolve_weights
    from pipeline.models.device import plan_device, precision_scope

    height, width = size
    plan = plan_device(compute, settings.batch_size)
    weights = resolve_weights(settings.weights, root)
    if weights is None:
        keras.utils.set_random_seed(RANDOM_WEIGHTS_SEED)
    with precision_scope(plan.precision):
        features = build_feature_model(settings.backbone, weights, (height, width, 3), settings.cut, settings.alpha,
                                       settings.preprocess, root)
    return Extractor(
        name=features.name,
        forward=Forward(features.model, plan, features.preprocess),
        row_shape=tuple(int(d) for d in features.model.output.shape[1:]),
        size=(height, width),
        dtype=settings.dtype,
    )


def write_shard(config: ConfigReader, inputs: dict, paths: list[str], weights_stamp: str, out: Path) -> dict:
    """A unit of precompute: one shard's feature rows into `out` (here or on a Ray worker, whose images
    must be visible there). `weights_stamp` names the weights file's version (the stage's stamp of it):
    the shards of one run share the network built for the first, a replaced file builds it anew.
    Returns its record: the network's name, row shape, image size, device and timing."""
    import socket
    import sys

    from tqdm import tqdm

    if paths and not Path(paths[0]).is_file():
        raise PipelineError(f"this worker ({socket.gethostname()}) cannot see the images ({paths[0]}): the work "
                            "folder must be on a filesystem every Ray worker shares, at the same path")
    extractor = _process_extractor(config.section("precompute"), config.root, feature_size(config), config.compute,
                                   weights_stamp)
    with tqdm(total=len(paths), desc="images", unit="img", leave=False, file=sys.stderr,
              disable=not sys.stderr.isatty()) as bar:  # beside the shards' bar on a terminal; off on Ray workers
        timing = extractor.write([Path(p) for p in paths], out / SHARD_FILE, progress=bar)
    return {"name": extractor.name, "shape": list(extractor.row_shape), "size": list(extractor.size),
            "device": extractor.device(), **timing}


_BUILT: dict[str, Extractor] = {}  # this process's last extractor: a stage's shards share one network


def _process_extractor(settings, root: Path, size: tuple[int, int], compute, weights_stamp: str) -> Extractor:
    """`build_extractor`, built once per process for the same settings and weights (this process's own device)."""
    key = "|".join((settings.model_dump_json(), str(root), str(size), compute.model_dump_json() if compute else "",
                    weights_stamp))
    if key not in _BUILT:
        _BUILT.clear()
        _BUILT[key] = build_extractor(settings, root, size, compute)
    return _BUILT[key]

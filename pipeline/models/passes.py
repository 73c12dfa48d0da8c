"""Augmented passes over a competition's images: where a pass's images come from, and one pass as a unit.

`pass_source` gives the images of both subsets (train, test): the image files decoded and pushed
through precompute's network (`ImageSource`), or precompute's normalised pixels turned back into
0..255 images (`PixelSource`, `precompute.backbone: none`). `write_pass` writes one pass (the
augment stage's unit): every image of a subset augmented by albumentations, row r drawn from the
seed (seed, subset, pass, r), through the source into a memory-mapped `.npy`.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from pipeline.core.artifacts import INDEX_FILE, META_FILE, RAW_DIR, array_file, rows_file
from pipeline.core.config_reader import ConfigReader

SUBSETS = ("train", "test")
PASS_READS = ("augment.transforms", "precompute", "competition.image_size")  # what a pass reads of the config


def write_pass(config: ConfigReader, inputs: dict, subset: str, number: int, seed: tuple, out: Path) -> dict:
    """One augmented pass into `out` (here or on a Ray worker): the array; returns its record."""
    from tqdm import tqdm

    from pipeline.data.augmentation import RowAugmenter

    source = pass_source(config, inputs)
    return {"subset": subset, "pass": number, "seed": list(seed),
            **source.write(subset, RowAugmenter(config.section("augment").transforms, seed), out / array_file(subset),
                           tqdm(disable=True))}


def pass_source(config: ConfigReader, inputs: dict):
    """Where a pass's images come from: the image files, or precompute's pixels (`backbone: none`)."""
    return (PixelSource if config.get("precompute.backbone") == "none" else ImageSource)(config, inputs)


def _spread_rows(count: int, n: int) -> list[int]:
    """Up to `n` row numbers spread evenly over `count` rows (the preview's images)."""
    return sorted({round(i * (count - 1) / max(n - 1, 1)) for i in range(n)})


class ImageSource:
    """Image files, decoded and augmented on the way into precompute's network."""

    def __init__(self, config: ConfigReader, inputs: dict):
        from pipeline.data.features import check_same_ids, read_rows
        from pipeline.data.index import read_index

        self.config = config
        index = read_index(inputs["download"] / INDEX_FILE)
        raw = inputs["download"] / RAW_DIR
        self.paths = {subset: [raw / p for p in index.loc[index.subset == subset, "path"]] for subset in SUBSETS}
        for subset in SUBSETS:  # the passes must follow precompute's rows, which follow the index
            check_same_ids(index.loc[index.subset == subset, "id"].to_numpy(),
                           read_rows(inputs["precompute"], subset)["id"].to_numpy(),
                           str(inputs["download"] / INDEX_FILE), str(inputs["precompute"] / rows_file(subset)))
        self.precompute = json.loads((inputs["precompute"] / META_FILE).read_text())
        self._extractor = None

    def count(self, subset: str) -> int:
        return len(self.paths[subset])

    def write(self, subset: str, augmenter, out, progress) -> dict:
        if self._extractor is None:
            from pipeline.models.extractor import build_extractor, feature_size

            self._extractor = build_extractor(self.config.section("precompute"), self.config.root,
                                              feature_size(self.config), self.config.compute)
        return {**self._extractor.write(self.paths[subset], out, progress=progress, augment=augmenter),
                "device": self._extractor.device()}

    def preview_images(self, n: int):
        import numpy as np

        from pipeline.data.images import checked_batches
        from pipeline.models.extractor import feature_size

        rows = _spread_rows(self.count("train"), n)
        paths = [self.paths["train"][r] for r in rows]
        batch = next(iter(checked_batches(paths, feature_size(self.config), len(paths))))
        return rows, [np.clip(np.round(image), 0, 255).astype(np.uint8) for image in np.asarray(batch)]

    def speed(self, passes: list[dict]) -> dict:
        """Images/s of the passes computed now (median) against precompute's on the same subset."""
        ratios = [p["images_per_s"] / self.precompute["timings"][p["subset"]]["images_per_s"]
                  for p in passes if not p["reused"]]
        rates = [p["images_per_s"] for p in passes if not p["reused"]]
        return {"images_per_s": round(statistics.median(rates), 1) if rates else None,
                "speed_vs_precompute": round(statistics.median(ratios), 3) if ratios else None}


class PixelSource:
    """precompute's normalised pixels (`backbone: none`), augmented as 0..255 images."""

    def __init__(self, config: ConfigReader, inputs: dict):
        from pipeline.data.arrays import load_array

        meta = json.loads((inputs["precompute"] / META_FILE).read_text())
        self.mean, self.std = meta["mean"], meta["std"]
        self.arrays = {subset: load_array(inputs["precompute"] / array_file(subset)) for subset in SUBSETS}

    def count(self, subset: str) -> int:
        return len(self.arrays[subset])

    def _images(self, x):
        import numpy as np

        return np.clip(np.round(np.asarray(x, np.float32) * self.std + self.mean), 0, 255).astype(np.uint8)

    def write(self, subset: str, augmenter, out, progress) -> dict:
        import time

        import numpy as np

        from pipeline.data.arrays import ChunkedArrayWriter

        source, start = self.arrays[subset], time.perf_counter()
        with ChunkedArrayWriter(out, len(source), source.shape[1:], source.dtype) as writer, progress:
            for first in range(0, len(source), 1024):
                images = self._images(source[first:first + 1024])
                changed = np.stack([augmenter(image, first + i) for i, image in enumerate(images)])
                writer.append(((changed.astype(np.float32) - self.mean) / self.std).astype(source.dtype))
                progress.update(len(images))
        seconds = time.perf_counter() - start
        return {"images": len(source), "seconds": round(seconds, 2),
                "images_per_s": round(len(source) / max(seconds, 1e-9), 1)}

    def preview_images(self, n: int):
        rows = _spread_rows(self.count("train"), n)
        return rows, list(self._images(self.arrays["train"][rows]))

    def speed(self, passes: list[dict]) -> dict:
        rates = [p["images_per_s"] for p in passes if not p["reused"]]
        return {"images_per_s": round(statistics.median(rates), 1) if rates else None, "speed_vs_precompute": None}



"""augment: K augmented passes over every training image and T over the test images, cached as features.

The course's State Farm recipe: push a few augmented copies of every image through the frozen
conv base once, then train heads on them in seconds instead of augmenting on the fly through the
network every epoch.

Recipe: for pass k = 1..K over the training images (train and future-valid rows alike: later
stages select rows by the split, so a validation image's augmented copy never reaches training)
and k = 1..T over the test images (for test-time augmentation): reuse the pass if one with the
same inputs, transforms, seed and number was computed before (each pass is its own cached unit,
`work/COMP/_runs/augment-passes/KEY/`, so raising K from 5 to 8 computes 3 and a killed run keeps
the passes it finished), else stream the images through precompute's parallel decoder, the
albumentations `transforms` (row r of pass k drawn from the seed (seed, subset, k, r): the same
config gives the same arrays), the backbone's preprocessing and its compiled forward pass into a
memory-mapped `.npy` -> link every pass into `passes/` beside precompute's rows tables -> draw
`preview.png` (a few training images, each beside its versions in passes 1-5). Passes are units
of `compute`: with `compute.backend: ray` each missing pass is a Ray task.

With `precompute.backbone: none` a pass holds augmented pixels: precompute's normalised arrays,
turned back into 0..255 images, augmented, and normalised again with the same statistics.
Like precompute, it never reads the split: changing the validation design recomputes nothing here.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import statistics
from typing import Any

from pydantic import Field, ValidationInfo, field_validator, model_validator

from pipeline.core.artifacts import (INDEX_FILE, META_FILE, PASS_FILE, PASSES_DIR, PREVIEW_PLOT, RAW_DIR, array_file,
                                     pass_file, rows_file)
from pipeline.core.cache import fingerprint
from pipeline.core.executor import Unit
from pipeline.core.stage import Stage, StageContext, StrictModel

SUBSETS = ("train", "test")
PREVIEW_IMAGES, PREVIEW_PASSES = 6, 5


class Settings(StrictModel):
    passes: int = Field(ge=0)
    test_passes: int = Field(ge=0)
    seed: int
    transforms: list[dict[str, Any]]

    @field_validator("transforms")
    @classmethod
    def _albumentations_accepts(cls, transforms, info: ValidationInfo):
        """albumentations' own strict check of every transform and argument (skipped by `kp status`)."""
        if (info.context or {}).get("shallow"):
            return transforms
        from pipeline.data.augmentation import transform_problem

        problem = transform_problem(transforms)
        if problem:
            raise ValueError(problem)
        return transforms

    @model_validator(mode="after")
    def _validation_rows_have_test_passes(self):
        if self.test_passes > self.passes:
            raise ValueError(f"test_passes ({self.test_passes}) must not exceed passes ({self.passes}): test-time "
                             "augmentation scores the validation rows on their first test_passes training passes")
        return self


def pass_key(ctx: StageContext, subset: str, number: int) -> str:
    """Everything one pass depends on, except how many passes there are."""
    inputs = ctx.fingerprint_inputs
    config = dict(inputs["config"])
    config["augment"] = {k: v for k, v in config["augment"].items() if k not in ("passes", "test_passes")}
    return fingerprint({"upstream": inputs["upstream"], "config": config, "code": inputs["code"],
                        "subset": subset, "pass": number})


def run(ctx: StageContext) -> dict:
    from pipeline.data.augmentation import RowAugmenter
    from pipeline.evaluation.plots import plot_augmentations

    s = ctx.settings
    store = ctx.units("passes")
    (ctx.out / PASSES_DIR).mkdir()
    units = []
    for subset, count in zip(SUBSETS, (s.passes, s.test_passes)):
        shutil.copyfile(ctx.input("precompute") / rows_file(subset), ctx.out / rows_file(subset))
        for number in range(1, count + 1):
            seed = (s.seed, SUBSETS.index(subset), number)
            units.append(Unit(pass_key(ctx, subset, number), f"{subset} pass {number}/{count}",
                              functools.partial(write_pass, ctx.config, ctx.inputs, subset, number, seed)))
    computed = set(ctx.compute_units("passes", units, "augmented passes"))
    passes = []
    for unit in units:
        record = {**json.loads((store.path(unit.key) / PASS_FILE).read_text()), "reused": unit.key not in computed}
        subset = record["subset"]
        _link(store.path(unit.key) / array_file(subset), ctx.out / pass_file(subset, record["pass"]))
        passes.append({**record, "key": unit.key})

    source = _source(ctx.config, ctx.inputs)
    rows, originals = source.preview_images(PREVIEW_IMAGES)
    versions = [[RowAugmenter(s.transforms, (s.seed, 0, n))(image, row) for n in range(1, PREVIEW_PASSES + 1)]
                for row, image in zip(rows, originals)]
    plot_augmentations(originals, versions, ctx.out / PREVIEW_PLOT,
                       title=f"{ctx.comp}: training rows {', '.join(map(str, rows))} and their versions in "
                             f"passes 1-{PREVIEW_PASSES}")
    meta = {"passes": s.passes, "test_passes": s.test_passes, "seed": s.seed, "transforms": s.transforms,
            "computed": sum(not p["reused"] for p in passes), "reused": sum(p["reused"] for p in passes),
            **source.speed(passes), "pass_runs": passes}
    (ctx.out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return {k: v for k, v in meta.items() if k != "transforms"}


def write_pass(config, inputs: dict, subset: str, number: int, seed: tuple, out) -> None:
    """One augmented pass into `out` (here or on a Ray worker): the array and its record (`pass.json`)."""
    from tqdm import tqdm

    from pipeline.data.augmentation import RowAugmenter

    source = _source(config, inputs)
    record = {"subset": subset, "pass": number, "seed": list(seed),
              **source.write(subset, RowAugmenter(config.section("augment").transforms, seed), out / array_file(subset),
                             tqdm(disable=True))}
    (out / PASS_FILE).write_text(json.dumps(record, indent=2) + "\n")


def _source(config, inputs: dict):
    """Where a pass's images come from: the image files, or precompute's pixels (`backbone: none`)."""
    return (_PixelSource if config.get("precompute.backbone") == "none" else _ImageSource)(config, inputs)


def _link(source, target) -> None:
    """Put a cached pass into this run's folder without copying its bytes (a copy across filesystems)."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _spread_rows(count: int, n: int) -> list[int]:
    """Up to `n` row numbers spread evenly over `count` rows (the preview's images)."""
    return sorted({round(i * (count - 1) / max(n - 1, 1)) for i in range(n)})


class _ImageSource:
    """Image files, decoded and augmented on the way into precompute's network."""

    def __init__(self, config, inputs: dict):
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
            from pipeline.models.extractor import build_extractor

            self._extractor = build_extractor(self.config.section("precompute"), self.config.root,
                                              tuple(self.config.competition.image_size), self.config.compute)
        return {**self._extractor.write(self.paths[subset], out, progress=progress, augment=augmenter),
                "device": self._extractor.device()}

    def preview_images(self, n: int):
        import numpy as np

        from pipeline.data.images import checked_batches

        rows = _spread_rows(self.count("train"), n)
        paths = [self.paths["train"][r] for r in rows]
        batch = next(iter(checked_batches(paths, tuple(self.config.competition.image_size), len(paths))))
        return rows, [np.clip(np.round(image), 0, 255).astype(np.uint8) for image in np.asarray(batch)]

    def speed(self, passes: list[dict]) -> dict:
        """Images/s of the passes computed now (median) against precompute's on the same subset."""
        ratios = [p["images_per_s"] / self.precompute["timings"][p["subset"]]["images_per_s"]
                  for p in passes if not p["reused"]]
        rates = [p["images_per_s"] for p in passes if not p["reused"]]
        return {"images_per_s": round(statistics.median(rates), 1) if rates else None,
                "speed_vs_precompute": round(statistics.median(ratios), 3) if ratios else None}


class _PixelSource:
    """precompute's normalised pixels (`backbone: none`), augmented as 0..255 images."""

    def __init__(self, config, inputs: dict):
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


def headline(m: dict) -> str:
    speed = f", {m['images_per_s']:.0f} img/s" if m.get("images_per_s") else ""
    if m.get("speed_vs_precompute"):
        speed += f" ({m['speed_vs_precompute']:.2f}x precompute)"
    return (f"{m['passes']} train + {m['test_passes']} test passes ({m['computed']} computed, "
            f"{m['reused']} reused){speed}")


STAGE = Stage(
    name="augment",
    settings=Settings,
    run=run,
    needs=("download", "precompute"),
    reads=("precompute", "competition.image_size"),
    outs=(META_FILE, PREVIEW_PLOT, rows_file("train"), rows_file("test"), PASSES_DIR + "/"),
    headline=headline,
)

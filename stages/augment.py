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
of `compute`: with `compute.backend: ray` each missing pass is a Ray task (`pipeline.models.passes`).

With `precompute.backbone: none` a pass holds augmented pixels: precompute's normalised arrays,
turned back into 0..255 images, augmented, and normalised again with the same statistics.
Like precompute, it never reads the split: changing the validation design recomputes nothing here.
"""
from __future__ import annotations

import json
import shutil
from typing import Any

from pydantic import Field, ValidationInfo, field_validator, model_validator

from pipeline.core.artifacts import META_FILE, PASSES_DIR, PREVIEW_PLOT, array_file, pass_file, rows_file
from pipeline.core.settings import StrictModel
from pipeline.core.stage import Stage, StageContext

PREVIEW_IMAGES, PREVIEW_PASSES = 6, 5


class Settings(StrictModel):
    """The `augment` section: augmented copies of every image, pushed through precompute's network once and cached."""

    passes: int = Field(5, ge=0, description=(
        "passes over all training images (train and valid rows; only the split's train rows are trained on)"))
    test_passes: int = Field(0, ge=0, description=(
        "passes over the test images, for test-time augmentation (<= passes: validation uses the first ones)"))
    seed: int = Field(0, description=(
        "row r of pass k is drawn from (seed, subset, k, r): the same config gives the same arrays"))
    transforms: list[dict[str, Any]] = Field([], description=(
        "albumentations transforms in order, `- Name: {argument: value}` (its own names, checked strictly)"))

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


def run(ctx: StageContext) -> dict:
    from pipeline.core.cache import link_or_copy
    from pipeline.core.executor import UnitItem
    from pipeline.data.augmentation import RowAugmenter, pass_seed
    from pipeline.evaluation.plots import plot_augmentations
    from pipeline.models.passes import PASS_READS, SUBSETS, pass_source, write_pass

    s = ctx.settings
    (ctx.out / PASSES_DIR).mkdir()
    items = []
    for subset, count in zip(SUBSETS, (s.passes, s.test_passes)):
        shutil.copyfile(ctx.input("precompute") / rows_file(subset), ctx.out / rows_file(subset))
        for number in range(1, count + 1):
            seed = pass_seed(s.seed, subset, number)
            items.append(UnitItem(f"{subset} pass {number}/{count}", {"subset": subset, "pass": number, "seed": seed},
                                  (subset, number, seed)))
    units = ctx.map_units("passes", write_pass, items, "augmented passes", reads=PASS_READS)
    passes = []
    for unit in units:
        subset = unit.record["subset"]
        link_or_copy(unit.folder / array_file(subset), ctx.out / pass_file(subset, unit.record["pass"]))
        passes.append({**unit.record, "reused": unit.reused, "key": unit.key})

    source = pass_source(ctx.config, ctx.inputs)
    rows, originals = source.preview_images(PREVIEW_IMAGES)
    versions = [[RowAugmenter(s.transforms, pass_seed(s.seed, "train", n))(image, row)
                 for n in range(1, PREVIEW_PASSES + 1)]
                for row, image in zip(rows, originals)]
    plot_augmentations(originals, versions, ctx.out / PREVIEW_PLOT,
                       title=f"{ctx.comp}: training rows {', '.join(map(str, rows))} and their versions in "
                             f"passes 1-{PREVIEW_PASSES}")
    meta = {"passes": s.passes, "test_passes": s.test_passes, "seed": s.seed, "transforms": s.transforms,
            "computed": sum(not p["reused"] for p in passes), "reused": sum(p["reused"] for p in passes),
            **source.speed(passes), "pass_runs": passes}
    (ctx.out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return {k: v for k, v in meta.items() if k != "transforms"}


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

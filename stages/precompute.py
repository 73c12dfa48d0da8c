"""precompute: run the frozen conv base once over every image and cache its output.

Recipe: build the backbone (`precompute.backbone`, `weights`, cut at `cut`) -> stream the training
images, then the test images, in index order through a parallel decoder into a compiled forward
pass -> write the features chunk by chunk into `train.npy` / `test.npy` (memory-mapped; `dtype`
float16 halves the disk) with `train_rows.csv` / `test_rows.csv` (id, label) aligned row for row.

Dense heads then train on these arrays in seconds instead of pushing every image through the conv
base every epoch. The split is not an input: changing it never recomputes features.
"""
from __future__ import annotations

import json
import time
from typing import Literal

from pydantic import Field

from pipeline.cache import file_stamp
from pipeline.dataset_index import INDEX_FILE, read_index
from pipeline.errors import PipelineError
from pipeline.features import array_file, rows_file
from pipeline.stage import Stage, StageContext, StrictModel


class Settings(StrictModel):
    backbone: Literal["vgg16", "mobilenet", "resnet50"]
    alpha: float = Field(gt=0, le=1.0)
    weights: str
    cut: Literal["conv", "pool"]
    preprocess: Literal["backbone", "none"]
    dtype: Literal["float16", "float32"]
    batch_size: int = Field(ge=1)


def run(ctx: StageContext) -> dict:
    from pipeline.backbones import build_feature_model, resolve_weights
    from pipeline.feature_writer import compiled_forward, write_features

    s, competition = ctx.settings, ctx.config.competition
    if ctx.config.get("data.layout") == "pixels_csv":
        raise PipelineError(
            "precompute with an ImageNet backbone needs image files, but data.layout is pixels_csv; "
            "train digit competitions from scratch instead"
        )
    index = read_index(ctx.input("download") / INDEX_FILE)
    raw = ctx.input("download") / "raw"
    height, width = competition.image_size
    features = build_feature_model(s.backbone, resolve_weights(s.weights, ctx.config.root),
                                   (height, width, 3), s.cut, s.alpha)
    forward = compiled_forward(features.model)
    preprocess = features.preprocess if s.preprocess == "backbone" else None
    row_shape = tuple(int(d) for d in features.model.output.shape[1:])
    ctx.log(f"{features.name} cut at {s.cut}: {row_shape} per image, {s.dtype}")

    timings = {}
    for subset in ("train", "test"):
        rows = index[index.subset == subset]
        rows[["id", "label"]].to_csv(ctx.out / rows_file(subset), index=False)
        start = time.perf_counter()
        write_features(forward, [raw / p for p in rows["path"]], ctx.out / array_file(subset), row_shape,
                       s.dtype, (height, width), s.batch_size, preprocess,
                       progress=ctx.progress(total=len(rows), desc=f"{subset} features"))
        seconds = time.perf_counter() - start
        timings[subset] = {"images": len(rows), "seconds": round(seconds, 2),
                           "images_per_s": round(len(rows) / max(seconds, 1e-9), 1)}
    meta = {"backbone": features.name, "weights": s.weights, "cut": s.cut, "shape": list(row_shape),
            "dtype": s.dtype, "input_size": [height, width], "timings": timings}
    (ctx.out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _weights_stamp(config) -> dict:
    """A weights file's size and mtime: replacing the file makes the features stale."""
    weights = config.get("precompute.weights")
    return {} if weights in ("imagenet", "none") else file_stamp(config.path(weights))


def _headline(m: dict) -> str:
    t = m["timings"]
    rate = (t["train"]["images"] + t["test"]["images"]) / max(t["train"]["seconds"] + t["test"]["seconds"], 1e-9)
    return f"{m['backbone']} {m['cut']} {tuple(m['shape'])} {m['dtype']}, {rate:.0f} img/s"


STAGE = Stage(
    name="precompute",
    settings=Settings,
    run=run,
    needs=("download",),
    reads=("competition.image_size", "data.layout"),
    version=1,
    headline=_headline,
    source_stamp=_weights_stamp,
)

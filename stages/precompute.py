"""precompute: run the frozen conv base once over every image and cache its output.

With `backbone: none` (from-scratch models, e.g. MNIST) it caches the images themselves instead,
normalised by the mean and standard deviation of the training rows only (stored in `meta.json`
and applied unchanged to the test rows).

Recipe: cut the training images, then the test images, in index order into shards of
`compute.shard_size` (whole batches) -> for each subset, restore its feature array from the run
cache when one was computed from the same images (download's content digest), settings and
shard code -> else compute each missing shard (a unit: build the backbone `precompute.backbone`,
`weights`, cut at `cut`; stream the images through a parallel decoder into a compiled forward
pass; here, or as Ray tasks with `compute.backend: ray`) and stitch the shards in order into one
memory-mapped array (`dtype` float16 halves the disk) -> link it as `train.npy` / `test.npy`
beside `train_rows.csv` / `test_rows.csv` (id, label), aligned row for row.

The forward pass runs as the `compute` section's device plan says (`pipeline.models.device`: on a
GPU mixed precision, XLA, uint8 pixels; `meta.json` records the plan). Dense heads then train on
these arrays in seconds instead of pushing every image through the conv base every epoch. The
split is not an input: changing it never recomputes features; nor does an edit of this module,
whose units are keyed by `pipeline.models.extractor`'s code. A killed run keeps the shards it
finished, and the shards are dropped once stitched (the features unit holds their rows).
"""
from __future__ import annotations

import json
from typing import Literal

from pydantic import Field, field_validator

from pipeline.core.artifacts import INDEX_FILE, META_FILE, RAW_DIR, SHARD_FILE, array_file, rows_file
from pipeline.core.competition import network_size
from pipeline.core.config_reader import ConfigReader
from pipeline.core.errors import PipelineError
from pipeline.core.settings import StrictModel
from pipeline.core.stage import Stage, StageContext
from pipeline.models.backbones import CUTS, FILE_BACKBONE, PREPROCESSING
from pipeline.models.hub import hub_preset

SUBSETS = ("train", "test")


class Settings(StrictModel):
    """The `precompute` section: frozen conv features, computed once."""

    backbone: str = Field("vgg16", description=(
        "any keras.applications network by name, any case (EfficientNetV2B0, ConvNeXtTiny, vgg16...: kp backbones "
        "lists them) | file (precompute.weights is a whole .keras model) | hub:PRESET (a KerasHub preset folder, or "
        "a preset name on a machine with a network) | none (normalised pixels, for from-scratch models)"))
    alpha: float = Field(1.0, gt=0, le=1.0, description=(
        "MobileNet, MobileNetV2, MobileNetV3: width multiplier (v1: 0.25 0.5 0.75 1.0; v2: 0.35 0.5 0.75 1.0 ...)"))
    weights: str = Field("imagenet", description=(
        "imagenet (Keras download) | none (random) | path to a weights file (backbone file: to the .keras model)"))
    cut: Literal[CUTS] = Field("pool", description=(
        "pool: global average pool (VGG: block5_pool, the course's cut) | conv: last feature map"))
    preprocess: Literal[PREPROCESSING] = Field("backbone", description=(
        "backbone: the network's own preprocess_input | none: RGB 0..255 | tf, caffe, torch: that mode "
        "(backbone file must name one)"))
    image_size: list[int] | None = Field(None, description=(
        "[height, width] the images are fed to the network at (null: competition.image_size)"))
    dtype: Literal["float16", "float32"] = Field("float16", description=(
        "float16 | float32: how features are stored (float16 halves the disk)"))
    batch_size: int = Field(32, ge=1, description="images per forward pass")

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, name: str) -> str:
        """A name keras.applications has (`pipeline.models.applications`: read from its committed
        table, no TensorFlow import), `file` or `none`."""
        from pipeline.models.applications import application

        if name not in ("none", FILE_BACKBONE) and hub_preset(name) is None:
            application(name)
        return name

    _height_width = field_validator("image_size")(network_size)


def run(ctx: StageContext) -> dict:
    from pipeline.core.cache import fingerprint
    from pipeline.core.executor import UnitItem
    from pipeline.data.index import read_index
    from pipeline.models.extractor import write_shard

    s = ctx.settings
    if s.backbone == "none":
        return _cache_pixels(ctx)
    if ctx.config.get("download.layout") == "pixels_csv":
        raise PipelineError(
            "precompute with an ImageNet backbone needs image files, but download.layout is pixels_csv; "
            "use precompute.backbone: none and a from-scratch model.arch"
        )
    index = read_index(ctx.input("download") / INDEX_FILE)
    raw = ctx.input("download") / RAW_DIR
    shard = -(-ctx.config.compute.shard_size // s.batch_size) * s.batch_size
    items, counts, weights = [], {}, fingerprint(ctx.fingerprint_inputs.get("stamp", {}))
    for subset in SUBSETS:
        rows = index[index.subset == subset]
        rows[["id", "label"]].to_csv(ctx.out / rows_file(subset), index=False)
        paths = [str(raw / p) for p in rows["path"]]
        counts[subset] = len(paths)
        items += [UnitItem(f"{subset} rows {start:,}-{min(start + shard, len(paths)) - 1:,}",
                           {"subset": subset, "rows": [start, start + shard]}, (paths[start:start + shard], weights))
                  for start in range(0, len(paths), shard)]
    keyed = {"reads": ("precompute", "competition.image_size"), "upstream": ("download",)}
    shards = ctx.plan_units("shards", write_shard, items, **keyed)
    wholes = ctx.plan_units("features", write_shard, [UnitItem(subset, {"subset": subset}) for subset in SUBSETS],
                            **keyed)  # keyed as one shard of the whole subset: compute.shard_size is in no key
    records = {}
    for subset in sorted(SUBSETS, key=lambda name: not counts[name]):  # an empty subset takes the other's shape
        own = [unit for unit, item in zip(shards, items) if item.key["subset"] == subset]
        whole = wholes[SUBSETS.index(subset)].key
        records[subset] = _subset_features(ctx, subset, whole, own, counts[subset], next(iter(records.values()), None))
    first = records[SUBSETS[0]] if counts[SUBSETS[0]] else records[SUBSETS[1]]
    ctx.log(f"{first['name']} cut at {s.cut}: {tuple(first['shape'])} per image, {s.dtype}; "
            f"{_device_line(first['device'])}")
    timings = {subset: {k: records[subset][k] for k in ("images", "seconds", "images_per_s", "shards", "reused")}
               for subset in SUBSETS}
    return _write_meta(ctx, first["name"], first["shape"], first["size"], timings, first["device"])


def _subset_features(ctx: StageContext, subset: str, key: str, shards: list, count: int, like: dict | None) -> dict:
    """One subset's feature array, the unit `key` of `precompute-features`, keyed as its shards are (by
    the images' content, precompute's settings and the shard function's code, never by this stage's
    own code or the shard size): restored when stored, else its missing shards are computed (units of
    `precompute-shards`, here or on Ray; a killed run keeps those it finished), stitched in order
    into the unit (the same bytes as one pass: the batches are the same) and then dropped. The
    stage's array is a hard link to the unit's. Returns the unit's record."""
    import numpy as np

    from pipeline.core.artifacts import UNIT_FILE
    from pipeline.core.cache import link_or_copy
    from pipeline.core.executor import read_record
    from pipeline.data.arrays import ChunkedArrayWriter, load_array

    features = ctx.units("features")
    if features.has(key):
        features.touch(key)
        ctx.log(f"{subset} features ({count:,} images): reused from {features.path(key)}")
        record = {**read_record(features.path(key)), "reused": True}
    else:
        computed = ctx.compute_units("shards", shards, f"{subset} feature shards")
        parts = ctx.gather_units("shards", shards, set(computed))
        base = parts[0].record if parts else like
        if base is None:
            raise PipelineError("precompute: the index has no image in either subset; rerun download")
        with features.write(key) as folder:
            with ChunkedArrayWriter(folder / array_file(subset), count, tuple(base["shape"]), ctx.settings.dtype) as writer:
                for part in parts:
                    array = load_array(part.folder / SHARD_FILE)
                    for first in range(0, len(array), 4096):
                        writer.append(np.asarray(array[first:first + 4096]))
                    del array
            seconds = sum(part.record["seconds"] for part in parts)
            record = {**{k: base[k] for k in ("name", "shape", "size", "device")}, "images": count,
                      "seconds": round(seconds, 2), "images_per_s": round(count / max(seconds, 1e-9), 1),
                      "shards": len(parts)}
            (folder / UNIT_FILE).write_text(json.dumps(record, indent=2) + "\n")
        store = ctx.units("shards")
        for part in parts:
            store.remove(part.key)  # stitched: the features unit holds them now
        record = {**record, "reused": False}
    link_or_copy(features.path(key) / array_file(subset), ctx.out / array_file(subset))
    return record


def _write_meta(ctx: StageContext, name: str, row_shape, size, timings: dict, device: dict) -> dict:
    s = ctx.settings
    meta = {"backbone": name, "weights": s.weights, "cut": s.cut, "shape": list(row_shape),
            "dtype": s.dtype, "input_size": list(size), "timings": timings, "device": device}
    (ctx.out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _cache_pixels(ctx: StageContext) -> dict:
    """Images as normalised float arrays: (x - mean) / std with the training rows' statistics."""
    import numpy as np

    from pipeline.data.arrays import ChunkedArrayWriter
    from pipeline.data.index import read_index
    from pipeline.data.pixels import pixel_chunks

    s, competition = ctx.settings, ctx.config.competition
    index = read_index(ctx.input("download") / INDEX_FILE)
    raw = ctx.input("download") / RAW_DIR
    height, width = competition.image_size
    shape = (height, width, competition.channels)
    sums = {}
    for subset in SUBSETS:
        rows = index[index.subset == subset]
        rows[["id", "label"]].to_csv(ctx.out / rows_file(subset), index=False)
        total = total_sq = 0.0
        with ChunkedArrayWriter(ctx.out / array_file(subset), len(rows), shape, s.dtype) as writer:
            for chunk in pixel_chunks(raw, rows, shape, ctx.config.get("download.layout"), s.batch_size):
                writer.append(chunk)
                total, total_sq = total + float(chunk.sum(dtype=np.float64)), total_sq + float(
                    np.square(chunk, dtype=np.float64).sum())
        sums[subset] = (total, total_sq, len(rows) * int(np.prod(shape)))
    total, total_sq, count = sums["train"]  # training rows only: test statistics never leak in
    mean = total / count
    std = max(np.sqrt(max(total_sq / count - mean**2, 0.0)), 1e-8)
    for subset in SUBSETS:
        array = np.load(ctx.out / array_file(subset), mmap_mode="r+")
        for start in range(0, len(array), 4096):
            array[start:start + 4096] = (array[start:start + 4096] - mean) / std
        array.flush()
        del array
    meta = {"backbone": "none", "shape": list(shape), "dtype": s.dtype, "mean": round(mean, 6),
            "std": round(float(std), 6), "n_train": int((index.subset == "train").sum()),
            "n_test": int((index.subset == "test").sum())}
    (ctx.out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def _device_line(device: dict) -> str:
    return (f"{device['description']}, {device['precision']}, XLA {'on' if device['xla'] else 'off'}, "
            f"{device['pixels']} pixels, batch {device['batch_size']}")


def _weights_stamp(config: ConfigReader, stamp) -> dict:
    """A weights file's stamp (`cache.stamp`): replacing the file makes the features stale."""
    weights, preset = config.get("precompute.weights"), hub_preset(config.get("precompute.backbone"))
    folder = config.path(preset) if preset is not None else None
    if folder is not None and folder.is_dir():  # a KerasHub preset folder: its network and weights
        return {name: stamp(folder / name) for name in ("config.json", "model.weights.h5") if (folder / name).is_file()}
    return {} if weights in ("imagenet", "none") or preset is not None else stamp(config.path(weights))


def _headline(m: dict) -> str:
    if m["backbone"] == "none":
        return f"pixels {tuple(m['shape'])} normalised by train mean {m['mean']:.2f} / std {m['std']:.2f}"
    t = m["timings"]
    rate = (t["train"]["images"] + t["test"]["images"]) / max(t["train"]["seconds"] + t["test"]["seconds"], 1e-9)
    device = m.get("device")
    where = f" ({device['description'].split(',')[0]}, {device['precision']})" if device else ""
    reused = " (features reused)" if all(t[subset].get("reused") for subset in SUBSETS) else ""
    return f"{m['backbone']} {m['cut']} {tuple(m['shape'])} {m['dtype']}, {rate:.0f} img/s{where}{reused}"


STAGE = Stage(
    name="precompute",
    settings=Settings,
    run=run,
    needs=("download",),
    reads=("competition.image_size", "competition.channels", "download.layout"),
    outs=(*(array_file(s) for s in SUBSETS), *(rows_file(s) for s in SUBSETS), META_FILE),
    headline=_headline,
    source_stamp=_weights_stamp,
)

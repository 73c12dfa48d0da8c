"""Cached features on disk: written in index order by precompute, read back joined to the split.

Writing: `write_features` runs a forward pass over image files in index order (tf.data decodes in
parallel, see `pipeline.data.images`) and writes each batch straight into a memory-mapped `.npy`,
so memory stays flat however many images there are.

Reading: the precompute stage writes `train.npy` / `test.npy` with `train_rows.csv` / `test_rows.csv` (id,
label) beside them, row for row. The split stage writes `split.csv` over the same training rows.
`load_split_features` checks that the ids agree in order before selecting train and valid rows:
a misalignment (the course's shuffled-generator bug) fails loudly instead of training on noise.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import contextlib

import numpy as np
import pandas as pd

from pipeline.core.artifacts import SPLIT_FILE, array_file, rows_file
from pipeline.data.arrays import ChunkedArrayWriter, load_array
from pipeline.core.errors import PipelineError

def read_rows(folder: Path, subset: str) -> pd.DataFrame:
    return pd.read_csv(folder / rows_file(subset), dtype=str, keep_default_na=False)


@dataclass
class SplitFeatures:
    classes: list[str]
    x_train: np.ndarray
    y_train: np.ndarray
    x_valid: np.ndarray
    y_valid: np.ndarray
    valid_ids: list[str]
    x_test: np.ndarray
    test_ids: list[str]


def label_indices(labels, classes: list[str]) -> np.ndarray:
    lookup = {name: i for i, name in enumerate(classes)}
    try:
        return np.array([lookup[label] for label in labels], dtype=np.int64)
    except KeyError as exc:
        raise PipelineError(f"label {exc.args[0]!r} is not one of competition.classes {classes}") from None


def load_split_features(features_dir: Path, split_dir: Path, classes: list[str], dtype=np.float32) -> SplitFeatures:
    rows = read_rows(features_dir, "train")
    split = pd.read_csv(split_dir / SPLIT_FILE, dtype={"id": str})
    if len(rows) != len(split) or not (rows["id"].values == split["id"].values).all():
        first = next((i for i, (a, b) in enumerate(zip(rows["id"], split["id"])) if a != b), min(len(rows), len(split)))
        raise PipelineError(
            f"{features_dir / rows_file('train')} and {split_dir / SPLIT_FILE} disagree at row {first} "
            f"({len(rows)} vs {len(split)} rows): features and split are not aligned"
        )
    train_all = load_array(features_dir / array_file("train"))
    labels = label_indices(rows["label"], classes)
    valid = (split["side"] == "valid").to_numpy()
    return SplitFeatures(
        classes=classes,
        x_train=np.asarray(train_all[~valid], dtype=dtype),
        y_train=labels[~valid],
        x_valid=np.asarray(train_all[valid], dtype=dtype),
        y_valid=labels[valid],
        valid_ids=rows["id"][valid].tolist(),
        x_test=load_array(features_dir / array_file("test")),
        test_ids=read_rows(features_dir, "test")["id"].tolist(),
    )


def write_features(forward, paths: list[Path], out: Path, row_shape: tuple[int, ...], dtype: str,
                   size: tuple[int, int], batch_size: int, preprocess=None, progress=None) -> int:
    """Run `forward` (see `pipeline.models.inference.compiled_forward`) over the images in `paths`, in
    order, into `out` (.npy). Imports TensorFlow.

    Returns:
        The number of rows written.
    """
    from pipeline.data.images import checked_batches

    bar = progress if progress is not None else contextlib.nullcontext()
    with ChunkedArrayWriter(out, len(paths), row_shape, dtype) as writer, bar:
        for images in checked_batches(paths, size, batch_size, preprocess):
            writer.append(np.asarray(forward(images)).astype(dtype, copy=False))
            if progress is not None:
                progress.update(len(images))
    return len(paths)

"""Cached features on disk: written in index order by precompute, read back joined to the split.

Writing: `write_features` runs a forward pass over image files in index order (tf.data decodes in
parallel, see `pipeline.data.images`) and writes each batch straight into a memory-mapped `.npy`
(in a second thread, while the next batch is computed), so memory stays flat however many images
there are.

Reading: the precompute stage writes `train.npy` / `test.npy` with `train_rows.csv` / `test_rows.csv` (id,
label) beside them, row for row. The split stage writes `split.csv` over the same training rows.
`load_split_features` checks that the ids agree in order before selecting train and valid rows:
a misalignment (the course's shuffled-generator bug) fails loudly instead of training on noise.
The augment stage's passes (`passes/train_K.npy`, `passes/test_K.npy`) follow the same rows, with
their own rows tables checked the same way; the split selects their rows exactly as it selects
the clean ones, so a validation image's augmented copy can never reach training.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.core.artifacts import META_FILE, SPLIT_FILE, array_file, pass_file, rows_file
from pipeline.core.errors import PipelineError
from pipeline.core.readers import read_table
from pipeline.data.arrays import ChunkedArrayWriter, load_array


def read_rows(folder: Path, subset: str) -> pd.DataFrame:
    return read_table(folder / rows_file(subset), dtype=str, keep_default_na=False)


@dataclass
class SplitFeatures:
    """The split's rows of the cached arrays, ready to train on.

    With augmented passes, `x_train` holds the clean training rows followed by each pass's training
    rows (`train_passes` of them, `y_train` repeated); `valid_passes` / `test_passes` hold the
    augmented versions of the validation / test rows that test-time augmentation averages over.
    """

    classes: list[str]
    x_train: np.ndarray
    y_train: np.ndarray
    x_valid: np.ndarray
    y_valid: np.ndarray
    valid_ids: list[str]
    x_test: np.ndarray
    test_ids: list[str]
    train_passes: int = 0
    valid_passes: list[np.ndarray] = field(default_factory=list)
    test_passes: list[np.ndarray] = field(default_factory=list)


def label_indices(labels, classes: list[str]) -> np.ndarray:
    lookup = {name: i for i, name in enumerate(classes)}
    try:
        return np.array([lookup[label] for label in labels], dtype=np.int64)
    except KeyError as exc:
        raise PipelineError(f"label {exc.args[0]!r} is not one of competition.classes {classes}") from None


def check_same_ids(ids, other, what: str, other_what: str) -> None:
    """Raise PipelineError naming both tables and the first row where two id sequences differ."""
    if len(ids) != len(other) or not (np.asarray(ids) == np.asarray(other)).all():
        first = next((i for i, (a, b) in enumerate(zip(ids, other)) if a != b), min(len(ids), len(other)))
        raise PipelineError(f"{what} and {other_what} disagree at row {first} ({len(ids)} vs {len(other)} rows): "
                            "the arrays are not aligned with the rows")


def load_split_features(features_dir: Path, split_dir: Path, classes: list[str], dtype=np.float32,
                        passes_dir: Path | None = None, train_passes: bool = False,
                        tta: bool = False, sides: tuple[np.ndarray, np.ndarray] | None = None) -> SplitFeatures:
    """The split's train / valid rows and the test rows of precompute's arrays, with augment's passes.

    Args:
        features_dir: precompute's output (`train.npy`, `test.npy` and their rows tables).
        split_dir: split's output (`split.csv`, the same training ids in the same order).
        classes: the competition's classes, in output order.
        dtype: what the arrays are converted to.
        passes_dir: augment's output, needed when `train_passes` or `tta`.
        train_passes: append every augmented pass of the training rows (never a validation row's) to x_train.
        tta: load the T augmented test passes, and the validation rows of the first T training passes.
        sides: (train, valid) boolean masks over the training rows instead of the split's sides
            (a fold's model: train on the other folds, predict this one); disjoint.

    Returns:
        `SplitFeatures`; raises PipelineError when any two of the tables disagree on the ids' order.
    """
    rows = read_rows(features_dir, "train")
    split = read_table(split_dir / SPLIT_FILE, dtype={"id": str})
    check_same_ids(rows["id"].values, split["id"].values, str(features_dir / rows_file("train")),
                    str(split_dir / SPLIT_FILE))
    train_all = load_array(features_dir / array_file("train"))
    labels = label_indices(rows["label"], classes)
    if sides is None:
        valid = (split["side"] == "valid").to_numpy()
        train = ~valid
    else:
        train, valid = (np.asarray(mask, bool) for mask in sides)
        if (train & valid).any():
            raise ValueError("a row cannot be on both sides")
    data = SplitFeatures(
        classes=classes,
        x_train=np.asarray(train_all[train], dtype=dtype),
        y_train=labels[train],
        x_valid=np.asarray(train_all[valid], dtype=dtype),
        y_valid=labels[valid],
        valid_ids=rows["id"][valid].tolist(),
        x_test=load_array(features_dir / array_file("test")),
        test_ids=read_rows(features_dir, "test")["id"].tolist(),
    )
    if passes_dir is None:
        if train_passes or tta:
            raise PipelineError("augmented passes were asked for, but there is no augment output to read them from")
        return data
    counts = json.loads((passes_dir / META_FILE).read_text())
    for subset, ids in (("train", rows["id"].values), ("test", np.asarray(data.test_ids))):
        check_same_ids(read_rows(passes_dir, subset)["id"].values, ids, str(passes_dir / rows_file(subset)),
                        str(features_dir / rows_file(subset)))

    def load_pass(subset: str, number: int) -> np.ndarray:
        array = load_array(passes_dir / pass_file(subset, number))
        expected = len(rows) if subset == "train" else len(data.test_ids)
        if array.shape != (expected, *train_all.shape[1:]):
            raise PipelineError(f"{passes_dir / pass_file(subset, number)}: shape {array.shape}, expected "
                                f"{(expected, *train_all.shape[1:])} like {features_dir / array_file(subset)}")
        return array

    if train_passes:
        k = counts["passes"]
        data.x_train = np.concatenate([data.x_train, *(np.asarray(load_pass("train", n)[train], dtype=dtype)
                                                       for n in range(1, k + 1))])
        data.y_train = np.tile(data.y_train, k + 1)
        data.train_passes = k
    if tta:
        t = counts["test_passes"]
        data.valid_passes = [np.asarray(load_pass("train", n)[valid], dtype=dtype) for n in range(1, t + 1)]
        data.test_passes = [load_pass("test", n) for n in range(1, t + 1)]
    return data


def outputs_in_order(forward, batches, write) -> None:
    """Call `forward` on each batch and hand its outputs, as float32 NumPy rows, to `write`, in order;
    `write` runs in a second thread while the next batch is read and sent to the device (so disk
    writes, and waiting for a GPU, overlap the next batch)."""
    from concurrent.futures import ThreadPoolExecutor

    pending = None
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="rows-writer") as writer:
        for batch in batches:
            outputs = forward(batch)
            if pending is not None:
                pending.result()  # at most one batch waits: memory stays flat, errors surface here
            pending = writer.submit(lambda o=outputs: write(np.asarray(o)))
        if pending is not None:
            pending.result()


def write_features(forward, paths: list[Path], out: Path, row_shape: tuple[int, ...], dtype: str,
                   size: tuple[int, int], progress=None, augment=None) -> int:
    """Run `forward` (a `pipeline.models.inference.Forward`) over the images in `paths`, in order, into
    `out` (.npy); `augment(image, row)` changes each decoded image first. Each batch's rows are
    written while the next batch is computed. Imports TensorFlow.

    Returns:
        The number of rows written.
    """
    bar = progress if progress is not None else contextlib.nullcontext()
    with ChunkedArrayWriter(out, len(paths), row_shape, dtype) as writer, bar:
        def write(rows: np.ndarray) -> None:
            writer.append(rows.astype(dtype, copy=False))
            if progress is not None:
                progress.update(len(rows))

        outputs_in_order(forward, forward.batches(paths, size, augment=augment), write)
    return len(paths)

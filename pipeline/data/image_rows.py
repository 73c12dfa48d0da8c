"""The split's rows as image files: what a model trained end to end (the tune stage) reads instead of features.

`load_split_images` joins download's index with the split, checks that they list the same training
ids in the same order (as `pipeline.data.features.load_split_features` does for the cached arrays),
and returns the image paths, labels and ids of the train, valid and test rows. The validation and
test rows come in the order every predicting stage writes them (split order, index order), and each
keeps its row number in its subset, which is what seeds augment's draw of that image (so a
test-time-augmented version equals augment's pass of the same row).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.core.artifacts import INDEX_FILE, RAW_DIR, SPLIT_FILE
from pipeline.core.readers import read_table
from pipeline.data.features import check_same_ids, label_indices


@dataclass
class ImageRows:
    """Image files with their labels (class indices; -1 for test rows) and ids, in order."""

    paths: list[Path]
    labels: np.ndarray
    ids: list[str]
    rows: np.ndarray  # each image's row number in its subset (train or test) of the index

    def __len__(self) -> int:
        return len(self.paths)


@dataclass
class SplitImages:
    classes: list[str]
    train: ImageRows
    valid: ImageRows
    test: ImageRows


def load_split_images(download_dir: Path, split_dir: Path, classes: list[str], sides=None) -> SplitImages:
    """The split's train / valid rows and the test rows as image files.

    Args:
        download_dir: download's output (`index.csv`, `raw/`).
        split_dir: split's output (`split.csv`, the index's training ids in the index's order).
        classes: the competition's classes, in output order.
        sides: (train, valid) boolean masks over the split's rows instead of its sides (a cv fold's).

    Returns:
        `SplitImages`; raises PipelineError when the index and the split disagree on the ids' order.
    """
    from pipeline.data.index import read_index

    index = read_index(download_dir / INDEX_FILE)
    raw = download_dir / RAW_DIR
    train = index[index.subset == "train"].reset_index(drop=True)
    test = index[index.subset == "test"].reset_index(drop=True)
    split = read_table(split_dir / SPLIT_FILE, dtype={"id": str})
    check_same_ids(train["id"].to_numpy(), split["id"].to_numpy(), str(download_dir / INDEX_FILE),
                   str(split_dir / SPLIT_FILE))
    labels = label_indices(train["label"], classes)
    valid = (split["side"] == "valid").to_numpy()
    training = ~valid
    if sides is not None:
        training, valid = (np.asarray(side, bool) for side in sides)

    def rows(frame: pd.DataFrame, mask: np.ndarray, labels: np.ndarray) -> ImageRows:
        numbers = np.flatnonzero(mask)
        return ImageRows([raw / frame["path"][i] for i in numbers], labels[numbers],
                         frame["id"][mask].astype(str).tolist(), numbers)

    return SplitImages(classes, rows(train, training, labels), rows(train, valid, labels),
                       rows(test, np.ones(len(test), bool), np.full(len(test), -1)))

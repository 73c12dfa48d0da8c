"""The dataset index: one row per train and test item, the table every later stage reads.

Columns: `subset` (train | test), `id` (the training file name, or the submission id for test
items), `path` (relative to the extracted data folder), `row` (the row in `path` for images stored
as CSV pixels, else -1), `label` (a class name; empty for test), `group` (e.g. State Farm's driver;
empty when the competition has none). Rows are in a fixed order (train sorted by path, test in
sample-submission order), and every array a later stage caches is aligned row for row with it.

Three Kaggle layouts are understood (config `download.layout`):
- `pixels_csv`: digit-recognizer's `train.csv` (label, pixel0..) and `test.csv`;
- `class_folders`: `train/CLASS/*.jpg` (State Farm), optionally with a CSV naming each file's group;
- `filename_labels`: `train/CLASS.N.jpg` (dogs vs cats).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.core.errors import PipelineError
from pipeline.core.readers import csv_header, read_table

INDEX_COLUMNS = ["subset", "id", "path", "row", "label", "group"]


def read_index(path: Path) -> pd.DataFrame:
    frame = read_table(path, dtype={"id": str, "path": str, "label": str, "group": str}, keep_default_na=False)
    if list(frame.columns) != INDEX_COLUMNS:
        raise PipelineError(f"{path}: expected columns {INDEX_COLUMNS}, found {list(frame.columns)}")
    return frame


# --------------------------------------------------------------------------- pixels_csv


def index_pixels_csv(raw: Path, download, competition) -> tuple[pd.DataFrame, list[dict]]:
    """digit-recognizer layout. Returns the index and the undecodable rows (bad pixel values)."""
    height, width = competition.image_size
    n_pixels = height * width * competition.channels
    pixel_columns = [f"pixel{i}" for i in range(n_pixels)]
    bad: list[dict] = []

    train_csv = raw / download.train_csv
    _expect_header(train_csv, [download.label_column, *pixel_columns])
    train = read_table(train_csv)
    labels = train[download.label_column].astype(str)
    unknown = sorted(set(labels) - set(competition.classes))
    if unknown:
        raise PipelineError(
            f"{train_csv}: column {download.label_column!r} has labels {unknown[:5]} that are not in "
            f"competition.classes {competition.classes}"
        )
    bad += _bad_pixel_rows(train_csv, train[pixel_columns])

    test_csv = raw / download.test_csv
    _expect_header(test_csv, pixel_columns)
    test = read_table(test_csv)
    bad += _bad_pixel_rows(test_csv, test[pixel_columns])
    test_ids = _sample_ids(raw, download, competition)
    if len(test_ids) != len(test):
        raise PipelineError(
            f"{raw / download.sample_submission}: {len(test_ids)} ids but {test_csv} has {len(test)} rows"
        )

    index = pd.concat(
        [
            pd.DataFrame({"subset": "train", "id": [str(i) for i in range(len(train))], "path": download.train_csv,
                          "row": np.arange(len(train)), "label": labels.values, "group": ""}),
            pd.DataFrame({"subset": "test", "id": test_ids, "path": download.test_csv,
                          "row": np.arange(len(test)), "label": "", "group": ""}),
        ],
        ignore_index=True,
    )
    return index, bad


def _expect_header(path: Path, expected: list[str]) -> None:
    header = csv_header(path)
    if header != expected:
        shown = ",".join(header[:4]) + (",..." if len(header) > 4 else "") + f" ({len(header)} columns)"
        want = ",".join(expected[:4]) + f",...,{expected[-1]} ({len(expected)} columns)"
        raise PipelineError(f"{path}: wrong header: expected {want}; found {shown}")


def _bad_pixel_rows(path: Path, pixels: pd.DataFrame) -> list[dict]:
    values = pixels.apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    broken = np.isnan(values).any(axis=1) | (values < 0).any(axis=1) | (values > 255).any(axis=1)
    return [{"path": path.name, "row": int(r), "error": "missing, non-numeric or out-of-range (0..255) pixel values"}
            for r in np.flatnonzero(broken)]


# --------------------------------------------------------------------------- image layouts


def index_images(raw: Path, download, competition) -> tuple[pd.DataFrame, list[dict], list[str]]:
    """class_folders / filename_labels layouts. Returns the index, the undecodable images and the
    images whose EXIF orientation says they are displayed rotated or mirrored (`inspect_images`)."""
    train_dir = raw / download.train_dir
    if not train_dir.is_dir():
        raise PipelineError(f"{train_dir}: training image folder missing (download.train_dir={download.train_dir!r})")
    extensions = tuple(e.lower() for e in download.image_extensions)
    if download.layout == "class_folders":
        train = _train_from_class_folders(raw, train_dir, extensions, download, competition)
    else:
        train = _train_from_filenames(raw, train_dir, extensions, competition)
    duplicated = train["id"][train["id"].duplicated()].tolist()
    if duplicated:
        raise PipelineError(f"{train_dir}: file names must be unique across classes; repeated: {duplicated[:5]}")

    test_ids = _sample_ids(raw, download, competition)
    test_paths = [f"{download.test_dir}/{download.test_file.format(id=i)}" for i in test_ids]
    missing = [p for p in test_paths if not (raw / p).is_file()]
    if missing:
        raise PipelineError(
            f"{raw / download.sample_submission}: {len(missing)} of {len(test_ids)} test ids have no image "
            f"(looked for {download.test_dir}/{download.test_file}); first: {missing[:3]}"
        )
    test = pd.DataFrame({"subset": "test", "id": test_ids, "path": test_paths, "row": -1, "label": "", "group": ""})
    index = pd.concat([train, test], ignore_index=True)
    bad, turned = inspect_images(raw, index["path"].tolist())
    return index, bad, turned


def unindexed_files(raw: Path, index: pd.DataFrame, download) -> list[str]:
    """Files the index leaves out that may be images someone expects in it: every file under the
    training and test folders, and every file with an image extension anywhere under `raw`, that no
    index row names (a stray extension, a class folder one level too deep, a test image missing from
    the sample submission). The download stage says how many, so no image is lost without a word."""
    extensions = tuple(e.lower() for e in download.image_extensions)
    indexed = set(index["path"])
    folders = [raw / download.train_dir, raw / download.test_dir]
    left = []
    for path in sorted(p for p in raw.rglob("*") if p.is_file()):
        relative = str(path.relative_to(raw))
        if relative not in indexed and (path.suffix.lower() in extensions
                                        or any(path.is_relative_to(folder) for folder in folders)):
            left.append(relative)
    return left


def _image_files(folder: Path, extensions: tuple[str, ...]) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in extensions)


def _train_from_class_folders(raw, train_dir, extensions, download, competition) -> pd.DataFrame:
    rows = []
    for folder in sorted(p for p in train_dir.iterdir() if p.is_dir()):
        if folder.name not in competition.classes:
            raise PipelineError(
                f"{folder}: folder name is not one of competition.classes {competition.classes}"
            )
        for file in _image_files(folder, extensions):
            rows.append({"subset": "train", "id": file.name, "path": str(file.relative_to(raw)),
                         "row": -1, "label": folder.name, "group": ""})
    if not rows:
        raise PipelineError(f"{train_dir}: no training images (extensions {list(extensions)}) in class folders")
    train = pd.DataFrame(rows)
    if download.groups is not None:
        train["group"] = _groups_for(raw, train, download.groups)
    return train


def _groups_for(raw: Path, train: pd.DataFrame, groups) -> list[str]:
    path = raw / groups.csv
    table = read_table(
        path, [groups.file_column, groups.label_column, groups.group_column], dtype=str, keep_default_na=False
    )
    by_file = table.drop_duplicates(groups.file_column).set_index(groups.file_column)
    unknown = train.loc[~train["id"].isin(by_file.index), "id"].tolist()
    if unknown:
        raise PipelineError(f"{path}: {len(unknown)} training images have no row (no group); first: {unknown[:3]}")
    listed = by_file.loc[train["id"]]
    disagree = train["label"].values != listed[groups.label_column].values
    if disagree.any():
        first = train.loc[disagree, ["id", "label"]].iloc[0]
        raise PipelineError(
            f"{path}: row for {first['id']} says class {listed.loc[first['id'], groups.label_column]!r} "
            f"but the image is in folder {first['label']!r}"
        )
    blank = [name for name, group in zip(train["id"], listed[groups.group_column]) if not str(group).strip()]
    if blank:
        lines = [int(i) + 2 for i in table.index[table[groups.file_column].isin(blank)][:5]]
        raise PipelineError(f"{path}: {len(blank)} training images have a blank {groups.group_column!r} "
                            f"(lines {lines}; first: {blank[:3]}): every image needs its group for the split")
    return listed[groups.group_column].tolist()


def _train_from_filenames(raw, train_dir, extensions, competition) -> pd.DataFrame:
    rows = []
    for file in _image_files(train_dir, extensions):
        label = file.name.split(".")[0]
        if label not in competition.classes:
            raise PipelineError(
                f"{file}: file name should start with a class name from {competition.classes} (like cat.1.jpg)"
            )
        rows.append({"subset": "train", "id": file.name, "path": str(file.relative_to(raw)),
                     "row": -1, "label": label, "group": ""})
    if not rows:
        raise PipelineError(f"{train_dir}: no training images with extensions {list(extensions)}")
    return pd.DataFrame(rows)


def _sample_ids(raw: Path, download, competition) -> list[str]:
    path = raw / download.sample_submission
    frame = read_table(path, competition.submission_columns, dtype=str, keep_default_na=False)
    ids = frame[competition.id_column].tolist()
    if len(set(ids)) != len(ids):
        raise PipelineError(f"{path}: column {competition.id_column!r} repeats ids")
    return ids


EXIF_ORIENTATION = 0x0112  # the EXIF tag; 1 = as stored, 2..8 = mirrored and/or rotated for display


def inspect_images(raw: Path, paths: list[str]) -> tuple[list[dict], list[str]]:
    """Every image opened once with PIL, in parallel.

    Returns:
        (the images that fail to decode (truncated, corrupt, not an image) or come in a format the
        later stages' decoder (TensorFlow's) cannot read; the images whose EXIF orientation is not
        1, which a photo viewer shows turned but every stage uses as stored).
    """
    from PIL import Image

    from pipeline.data.images import DECODABLE_FORMATS

    def check(relative: str) -> tuple[dict | None, bool]:
        try:
            with Image.open(raw / relative) as image:
                if image.format not in DECODABLE_FORMATS:
                    return {"path": relative, "row": -1, "error": f"a {image.format} image, which TensorFlow cannot "
                            f"decode (it reads {', '.join(DECODABLE_FORMATS)})"}, False
                turned = image.getexif().get(EXIF_ORIENTATION, 1) not in (1, None)
                image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))  # JPEG: decode at 1/8
                image.load()
            return None, turned
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... for broken files
            return {"path": relative, "row": -1, "error": f"{type(exc).__name__}: {exc}"}, False

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        results = list(pool.map(check, paths, chunksize=64))
    return [bad for bad, _ in results if bad is not None], [path for path, (_, turned) in zip(paths, results) if turned]

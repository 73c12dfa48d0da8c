"""What a kernel sees of a competition on the local server: its files, and the hidden test set it is rerun on.

`/kaggle/input/SLUG/` holds a competition's files as Kaggle unpacks them: `public_input` is the
archive extracted, the archives inside it (`train.zip`, `imgs.zip`) extracted in place, as
`kp download` does. A code submission is rerun on a hidden test set instead, which on Kaggle has
other and usually more images than the public one; `hidden_input` builds one from what the server
holds: every public test image, plus labelled training images under new ids (half as many again),
with a sample submission listing them all and a solution with their labels. A training image's
label is its folder (`train/c3/img_9.jpg`, when `c3` is one of the solution's labels) or, for a
binary competition, the prefix of its name (`dog.12.jpg`: the prefixes sorted, the second is 1).
A model trained on those images scores them optimistically: the hidden set checks that a kernel
handles other and more images than it was pushed with, not how good it is.

Both folders are built once per competition, under the server's log folder, and reused.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pandas as pd

from pipeline.core.artifacts import SOLUTION_FILE, TMP_PREFIX
from pipeline.core.cache import temporary_name
from pipeline.data.archive import extract_nested, extract_zip

SAMPLE_NAME = "sample_submission.csv"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
HIDDEN_SHARE = 0.5  # extra labelled images, as a share of the public test images


class HiddenTestError(Exception):
    """The server cannot build a hidden test set for a competition (its test set is not image files)."""


def public_input(archive: Path, cache: Path) -> Path:
    """`cache/public/`: the competition archive extracted, nested archives too (built once)."""
    folder = cache / "public"
    if not folder.is_dir():
        _build(folder, lambda partial: _extract(archive, partial))
    return folder


def hidden_input(archive: Path, solution: Path, cache: Path) -> tuple[Path, Path]:
    """(`cache/hidden/input/`, `cache/hidden/solution.csv`): the public files with a larger, different test set.

    Raises:
        HiddenTestError: the public test ids are not image files the server can find.
    """
    folder = cache / "hidden"
    if not folder.is_dir():
        public = public_input(archive, cache)
        _build(folder, lambda partial: _write_hidden(public, pd.read_csv(solution, dtype=str), partial))
    return folder / "input", folder / SOLUTION_FILE


def _build(folder: Path, write) -> None:
    """`write(partial)` into a temporary folder renamed to `folder` when complete (two runs may race)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = folder.parent / temporary_name(TMP_PREFIX, folder.name)
    try:
        write(partial)
        os.replace(partial, folder)
    except OSError:
        if not folder.is_dir():
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _extract(archive: Path, dest: Path) -> None:
    extract_zip(archive, dest)
    extract_nested(dest, inside=archive.name)


def _write_hidden(public: Path, solution: pd.DataFrame, out: Path) -> None:
    id_column, label_column = solution.columns[:2]
    ids = solution[id_column].tolist()
    images = _image_files(public)
    by_name = {p.name: p for p in images}
    first = next((by_name[name] for name in (ids[0], *(ids[0] + s for s in IMAGE_SUFFIXES)) if name in by_name), None)
    if first is None:
        raise HiddenTestError(f"no image file for the first test id {ids[0]!r}: the local server builds hidden test "
                              "sets only for competitions whose test set is image files")
    test_dir, suffix = first.parent, first.name[len(ids[0]):]
    labelled = _labelled(images, test_dir, set(solution[label_column]))
    step = max(1, len(labelled) // max(1, int(len(ids) * HIDDEN_SHARE)))
    extras = labelled[::step][: max(1, int(len(ids) * HIDDEN_SHARE))]
    new_ids = _new_ids(ids, len(extras), suffix)

    (out / "input").mkdir(parents=True)
    for entry in public.iterdir():  # everything but the test folder and the sample: links to the public files
        if entry != test_dir and entry not in test_dir.parents and entry.name != SAMPLE_NAME:
            os.symlink(entry.resolve(), out / "input" / entry.name)
    hidden_dir = out / "input" / test_dir.relative_to(public)
    _copy_tree_but(public, test_dir, out / "input")
    hidden_dir.mkdir(parents=True, exist_ok=True)
    for path in test_dir.iterdir():
        shutil.copy2(path, hidden_dir / path.name)
    for (path, _), new_id in zip(extras, new_ids):
        shutil.copy2(path, hidden_dir / f"{new_id}{suffix}")

    sample = pd.read_csv(public / SAMPLE_NAME, dtype=str, keep_default_na=False)
    added = pd.DataFrame([sample.iloc[0].tolist()] * len(new_ids), columns=sample.columns)
    added[sample.columns[0]] = new_ids
    pd.concat([sample, added]).to_csv(out / "input" / SAMPLE_NAME, index=False)
    rows = pd.DataFrame({column: "hidden" for column in solution.columns}, index=range(len(new_ids)))
    rows[id_column], rows[label_column] = new_ids, [label for _, label in extras]
    pd.concat([solution, rows]).to_csv(out / SOLUTION_FILE, index=False)


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _labelled(images: list[Path], test_dir: Path, labels: set[str]) -> list[tuple[Path, str]]:
    """Training images (not in `test_dir`) with the label the solution would give them."""
    outside = [p for p in images if test_dir not in p.parents]
    by_folder = [(p, p.parent.name) for p in outside if p.parent.name in labels]
    if by_folder:
        return by_folder
    if labels <= {"0", "1"}:
        prefixes = sorted({p.name.split(".")[0] for p in outside})
        if len(prefixes) == 2:
            return [(p, str(prefixes.index(p.name.split(".")[0]))) for p in outside]
    return []


def _new_ids(ids: list[str], count: int, suffix: str) -> list[str]:
    """Ids no public test image has: after the largest for numeric ids, else `hidden_N` (with the ids' suffix
    when the id is the file name)."""
    if all(i.isdigit() for i in ids):
        start = max(int(i) for i in ids) + 1
        return [str(start + n) for n in range(count)]
    extension = next((s for s in IMAGE_SUFFIXES if ids[0].endswith(s)), "") if not suffix else ""
    return [f"hidden_{n}{extension}" for n in range(count)]


def _copy_tree_but(public: Path, test_dir: Path, out: Path) -> None:
    """The folders above `test_dir` made real (not links), their other entries linked, so the test folder
    can differ."""
    for parent in reversed([p for p in test_dir.parents if public in p.parents]):
        (out / parent.relative_to(public)).mkdir(exist_ok=True)
        for entry in parent.iterdir():
            if entry != test_dir and entry not in test_dir.parents:
                os.symlink(entry.resolve(), out / entry.relative_to(public))


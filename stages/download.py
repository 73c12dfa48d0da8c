"""download: fetch the competition's data, extract it safely, and build the dataset index.

Recipe: get `SLUG.zip` (through the kaggle client, from a local archive or folder, or, for
`digits`, from scikit-learn) -> check it holds the members the competition expects -> extract it
and the archives nested in it -> index every train and test item (id, path, label, group) ->
find the images that do not decode and skip them (with a warning) or fail, per `download.bad_images`.

Writes `raw/` (the extracted files), `index.csv` and `report.json` (counts, bad items).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Literal

from pydantic import Field

from pipeline.core.artifacts import INDEX_FILE, RAW_DIR, REPORT_FILE, SOLUTION_FILE
from pipeline.core.config_reader import ConfigReader
from pipeline.core.errors import PipelineError
from pipeline.core.settings import StrictModel
from pipeline.core.stage import Stage, StageContext
from pipeline.data.archive import MAX_MEMBERS, MAX_RATIO

KAGGLE, DIGITS = "kaggle", "sklearn-digits"
FEW_ROWS_PER_CLASS = 5  # fewer training rows than this in a class: a warning at download


class GroupsFile(StrictModel):
    """A CSV that names each training file's group (State Farm: driver_imgs_list.csv)."""

    csv: str
    file_column: str
    label_column: str
    group_column: str


class Settings(StrictModel):
    """The `download` section: the competition's files, extracted and indexed."""

    source: str = Field("kaggle", description="kaggle | sklearn-digits | path to SLUG.zip or to a folder of its files")
    layout: Literal["pixels_csv", "class_folders", "filename_labels"] = Field("class_folders", description=(
        "pixels_csv | class_folders | filename_labels: how train labels are stored"))
    expected: list[str] = Field([], description=(
        "members SLUG.zip must hold at its top level (checked before extracting)"))
    sample_submission: str = Field("sample_submission.csv", description="its ids define the test set and its order")
    train_csv: str = Field("train.csv", description="pixels_csv: training rows (label column + pixel0..pixelN)")
    test_csv: str = Field("test.csv", description="pixels_csv: test rows (pixel0..pixelN), in sample-submission order")
    label_column: str = Field("label", description="pixels_csv: the label column of train_csv")
    train_dir: str = Field("train", description=(
        "image layouts: folder of training images, after nested archives are extracted"))
    test_dir: str = Field("test", description="image layouts: folder of test images")
    test_file: str = Field("{id}.jpg", description="image layouts: a test image's file name, from its submission id")
    image_extensions: list[str] = Field([".jpg", ".jpeg", ".png"], description="image layouts: files counted as images")
    groups: GroupsFile | None = Field(None, description=(
        "{csv, file_column, label_column, group_column}: a file's group (e.g. driver)"))
    max_ratio: float = Field(MAX_RATIO, gt=1, description=(
        "largest declared/compressed size of an archive member over 1 MiB: above it, a zip bomb (refused)"))
    max_members: int = Field(MAX_MEMBERS, ge=1, description=(
        "most members one archive (or a nested one) may hold: above it, refused before extracting"))
    bad_images: Literal["skip", "fail"] = Field("skip", description=(
        "skip (warn and leave out) | fail: what to do with undecodable items"))


def run(ctx: StageContext) -> dict:
    download, raw = ctx.settings, ctx.out / RAW_DIR
    if download.source == DIGITS:
        from pipeline.data.digits import write_digits_competition

        write_digits_competition(raw, solution=ctx.out / SOLUTION_FILE)
        return _index(ctx, raw)
    archive_or_folder = _fetch(ctx, download.source, ctx.config.competition.slug)
    _check_expected(archive_or_folder, download.expected)
    _unpack(ctx, archive_or_folder, raw)
    try:
        return _index(ctx, raw)
    except PipelineError as exc:  # name the file where the user finds it, not in the run's temporary folder
        where = f"{archive_or_folder}/" if archive_or_folder.is_dir() else f"{archive_or_folder} member "
        raise PipelineError(str(exc).replace(f"{raw}/", where)) from None


def _index(ctx: StageContext, raw: Path) -> dict:
    """Index the extracted files (`raw/`), check them against the config, write index.csv and report.json."""
    from pipeline.data.index import index_images, index_pixels_csv, unindexed_files

    download, competition = ctx.settings, ctx.config.competition
    if download.layout == "pixels_csv":
        index, bad = index_pixels_csv(raw, download, competition)
    else:
        index, bad, turned = index_images(raw, download, competition)
        if turned:
            ctx.warn(f"{len(turned)} images carry an EXIF orientation (a viewer shows them turned or mirrored; first: "
                     f"{turned[:3]}): kp uses every image as stored, as TensorFlow decodes it, for training and test "
                     "alike")

    if bad:
        listed = "; ".join(f"{b['path']}" + (f" row {b['row']}" if b["row"] >= 0 else "") + f": {b['error']}"
                           for b in bad[:5])
        if download.bad_images == "fail":
            raise PipelineError(f"{len(bad)} undecodable items (download.bad_images=fail): {listed}")
        ctx.warn(f"skipped {len(bad)} undecodable items: {listed}")
        broken = {(b["path"], b["row"]) for b in bad}
        keep = [(p, r) not in broken for p, r in zip(index["path"], index["row"])]
        dropped_test = index.loc[[not k for k in keep], "subset"].eq("test").sum()
        if dropped_test:
            ctx.warn(f"{dropped_test} of them are test items: the submission will need a fallback for those ids")
        index = index[keep]

    _check_classes(ctx, index, competition)
    _check_sample_submission(raw / download.sample_submission, competition)
    if download.layout != "pixels_csv":
        left = unindexed_files(raw, index, download)
        if left:
            ctx.warn(f"{len(left):,} files under {raw.name}/ are not in the index (not a training image of a class "
                     f"under {download.train_dir}/, or a test image the sample submission does not list; extensions "
                     f"{list(download.image_extensions)}); first: {left[:3]}")
    per_class = index.loc[index.subset == "train", "label"].value_counts()
    ctx.log("indexed: " + ", ".join(f"{name} {int(per_class.get(name, 0)):,}" for name in competition.classes)
            + f" training images; {int((index.subset == 'test').sum()):,} test")
    index.to_csv(ctx.out / INDEX_FILE, index=False)
    metrics = _counts(index)
    metrics["bad_items"] = bad
    (ctx.out / REPORT_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def _check_classes(ctx: StageContext, index, competition) -> None:
    """Every class of `competition.classes` has training rows (one error naming the empty ones), and a
    warning for those with fewer than `FEW_ROWS_PER_CLASS`: a class that vanished would otherwise
    train and submit without a word."""
    counts = index.loc[index.subset == "train", "label"].value_counts()
    empty = [name for name in competition.classes if counts.get(name, 0) == 0]
    if empty:
        raise PipelineError(f"competition.classes {empty} have no training rows in the download (rows per class: "
                            f"{ {name: int(counts.get(name, 0)) for name in competition.classes} }): check the archive "
                            "or competition.classes")
    few = {name: int(counts[name]) for name in competition.classes if counts[name] < FEW_ROWS_PER_CLASS}
    if few:
        ctx.warn(f"classes with fewer than {FEW_ROWS_PER_CLASS} training rows: {few}")


def _check_sample_submission(path: Path, competition) -> None:
    """The sample submission has the columns `competition.submission_columns` names, in that order, and
    its class columns are `competition.classes`: found at download, not after all the training."""
    from pipeline.core.readers import csv_header

    header = csv_header(path)
    if header != list(competition.submission_columns):
        raise PipelineError(f"{path}: its columns are {header}, but competition.submission_columns says "
                            f"{list(competition.submission_columns)} (names and order must match)")
    per_class = header[1:]
    if len(per_class) > 1 and per_class != list(competition.classes):
        raise PipelineError(f"{path}: its class columns {per_class} are not competition.classes "
                            f"{list(competition.classes)} in that order")


def _fetch(ctx: StageContext, source: str, slug: str) -> Path:
    if source == KAGGLE:
        from pipeline.kaggle.api import Network, download_competition

        ctx.log(f"downloading {slug} through the kaggle client")
        return download_competition(slug, ctx.cache_dir / "kaggle", Network.of(ctx.config.kaggle), ctx.settings.expected)
    path = ctx.config.path(source)
    if not path.exists():
        raise PipelineError(
            f"download.source {source!r}: {path} does not exist (expected 'kaggle', '{DIGITS}', "
            f"a {slug}.zip archive or a folder of its extracted files)"
        )
    return path


def _check_expected(archive_or_folder: Path, expected: list[str]) -> None:
    from pipeline.data.archive import list_members

    if archive_or_folder.is_dir():
        present = sorted(p.name for p in archive_or_folder.iterdir())
    else:
        present = sorted(list_members(archive_or_folder))
    missing = [name for name in expected if name not in present]
    if missing:
        raise PipelineError(
            f"{archive_or_folder}: missing expected member(s) {missing} (download.expected); "
            f"it has: {', '.join(present[:10])}{' ...' if len(present) > 10 else ''}"
        )


def _unpack(ctx: StageContext, archive_or_folder: Path, raw: Path) -> None:
    """Copy or extract what the layout needs (`download.expected` and the files the layout names, or
    everything when `expected` lists nothing) into `raw/`, then the archives nested in it, each
    within `download.max_ratio`."""
    from pipeline.data.archive import extract_nested, extract_zip

    only = _needed_members(ctx.settings)
    if archive_or_folder.is_dir():
        _check_source_folder(archive_or_folder, ctx.work_dir)
        ctx.log(f"copying {archive_or_folder}")
        if only is None:
            shutil.copytree(archive_or_folder, raw)
        raw.mkdir(parents=True, exist_ok=True)
        for name in only or ():
            source = archive_or_folder / name
            if source.exists():  # a file the layout names but the folder lacks: the index says which
                (shutil.copytree if source.is_dir() else shutil.copy2)(source, raw / name)
    else:
        ctx.log(f"extracting {archive_or_folder.name}")
        extract_zip(archive_or_folder, raw, only=only, max_ratio=ctx.settings.max_ratio,
                    max_members=ctx.settings.max_members)
    extract_nested(raw, ctx.log, max_ratio=ctx.settings.max_ratio, inside=str(archive_or_folder),
                   max_members=ctx.settings.max_members)


def _needed_members(download: Settings) -> list[str] | None:
    """The top-level members to unpack: `expected` and the files the layout reads (the sample
    submission, the pixel CSVs, the groups CSV); None (all of them) when `expected` is empty."""
    if not download.expected:
        return None
    named = [download.sample_submission, *([download.train_csv, download.test_csv]
                                           if download.layout == "pixels_csv" else []),
             *([download.groups.csv] if download.groups else [])]
    return list(dict.fromkeys([*download.expected, *(name.split("/")[0] for name in named)]))


def _check_source_folder(folder: Path, work_dir: Path) -> None:
    """A folder `download.source` is copied whole: refuse a symbolic link that leads out of it (as an
    archive's link members are refused) or back up to a folder above it (the copy would never end),
    anything that is neither a file nor a folder (a FIFO would block the copy forever, a device
    would copy without end), and a folder that holds the work folder (the copy would copy itself)."""
    root = folder.resolve()
    if work_dir.resolve().is_relative_to(root):
        raise PipelineError(f"download.source {folder}: the source folder contains the work folder {work_dir}; "
                            "set paths.work outside it")
    for path in sorted(folder.rglob("*")):
        shown = path.relative_to(folder)
        if path.is_symlink():
            target = path.resolve()
            if not target.is_relative_to(root):
                raise PipelineError(f"download.source {folder}: {shown} is a link to {target}, outside the source "
                                    "folder: kp copies only what is inside it")
            if target.is_dir() and path.parent.resolve().is_relative_to(target):
                raise PipelineError(f"download.source {folder}: {shown} is a link to {target}, a folder that holds "
                                    "it: copying it would never end")
        elif not (path.is_file() or path.is_dir()):
            raise PipelineError(f"download.source {folder}: {shown} is neither a file nor a folder (a FIFO, socket "
                                "or device): kp copies only files")


def _counts(index) -> dict:
    train, test = index[index.subset == "train"], index[index.subset == "test"]
    groups = sorted(g for g in train["group"].unique() if g)
    return {
        "n_train": int(len(train)),
        "n_test": int(len(test)),
        "train_per_class": {str(k): int(v) for k, v in train["label"].value_counts().sort_index().items()},
        "n_groups": len(groups),
    }


def _source_stamp(config: ConfigReader, stamp) -> dict:
    """A local archive or folder's stamp (`cache.stamp`: size and mtime, or sha256): replacing it
    makes download stale."""
    source = config.get("download.source")
    if source in (KAGGLE, DIGITS):
        return {}
    return stamp(config.path(source))


def _headline(m: dict) -> str:
    text = f"{m['n_train']:,} train / {m['n_test']:,} test, {len(m['train_per_class'])} classes"
    if m.get("n_groups"):
        text += f", {m['n_groups']} groups"
    if m.get("bad_items"):
        text += f", {len(m['bad_items'])} bad skipped"
    return text


STAGE = Stage(
    name="download",
    settings=Settings,
    run=run,
    reads=(
        "competition.slug", "competition.classes", "competition.id_column",
        "competition.submission_columns", "competition.image_size", "competition.channels",
    ),
    outs=(RAW_DIR + "/", INDEX_FILE, REPORT_FILE),
    headline=_headline,
    source_stamp=_source_stamp,
)

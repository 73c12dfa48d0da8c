"""Safe extraction of Kaggle archives: `SLUG.zip`, and the `train.zip`-style archives nested in it.

Every member is checked before anything is written: an absolute path, a `..` component, or a
symbolic link would let an archive write outside its folder, and is refused. A corrupt or
truncated archive fails with one message naming it. Callers extract into a stage's temporary
output folder, so a failure leaves nothing that a later run accepts.
"""
from __future__ import annotations

import shutil
import stat
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from pipeline.core.errors import PipelineError

_BAD_ARCHIVE = (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, zlib.error, NotImplementedError)


def list_members(archive: Path) -> list[str]:
    """The member names of a zip archive; a clear error if it is not a readable zip."""
    if not archive.is_file():
        raise PipelineError(f"{archive}: archive not found")
    try:
        with zipfile.ZipFile(archive) as zf:
            return zf.namelist()
    except _BAD_ARCHIVE as exc:
        raise PipelineError(f"{archive}: not a readable zip archive (corrupt or truncated: {exc})") from None


def extract_zip(archive: Path, dest: Path) -> int:
    """Extract `archive` into `dest` after checking every member; returns the number of files."""
    if not archive.is_file():
        raise PipelineError(f"{archive}: archive not found")
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    count = 0
    try:
        with zipfile.ZipFile(archive) as zf:
            members = zf.infolist()
            for info in members:
                _check_member(archive, info, root)
            for info in members:
                target = root.joinpath(*PurePosixPath(info.filename).parts)
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    with zf.open(info) as src, open(target, "wb") as out:
                        shutil.copyfileobj(src, out, length=1 << 20)
                except OSError as exc:  # a write error (disk full) carries no file name: give it one
                    if isinstance(exc, _BAD_ARCHIVE) or exc.filename:
                        raise
                    raise OSError(exc.errno, exc.strerror, str(target)) from None
                count += 1
    except _BAD_ARCHIVE as exc:
        raise PipelineError(f"{archive}: corrupt or truncated zip archive ({exc})") from None
    return count


def _check_member(archive: Path, info: zipfile.ZipInfo, root: Path) -> None:
    name = info.filename
    pure = PurePosixPath(name.replace("\\", "/"))
    mode = info.external_attr >> 16
    problem = None
    if pure.is_absolute() or (pure.parts and pure.parts[0].endswith(":")):
        problem = "is an absolute path"
    elif ".." in pure.parts:
        problem = "contains '..'"
    elif stat.S_ISLNK(mode):
        problem = "is a symbolic link"
    elif not root.joinpath(*pure.parts).resolve().is_relative_to(root):
        problem = "resolves outside the target folder"
    if problem:
        raise PipelineError(
            f"{archive}: refusing to extract: member {name!r} {problem} and would be written outside {root}"
        )


def extract_nested(folder: Path, log=lambda message: None) -> dict[str, int]:
    """Extract each `*.zip` directly inside `folder` (Kaggle's `train.zip`, `imgs.zip`) next to
    itself, then delete it. Returns files extracted per archive."""
    counts: dict[str, int] = {}
    for nested in sorted(folder.glob("*.zip")):
        log(f"extracting nested {nested.name}")
        counts[nested.name] = extract_zip(nested, folder)
        nested.unlink()
    return counts

"""Safe extraction of Kaggle archives: `SLUG.zip`, and the `train.zip`-style archives nested in it.

Members are named with `/`, or with `\\` as Windows tools write them (read as the same separator).
Every member is checked before anything is written: an absolute path, a `..` component, or a
symbolic link would let an archive write outside its folder, and is refused. So is a zip bomb:
the members to extract must declare no more bytes than the disk has free, no member above
`RATIO_FLOOR` bytes may declare more than `max_ratio` times its compressed size
(`download.max_ratio`, default `MAX_RATIO`; the real competitions' members are 1x for images
and up to 15x for CSVs), and an archive may hold at most `max_members` members
(`download.max_members`). While extracting, a member that yields more bytes than it declared is
stopped at that size. Only the members the layout needs (`download.expected`) are extracted when
they are listed. A corrupt or truncated archive fails with one message naming it. Callers
extract into a stage's temporary output folder, so a failure leaves nothing that a later run
accepts.
"""
from __future__ import annotations

import shutil
import stat
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from pipeline.core.errors import PipelineError

_BAD_ARCHIVE = (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, zlib.error, NotImplementedError)
MAX_RATIO = 100.0  # declared / compressed size above which a member is taken for a zip bomb
RATIO_FLOOR = 1 << 20  # members smaller than this (1 MiB) are never a bomb, whatever their ratio
MAX_MEMBERS = 1_000_000  # members one archive may hold (State Farm's imgs.zip: 102,150; a million empty files
                         # exhaust inodes, not bytes)


def list_members(archive: Path) -> list[str]:
    """The member names of a zip archive; a clear error if it is not a readable zip."""
    if not archive.is_file():
        raise PipelineError(f"{archive}: archive not found")
    try:
        with zipfile.ZipFile(archive) as zf:
            return zf.namelist()
    except _BAD_ARCHIVE as exc:
        raise PipelineError(f"{archive}: not a readable zip archive (corrupt or truncated: {exc})") from None


def extract_zip(archive: Path, dest: Path, only: list[str] | None = None, max_ratio: float = MAX_RATIO,
                label: str | None = None, max_members: int = MAX_MEMBERS) -> int:
    """Extract `archive` into `dest` after checking every member and the sizes they declare.

    Args:
        archive: the zip file.
        dest: the folder to extract into (created).
        only: top-level names to extract (files, or folders with what is under them); None: all.
        max_ratio: the largest declared / compressed size a member above `RATIO_FLOOR` may have.
        max_members: the most members the archive may hold.
        label: how messages name the archive (default its path), e.g. `train.zip in SLUG.zip`
            for a nested one that lives in a temporary folder.

    Returns:
        The number of files written.
    """
    name = label or str(archive)
    if not archive.is_file():
        raise PipelineError(f"{name}: archive not found")
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    count = 0
    try:
        with zipfile.ZipFile(archive) as zf:
            every = zf.infolist()
            if len(every) > max_members:
                raise PipelineError(f"{name}: refusing to extract: it holds {len(every):,} members, more than "
                                    f"download.max_members={max_members:,}; if the archive is genuine, raise it")
            for info in every:  # every member, extracted or not: a hostile archive is refused whole
                _check_member(name, info, root)
            members = [info for info in every if only is None or top_level(info.filename) in only]
            _check_sizes(name, members, root, max_ratio)
            for info in members:
                target = root.joinpath(*member_path(info.filename).parts)
                if info.filename.replace("\\", "/").endswith("/"):  # a folder entry
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    with zf.open(info) as src, open(target, "wb") as out:
                        _copy_at_most(src, out, info.file_size, f"{name}: member {info.filename!r}")
                except OSError as exc:  # a write error (disk full) carries no file name: give it one
                    if isinstance(exc, _BAD_ARCHIVE) or exc.filename:
                        raise
                    raise OSError(exc.errno, exc.strerror, str(target)) from None
                count += 1
    except _BAD_ARCHIVE as exc:
        raise PipelineError(f"{name}: corrupt or truncated zip archive ({exc})") from None
    return count


def member_path(member: str) -> PurePosixPath:
    """A member's path inside its archive. Zip tools on Windows write `train\\cat.1.jpg`: a backslash is
    the separator there (the zip format names `/` only, and no Kaggle file name holds a backslash), so
    it is read as one; the traversal checks apply to the path this gives."""
    return PurePosixPath(member.replace("\\", "/"))


def top_level(member: str) -> str:
    """`train/cat.1.jpg` (or `train\\cat.1.jpg`) -> `train`: the name `download.expected` lists it under."""
    parts = member_path(member).parts
    return parts[0] if parts else ""


def _check_sizes(name: str, members: list[zipfile.ZipInfo], root: Path, max_ratio: float) -> None:
    """Refuse a zip bomb before a byte is written: a member whose declared size is more than
    `max_ratio` times its compressed size, or members declaring more than the disk has free."""
    for info in members:
        if info.file_size > RATIO_FLOOR and info.file_size > max_ratio * max(info.compress_size, 1):
            raise PipelineError(
                f"{name}: refusing to extract: member {info.filename!r} declares {info.file_size:,} bytes from "
                f"{info.compress_size:,} compressed ({info.file_size / max(info.compress_size, 1):,.0f}x, above "
                f"download.max_ratio={max_ratio:g}); a zip bomb? If the archive is genuine, raise download.max_ratio")
    declared = sum(info.file_size for info in members)
    free = shutil.disk_usage(root).free
    if declared > free:
        raise PipelineError(f"{name}: refusing to extract: its members declare {declared / 1e6:,.1f} MB and only "
                            f"{free / 1e6:,.1f} MB are free at {root}; free some space or set paths.work elsewhere")


def _copy_at_most(src, out, declared: int, what: str) -> None:
    """Copy `src` to `out`, stopping with an error past the `declared` size (zipfile already stops
    there for a member whose header lies; this keeps the bound if that ever changes)."""
    written = 0
    while chunk := src.read(1 << 20):
        written += len(chunk)
        if written > declared:
            raise PipelineError(f"{what} yields more than the {declared:,} bytes it declares: refused (a zip bomb?)")
        out.write(chunk)


def _check_member(archive: str, info: zipfile.ZipInfo, root: Path) -> None:
    name = info.filename
    pure = member_path(name)
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
            f"{archive}: refusing to extract: member {name!r} {problem} and would be written outside the folder it is "
            "extracted to"
        )


def extract_nested(folder: Path, log=lambda message: None, max_ratio: float = MAX_RATIO,
                   inside: str | None = None, max_members: int = MAX_MEMBERS) -> dict[str, int]:
    """Extract each `*.zip` directly inside `folder` (Kaggle's `train.zip`, `imgs.zip`) next to
    itself, then delete it. `inside` names the archive they came from, for messages (the folder
    itself is temporary). Returns files extracted per archive."""
    counts: dict[str, int] = {}
    for nested in sorted(folder.glob("*.zip")):
        log(f"extracting nested {nested.name}")
        label = f"{nested.name} in {inside}" if inside else None
        counts[nested.name] = extract_zip(nested, folder, max_ratio=max_ratio, label=label, max_members=max_members)
        nested.unlink()
    return counts

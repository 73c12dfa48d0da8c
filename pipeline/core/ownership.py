"""One rule for every delete and overwrite: kp replaces or deletes only what kp made.

What kp made carries its record:
- a folder written whole (a run, a unit, the package's bundle, the kernel folder, its output) holds
  `.entry.json`, written last by `RunStore.write`, which lists each file with its size and
  modification time;
- a text file kp writes for people to keep (an overlay of `kp runs --best --apply`) starts with
  kp's header line (`KP_HEADER`);
- a competition's work folder holds `.kp-work` (`pipeline.core.cache.claim_work_folder`).

Before a command replaces or deletes one of these, `check_replaceable` looks: a path that does not
exist, or one kp made that nobody changed since, may go; anything else is a user's, and the
command stops with one line naming the path, what is someone else's about it, and the way out
(move it, choose another path, or `--force` where the command offers it). The project's own config
files (`configs/defaults.yaml`, a competition's `configs/COMP.yaml`) are never replaced, not even
with `--force`.
"""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.core.artifacts import ENTRY_FILE
from pipeline.core.errors import PipelineError

KP_HEADER = "# written by kp"  # the first line of a text file kp may replace


def file_record(folder: Path) -> dict[str, list[int]]:
    """Each file under `folder` (its record left out) as relative path -> [size, mtime in ns]: what
    `RunStore.write` records, so that a file added or edited later is seen as someone else's."""
    record = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()):
        relative = path.relative_to(folder).as_posix()
        if relative != ENTRY_FILE:
            stat = path.stat()
            record[relative] = [stat.st_size, stat.st_mtime_ns]
    return record


def not_made_by_kp(path: Path) -> list[str]:
    """What about `path` kp did not make: [] when it does not exist or is all kp's, unchanged.

    Returns:
        Lines naming each foreign thing: the folder itself (no record), or each file added or
        edited since kp wrote the folder; a text file without kp's header.
    """
    if not path.exists() and not path.is_symlink():
        return []
    if path.is_symlink() or not path.is_dir():
        with open(path, "rb") as handle:
            first = handle.read(len(KP_HEADER))
        return [] if first == KP_HEADER.encode() else [f"{path}: kp did not write it (it has no '{KP_HEADER}' header)"]
    try:
        entry = json.loads((path / ENTRY_FILE).read_text())
    except (OSError, ValueError):
        entry = None
    if not isinstance(entry, dict) or "key" not in entry:
        return [f"{path}: kp did not make this folder (no {ENTRY_FILE} record of what it wrote)"]
    recorded = entry.get("files")
    if recorded is None:  # an entry of a store that lists no files: kp's, whole
        return []
    problems = []
    for relative, (size, mtime) in file_record(path).items():
        if relative not in recorded:
            problems.append(f"{path / relative}: added after kp wrote {path.name}/")
        elif recorded[relative] != [size, mtime]:
            problems.append(f"{path / relative}: changed since kp wrote it")
    return problems


def check_replaceable(path: Path, way_out: str, force: bool = False) -> None:
    """Stop before replacing or deleting `path` unless kp made it and nobody changed it since.

    Args:
        path: the file or folder about to be replaced or deleted.
        way_out: what the user can do instead, e.g. "move it out of the bundle, or pass --force".
        force: replace it anyway (the user said so); never a project config file.

    Raises:
        PipelineError: one line naming the first foreign path (and how many more) and `way_out`.
    """
    if is_project_config(path):
        raise PipelineError(f"{path}: directly in configs/ live the defaults and each competition's own file, which "
                            "kp never writes; write it elsewhere (e.g. configs/overlays/NAME.yaml) and pass it with "
                            "--config")
    problems = [] if force else not_made_by_kp(path)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise PipelineError(f"{problems[0]}{more}: kp replaces only what it made; {way_out}")


def add_to_record(folder: Path, *relatives: str) -> None:
    """Record files kp added to a folder it made (e.g. the dataset metadata a push writes into the
    bundle), so that they count as kp's."""
    entry = folder / ENTRY_FILE
    record = json.loads(entry.read_text())
    files = record.setdefault("files", {})
    for relative in relatives:
        stat = (folder / relative).stat()
        files[relative] = [stat.st_size, stat.st_mtime_ns]
    entry.write_text(json.dumps(record) + "\n")


def is_project_config(path: Path) -> bool:
    """A file directly in a kp `configs/` folder (one holding `defaults.yaml`): the defaults, or a
    competition's `configs/COMP.yaml`. Overlays live in its subfolders or elsewhere."""
    try:
        folder = path.resolve().parent
    except OSError:
        return False
    return folder.name == "configs" and (folder / "defaults.yaml").is_file() and path.suffix in (".yaml", ".yml")


def owned_text(text: str, what: str) -> str:
    """`text` under kp's header line, saying what wrote it (so that the next write may replace it)."""
    return f"{KP_HEADER} {what}; kp may replace this file\n{text}"

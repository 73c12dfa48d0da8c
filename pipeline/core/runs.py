"""The run cache: every result a stage (or a unit of one, such as an ensemble member) ever wrote,
kept by fingerprint, so that switching a setting back restores the earlier result at once.

    work/COMP/_runs/STAGE/FINGERPRINT/     one finished run: manifest.json + the stage's outputs
    work/COMP/_runs/STAGE/last.json        how the current result got there: ran | restored, when
    work/COMP/STAGE -> _runs/STAGE/FP      the current result (a relative symbolic link)
    work/COMP/_runs/ensemble-members/KEY/  units: cached pieces of a stage, keyed by their own fingerprint

An entry is written into a `.tmp-` sibling and renamed into place only once complete, so a crash
or SIGKILL never leaves an entry that is accepted; `sweep_partial` removes what it leaves. The
link is replaced atomically (a new link renamed over the old one), so readers see the old result
or the new one, never neither. Like DVC's run-cache, but inside the competition's work folder.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from pipeline.core.artifacts import CACHE_FOLDER, CURVES_FOLDER, ENTRY_FILE, LAST_FILE, MANIFEST, OLD_PREFIX, RUNS_FOLDER, TMP_PREFIX, \
    VARIANTS_FOLDER
from pipeline.core.cache import Manifest, temporary_name, temporary_stem
from pipeline.core.errors import PipelineError
from pipeline.core.readers import read_json


@dataclass(frozen=True)
class Entry:
    """One stored run or unit: its key (a fingerprint), folder, size in bytes and last use (epoch s)."""

    key: str
    path: Path
    size: int
    used: float


def folder_size(path: Path) -> int:
    """Bytes in every file under `path`."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def _write_entry(folder: Path, key: str, record_files: bool = False) -> None:
    """The entry's record, written last (its presence says the entry is complete): its key, size and
    when; with `record_files`, each file with its size and mtime (`pipeline.core.ownership`: what kp
    made, for folders people open and may add to)."""
    from pipeline.core.ownership import file_record

    files = file_record(folder) if record_files else None
    size = sum(size for size, _ in files.values()) if files is not None else folder_size(folder)
    record = {"key": key, "size": size, "written": time.time()}
    if files is not None:
        record["files"] = files
    (folder / ENTRY_FILE).write_text(json.dumps(record) + "\n")


class RunStore:
    """The stored runs of one stage (or units of one kind), each in `root/KEY/`.

    `used`, when given, collects every key asked for through `path` (a manifest lists the units a
    run used, so that cleaning keeps them with the run). `record_files`: each entry's record lists
    its files, so that one a person added to or edited is not replaced (`pipeline.core.ownership`).
    """

    def __init__(self, root: Path, used: list[str] | None = None, record_files: bool = False):
        self.root = Path(root)
        self.used = used
        self.record_files = record_files

    def path(self, key: str) -> Path:
        if self.used is not None and key not in self.used:
            self.used.append(key)
        return self.root / key

    def has(self, key: str) -> bool:
        """An entry that was written completely (its `.entry.json` is the last thing written)."""
        return (self.path(key) / ENTRY_FILE).is_file()

    def touch(self, key: str) -> None:
        """Mark an entry as just used (what `kp clean --keep-last` keeps)."""
        os.utime(self.path(key) / ENTRY_FILE)

    @contextlib.contextmanager
    def write(self, key: str) -> Iterator[Path]:
        """Yield a fresh temporary folder; on success it becomes `root/KEY/` (replacing an older one).

        On an exception the temporary folder is removed and any earlier entry is left as it was.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / temporary_name(TMP_PREFIX, f"{key}-{os.getpid()}")  # `written_key` reads KEY back
        tmp.mkdir()
        try:
            yield tmp
            _write_entry(tmp, key, self.record_files)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        final = self.path(key)
        old = self.root / temporary_name(OLD_PREFIX, key)
        if final.exists():
            os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)

    def entries(self) -> list[Entry]:
        """Every complete entry, most recently used first."""
        found = []
        if not self.root.is_dir():
            return found
        for folder in self.root.iterdir():
            marker = folder / ENTRY_FILE
            if folder.name.startswith((TMP_PREFIX, OLD_PREFIX)) or not marker.is_file():
                continue
            try:
                size = int(json.loads(marker.read_text()).get("size", 0))
            except (OSError, ValueError):
                size = 0
            found.append(Entry(folder.name, folder, size, marker.stat().st_mtime))
        return sorted(found, key=lambda e: e.used, reverse=True)

    def remove(self, key: str) -> None:
        """Delete entry `key` (what a stage that keeps its units' contents elsewhere does once it has them)."""
        shutil.rmtree(self.root / key, ignore_errors=True)

    def prune(self, keep_last: int, protect: set[str] = frozenset(), dry_run: bool = False) -> list[Entry]:
        """Delete all but the `keep_last` most recently used entries (never those in `protect`); with
        `dry_run`, only say which."""
        removed = []
        for rank, entry in enumerate(self.entries()):
            if rank >= keep_last and entry.key not in protect:
                if not dry_run:
                    shutil.rmtree(entry.path, ignore_errors=True)
                removed.append(entry)
        return removed


def link_variant(work_dir: Path) -> None:
    """Make `work_dir` (`work/COMP/_variants/NAME/`) a variant's folder: its `_runs` and `_cache` are
    links to its competition's, so the run cache, keyed by content, serves both."""
    competition_dir = work_dir.parent.parent
    work_dir.mkdir(parents=True, exist_ok=True)
    for folder in (RUNS_FOLDER, CACHE_FOLDER):
        (competition_dir / folder).mkdir(exist_ok=True)
        link = work_dir / folder
        if not link.is_symlink():
            os.symlink(Path("..", "..", folder), link)


def written_key(name: str) -> str | None:
    """The key of the entry `RunStore.write` is writing into the temporary folder `name`
    (`.tmp-KEY-PID.kp-*`), or None for any other name."""
    stem = temporary_stem(name)
    return stem.rpartition("-")[0] or None if stem else None


def curves_dir(out: Path) -> Path | None:
    """Where TensorBoard's event files of a training writing into `out` go: for `out` inside a run-cache
    entry being written (`work/COMP/_runs/STORE/.tmp-KEY-PID.kp-*/SUB`), `work/COMP/_tensorboard/STORE/KEY/SUB`,
    outside the entry, so that its files stay the same bytes run after run; None for any other folder."""
    parts = out.resolve().parts
    if RUNS_FOLDER not in parts:
        return None
    i = len(parts) - 1 - parts[::-1].index(RUNS_FOLDER)
    if len(parts) < i + 3:
        return None
    store, entry = parts[i + 1], parts[i + 2]
    return Path(*parts[:i], CURVES_FOLDER, store, written_key(entry) or entry, *parts[i + 3:])


def runs_root(work_dir: Path) -> Path:
    return work_dir / RUNS_FOLDER


def stage_store(work_dir: Path, stage: str) -> RunStore:
    """The stored runs of `stage`."""
    return RunStore(runs_root(work_dir) / stage)


def unit_store_name(stage: str, kind: str) -> str:
    """The name of the store of `stage`'s units of `kind`: `STAGE-KIND` (`_runs/ensemble-members/`)."""
    return f"{stage}-{kind}"


def unit_store(work_dir: Path, stage: str, kind: str, used: list[str] | None = None) -> RunStore:
    """The stored units of `kind` of `stage` (`_runs/STAGE-KIND/`); `used` as `RunStore` takes it."""
    return RunStore(runs_root(work_dir) / unit_store_name(stage, kind), used)


def current_key(work_dir: Path, stage: str) -> str | None:
    """The fingerprint the stage's link points at (None: no link)."""
    link = work_dir / stage
    if link.is_symlink():
        return Path(os.readlink(link)).name
    return None


def point(work_dir: Path, stage: str, key: str, action: str, same_outputs: bool = False) -> None:
    """Make `work/STAGE` the stored run `key` (atomically) and record how (`ran` or `restored`; a run that wrote
    the same outputs as the run before it: `same_outputs`)."""
    link = work_dir / stage
    if link.exists() and not link.is_symlink():  # an output folder from before the run cache
        adopt_legacy_folder(work_dir, stage)
    tmp = work_dir / temporary_name(TMP_PREFIX, f"link-{stage}")
    os.symlink(Path(RUNS_FOLDER) / stage / key, tmp)
    os.replace(tmp, link)
    store = stage_store(work_dir, stage)
    store.touch(key)
    last = {"fingerprint": key, "action": action, "time": time.time(), **({"same_outputs": True} if same_outputs else {})}
    (store.root / LAST_FILE).write_text(json.dumps(last) + "\n")


def last_action(work_dir: Path, stage: str) -> dict:
    try:
        return read_json(stage_store(work_dir, stage).root / LAST_FILE)
    except (OSError, PipelineError):  # none yet, or damaged: it only says how the result got there
        return {}


def adopt_legacy_folder(work_dir: Path, stage: str) -> None:
    """Move a pre-run-cache `work/STAGE/` folder into the store under its manifest's fingerprint."""
    folder = work_dir / stage
    manifest = Manifest.read(folder)
    if manifest is None:
        raise PipelineError(f"{folder}: a folder kp did not write (no readable {MANIFEST}) where stage {stage!r} keeps "
                            "its result; kp deletes nothing it did not create: move it away and rerun")
    key = manifest.fingerprint
    store = stage_store(work_dir, stage)
    store.root.mkdir(parents=True, exist_ok=True)
    if store.path(key).exists():
        shutil.rmtree(folder)
        return
    _write_entry(folder, key)
    os.rename(folder, store.path(key))


def unit_stores(work_dir: Path, stage: str) -> list[RunStore]:
    """The unit stores of `stage` (`_runs/STAGE-KIND/`)."""
    root = runs_root(work_dir)
    return [RunStore(p) for p in sorted(root.glob(unit_store_name(stage, "*"))) if p.is_dir()] if root.is_dir() else []


def remove_stage(work_dir: Path, stage: str, dry_run: bool = False) -> list[Path]:
    """Delete a stage's current link, every stored run and every unit it cached (`dry_run`: only say which)."""
    removed = []
    link = work_dir / stage
    if link.is_symlink():
        if not dry_run:
            link.unlink()
        removed.append(link)
    elif link.is_dir():
        if not (link / MANIFEST).is_file():
            raise PipelineError(f"{link}: a folder kp did not write (no {MANIFEST}); kp deletes nothing it did not "
                                "create: move it away yourself")
        if not dry_run:
            shutil.rmtree(link)
        removed.append(link)
    for folder in [stage_store(work_dir, stage).root, *(s.root for s in unit_stores(work_dir, stage))]:
        if folder.is_dir():
            if not dry_run:
                shutil.rmtree(folder)
            removed.append(folder)
    return removed


def prune_stage(work_dir: Path, stage: str, keep_last: int, dry_run: bool = False) -> list[Entry]:
    """Keep the current run and the `keep_last` most recently used stored runs of `stage` (at least
    the current one), and the units those runs used; delete the rest (`dry_run`: only say which)."""
    store = stage_store(work_dir, stage)
    current = current_key(work_dir, stage)
    variants = work_dir / VARIANTS_FOLDER  # blend sources share this store: their current runs stay too
    protect = {key for key in [current, *(current_key(v, stage) for v in sorted(variants.glob("*")))] if key}
    removed = store.prune(max(keep_last, 1 if current else 0), protect=protect, dry_run=dry_run)
    gone = {entry.key for entry in removed}
    kept_units: dict[str, set[str]] = {}
    for entry in store.entries():
        manifest = Manifest.read(entry.path) if entry.key not in gone else None
        for name, keys in (manifest.units if manifest else {}).items():
            kept_units.setdefault(name, set()).update(keys)
    for units in unit_stores(work_dir, stage):
        removed += units.prune(0, protect=kept_units.get(units.root.name, set()), dry_run=dry_run)
    return removed


def store_sizes(work_dir: Path) -> dict[str, tuple[int, int]]:
    """{store name: (entries, bytes)} for every store under `_runs/`, from the sizes recorded at write time."""
    root = runs_root(work_dir)
    if not root.is_dir():
        return {}
    sizes = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        entries = RunStore(folder).entries()
        sizes[folder.name] = (len(entries), sum(e.size for e in entries))
    return sizes

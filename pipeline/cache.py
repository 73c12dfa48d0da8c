"""The artifact cache: fingerprints, manifests, and output folders that appear whole or not at all.

A stage's fingerprint hashes the config values it reads, its upstream stages' fingerprints, its
code version and any source stamp. Its outputs live in `work/COMP/STAGE/` with `manifest.json`;
a folder without a manifest, or whose manifest's fingerprint differs from the one the current
config gives, is not up to date. Outputs are written into a temporary sibling folder that is
renamed into place only after the stage returned and its manifest was written, so a crash or a
SIGKILL leaves at most a `.tmp-*` folder that nothing accepts and the next run sweeps away.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from pipeline.errors import PipelineError

MANIFEST = "manifest.json"
TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"


def file_stamp(path: Path) -> dict[str, Any]:
    """Size and modification time of a file, or of every file in a folder: a cheap change detector
    for inputs that live outside the config (a source archive, a weights file)."""
    if path.is_file():
        st = path.stat()
        return {"size": st.st_size, "mtime": int(st.st_mtime)}
    if path.is_dir():
        files = [p.stat() for p in path.rglob("*") if p.is_file()]
        return {"files": len(files), "size": sum(s.st_size for s in files),
                "mtime": int(max((s.st_mtime for s in files), default=0))}
    return {"missing": True}


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def fingerprint_inputs(stage, config, upstream_fingerprints: dict[str, str]) -> dict[str, Any]:
    """Everything a stage's output depends on, as plain JSON values."""
    stamp = stage.source_stamp(config) if stage.source_stamp else {}
    return {
        "stage": stage.name,
        "version": stage.version,
        "config": {key: config.get(key) for key in stage.keys},
        "upstream": {name: upstream_fingerprints[name] for name in stage.needs_for(config)},
        "stamp": stamp,
    }


def fingerprint(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(inputs).encode()).hexdigest()[:16]


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """{'split': {'fraction': 0.2}} -> {'split.fraction': 0.2}; used to explain what changed."""
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, sub in value.items():
            out.update(flatten(sub, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): value}


@dataclass
class Manifest:
    """What a finished stage run records beside its outputs (`manifest.json`)."""

    stage: str
    fingerprint: str
    inputs: dict[str, Any]
    started: str
    finished: str
    duration_s: float
    outputs: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    headline: str = ""
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def read(cls, folder: Path) -> "Manifest | None":
        path = folder / MANIFEST
        try:
            data = json.loads(path.read_text())
            return cls(**data)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError):
            return None  # unreadable: treated as missing, so the stage reruns

    def write(self, folder: Path) -> None:
        write_text_atomic(folder / MANIFEST, json.dumps(self.__dict__, indent=2, default=str) + "\n")


def output_sizes(folder: Path) -> dict[str, int]:
    """Size in bytes of each top-level entry (folders summed), for the manifest."""
    sizes: dict[str, int] = {}
    for entry in sorted(folder.iterdir()):
        if entry.name == MANIFEST:
            continue
        if entry.is_dir():
            sizes[entry.name + "/"] = sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
        else:
            sizes[entry.name] = entry.stat().st_size
    return sizes


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write a file under a temporary name in the same folder, then rename it into place: readers
    see the old file or the whole new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_output_dir(final: Path) -> Iterator[Path]:
    """Yield a fresh temporary folder; on success it replaces `final` (old contents kept until then).

    On an exception the temporary folder is removed and `final` is left exactly as it was. After a
    SIGKILL the temporary folder stays behind under a `.tmp-` name, which `sweep_partial` removes.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f"{TMP_PREFIX}{final.name}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.parent / f"{OLD_PREFIX}{final.name}-{uuid.uuid4().hex[:6]}"
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def sweep_partial(work_dir: Path) -> list[Path]:
    """Remove what killed runs left behind (`.tmp-*` and `.old-*`); returns what was removed.

    An `.old-` folder whose final folder is missing is the previous good output of a run killed
    between its two renames: it is put back rather than deleted.
    """
    removed: list[Path] = []
    if not work_dir.is_dir():
        return removed
    for entry in sorted(work_dir.iterdir()):
        if entry.name.startswith(OLD_PREFIX):
            stage = entry.name[len(OLD_PREFIX):].rsplit("-", 1)[0]
            if not (work_dir / stage).exists():
                os.rename(entry, work_dir / stage)
                continue
        if entry.name.startswith((TMP_PREFIX, OLD_PREFIX)):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


@contextlib.contextmanager
def competition_lock(work_dir: Path) -> Iterator[None]:
    """One writer per competition at a time: a second `kp` run fails at once instead of racing."""
    work_dir.mkdir(parents=True, exist_ok=True)
    with open(work_dir / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PipelineError(
                f"{work_dir}: another kp run holds this competition's lock; wait for it to finish"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)

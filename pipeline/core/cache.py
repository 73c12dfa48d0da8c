"""The artifact cache: fingerprints, manifests, atomic writes, crash leftovers and the competition lock.

A stage's fingerprint hashes the config values it declares (`Stage.keys_for`), the digest of what
its upstream stages wrote (`output_digests`: early cutoff, `pipeline.engine.status`), its code
(`pipeline.core.code_version`) and any source stamp (a source archive's or weights file's size and
mtime, or its sha256). Each finished run lives in the run cache (`pipeline.core.runs`) with
`manifest.json`; a run whose manifest's fingerprint differs from the one the current config and
upstream outputs give (an upstream rerun that wrote different bytes changes it), or whose declared
outputs are missing or changed size, is not up to date. The manifest
also keeps a content digest per output: `kp status --verify` and every `--force` run compare them,
which finds a file changed in place at the same size. Everything is written under a temporary
name and renamed into place when complete, so a crash or a SIGKILL leaves at most `.tmp-*` /
`.old-*` leftovers, which `sweep_partial` clears.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from pipeline.core.artifacts import (CACHE_FOLDER, LOCK_FILE, MANIFEST, META_FILE, OLD_PREFIX, RUNS_FOLDER,
                                     TEMPORARY_MARK, TMP_PREFIX, WORK_MARKER)
from pipeline.core.errors import PipelineError

STAMP_MODES = ("mtime", "content")


def file_stamp(path: Path, mode: str = "mtime", memo: Path | None = None, remember: bool = True) -> dict[str, Any]:
    """A change detector for an input that lives outside the config (a source archive, a weights file).

    Args:
        path: a file or a folder.
        mode: `mtime` (size and modification time: cheap; a copied file looks changed) or `content`
            (sha256 of the bytes: a copied file looks the same, a same-size edit does not).
        memo: a JSON file remembering sha256 per file version (path, inode, size, mtime and ctime in ns;
            ctime changes with every write and cannot be set back), so `content` hashes a file
            once per version rather than at every `kp status`.
        remember: write what `content` hashed into `memo` (False: read it only, as `kp status` does).

    Returns:
        A small JSON-able dict that goes into the fingerprint.
    """
    if not path.exists():
        return {"missing": True}
    if mode == "content":
        return {"sha256": _content_hash(path, memo, remember)}
    if path.is_file():
        st = path.stat()
        return {"size": st.st_size, "mtime": int(st.st_mtime)}
    files = [p.stat() for p in path.rglob("*") if p.is_file()]
    return {"files": len(files), "size": sum(s.st_size for s in files),
            "mtime": int(max((s.st_mtime for s in files), default=0))}


def _content_hash(path: Path, memo: Path | None, remember: bool = True) -> str:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    known = _read_json(memo) if memo else {}
    hashed = len(known)
    digest = hashlib.sha256()
    for file in files:
        st = file.stat()
        key = f"{file.resolve()}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}"
        if key not in known:
            h = hashlib.sha256()
            with open(file, "rb") as handle:
                while chunk := handle.read(1 << 20):
                    h.update(chunk)
            known[key] = h.hexdigest()
        digest.update(f"{file.relative_to(path) if path.is_dir() else file.name}:{known[key]}".encode())
    if memo and remember and len(known) > hashed:
        write_text_atomic(memo, json.dumps(known))
    return digest.hexdigest()[:16]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def fingerprint(inputs: dict[str, Any]) -> str:
    """16 hex digits of sha256 over the canonical JSON of `inputs`."""
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
    """What a finished stage run records beside its outputs (`manifest.json`).

    `units` names the cached units (e.g. ensemble members) the run used, by store, so that
    `kp clean --keep-last` keeps the units of every run it keeps.
    """

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
    units: dict[str, list[str]] = field(default_factory=dict)
    digest: str = ""  # `output_digests`: what the run wrote for others to read, its plots left out
    contents: dict[str, str] = field(default_factory=dict)  # content digest per output (`output_digests`)
    upstream: dict[str, str] = field(default_factory=dict)  # each upstream stage's `digest` this run read
    reads: dict[str, str] = field(default_factory=dict)  # each upstream (and variant) run it read, by fingerprint

    @classmethod
    def read(cls, folder: Path) -> "Manifest | None":
        """The manifest in `folder`, or None when there is none or it is unreadable, not JSON, or
        valid JSON with a field of the wrong kind: treated as missing, so the stage reruns."""
        try:
            manifest = cls(**json.loads((folder / MANIFEST).read_text()))
        except (OSError, ValueError, TypeError):
            return None
        return manifest if manifest._well_formed() else None

    def _well_formed(self) -> bool:
        kinds = {"stage": str, "fingerprint": str, "inputs": dict, "started": str, "finished": str,
                 "duration_s": (int, float), "outputs": dict, "metrics": dict, "headline": str, "warnings": list,
                 "units": dict, "digest": str, "contents": dict, "upstream": dict, "reads": dict}
        return (all(isinstance(getattr(self, name), kind) and not isinstance(getattr(self, name), bool)
                    for name, kind in kinds.items())
                and all(isinstance(size, int) for size in self.outputs.values())
                and all(isinstance(value, str) for value in (*self.contents.values(), *self.upstream.values())))

    def write(self, folder: Path) -> None:
        write_text_atomic(folder / MANIFEST, json.dumps(self.__dict__, indent=2, default=str) + "\n")


def output_sizes(folder: Path) -> dict[str, int]:
    """Size in bytes of each top-level entry (folders summed, as `name/`), for the manifest."""
    sizes: dict[str, int] = {}
    for entry in sorted(folder.iterdir()):
        if entry.name == MANIFEST or entry.name.startswith("."):
            continue
        if entry.is_dir():
            sizes[entry.name + "/"] = sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
        else:
            sizes[entry.name] = entry.stat().st_size
    return sizes


DRAWINGS = (".png",)  # what a run draws for people; no stage reads it
RUN_RECORDS = (MANIFEST, META_FILE)  # how a run went (timings, what it reused), beside the arrays it describes


def output_digests(folder: Path) -> tuple[str, dict[str, str]]:
    """One read of a run's files gives both digests the manifest records.

    The first is sha256 over every file a run wrote for other stages to read (paths and bytes),
    leaving out its drawings and its records of how the run went: two runs that computed the same
    arrays and models have the same digest even when their plots, timings or reuse differ. Units
    downstream are keyed by it (`StageContext.map_units`), and downstream runs record it
    (`Manifest.upstream`).

    Returns:
        (that digest, and a content digest per top-level entry the manifest's `outputs`
        lists: a file's bytes, or a folder's paths and bytes), each 16 hex digits.
    """
    overall = hashlib.sha256()
    per_entry: dict[str, Any] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder)
        if relative == Path(MANIFEST) or any(part.startswith(".") for part in relative.parts):
            continue
        shared = not (path.suffix in DRAWINGS or path.name in RUN_RECORDS)
        entry = relative.parts[0] + ("/" if len(relative.parts) > 1 else "")
        own = per_entry.setdefault(entry, hashlib.sha256())
        if shared:
            overall.update(f"{relative}\0".encode())
        own.update(f"{relative}\0".encode())
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 20):
                own.update(chunk)
                if shared:
                    overall.update(chunk)
    return overall.hexdigest()[:16], {name: h.hexdigest()[:16] for name, h in per_entry.items()}


def changed_outputs(folder: Path, manifest: "Manifest") -> list[str]:
    """Outputs whose bytes differ from what the run wrote (the manifest's `contents`), e.g. a file
    zeroed or edited in place at the same size, which the size check of `output_problems` cannot
    see. Reads every byte: `kp status --verify` and every `--force` run call it, plain runs do not.

    Returns:
        One reason per damaged output (`output X changed since the run wrote it`).
    """
    if not manifest.contents:
        return []  # written before content digests were recorded: nothing to compare with
    now = output_digests(folder)[1]
    return [f"output {name} changed since the run wrote it (its content digest differs)"
            for name, digest in sorted(manifest.contents.items()) if now.get(name) != digest]


def upstream_digests(inputs: dict[str, Path]) -> dict[str, str]:
    """The `digest` of each upstream stage's current result (the folders a run reads): what a run's
    manifest records it read (`Manifest.upstream`), and what its units are keyed by."""
    manifests = {name: Manifest.read(folder) for name, folder in inputs.items()}
    return {name: m.digest for name, m in manifests.items() if m is not None and m.digest}


def output_problems(folder: Path, outs: tuple[str, ...], recorded: dict[str, int] | None) -> list[str]:
    """What is wrong with a run's declared outputs: `output X missing`, or `output X changed` (a file
    whose size differs from the manifest's). Folders (`name/`) are checked for existence only."""
    problems = []
    for name in outs:
        path = folder / name.rstrip("/")
        if not path.exists():
            problems.append(f"output {name} missing")
        elif not name.endswith("/") and recorded is not None and name in recorded \
                and path.stat().st_size != recorded[name]:
            problems.append(f"output {name} changed ({recorded[name]:,} -> {path.stat().st_size:,} bytes)")
    return problems


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write a file under a temporary name in the same folder, then rename it into place: readers
    see the old file or the whole new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(temporary_name(TMP_PREFIX, path.name))
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if exc.filename:
            raise
        raise OSError(exc.errno, exc.strerror, str(path)) from None  # a failed write names no file
    finally:
        tmp.unlink(missing_ok=True)


def link_or_copy(source: Path, target: Path) -> None:
    """Put a stored file into another folder without copying its bytes (a hard link; a copy across filesystems)."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


_KP_TEMPORARY = re.compile(rf"^({re.escape(TMP_PREFIX)}|{re.escape(OLD_PREFIX)})(.+){re.escape(TEMPORARY_MARK)}[0-9a-f]{{8}}$")


def temporary_name(prefix: str, stem: str) -> str:
    """A name only kp makes: `.tmp-STEM.kp-1a2b3c4d` (or `.old-...`); `sweep_partial` removes nothing else."""
    return f"{prefix}{stem}{TEMPORARY_MARK}{uuid.uuid4().hex[:8]}"


def temporary_stem(name: str) -> str | None:
    """STEM of a name `temporary_name` made, or None for any other name (a user's `.tmp-notes`)."""
    match = _KP_TEMPORARY.match(name)
    return match.group(2) if match else None


def sweep_partial(work_dir: Path) -> list[Path]:
    """Remove what killed runs left behind (temporary `.tmp-*`, `.old-*` entries named by kp) anywhere
    the pipeline writes under `work_dir`: the folder itself, each run store and each download cache.
    Files of the same prefix that kp did not name are left alone. Returns what was removed.

    An `.old-KEY.kp-*` entry whose `KEY` is missing is the previous good result of a run killed between
    its two renames: it is put back rather than deleted.
    """
    removed: list[Path] = []
    if not work_dir.is_dir():
        return removed
    folders = [work_dir]
    for parent in (work_dir / RUNS_FOLDER, work_dir / CACHE_FOLDER):
        if parent.is_dir() and not parent.is_symlink():  # a variant's: its competition's run sweeps it
            folders += [p for p in parent.iterdir() if p.is_dir() and not p.name.startswith((TMP_PREFIX, OLD_PREFIX))]
    for folder in folders:
        for entry in sorted(folder.iterdir()):
            stem = temporary_stem(entry.name)
            if stem is None:
                continue
            if entry.name.startswith(OLD_PREFIX):
                if entry.is_dir() and not entry.is_symlink() and not (folder / stem).exists():
                    os.rename(entry, folder / stem)
                    continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def claim_work_folder(work_dir: Path) -> None:
    """Make sure `work_dir` is kp's before anything is written or deleted there: create it with its
    marker (`.kp-work`), or mark an empty folder or one an earlier kp made (it holds kp's lock file or
    run cache); any other existing folder is a user's: one PipelineError, and nothing is touched."""
    marker = work_dir / WORK_MARKER
    if marker.is_file():
        return
    if work_dir.exists() and not work_dir.is_dir():
        raise PipelineError(f"{work_dir}: a file is in the way of the competition's work folder; move it or set "
                            "paths.work elsewhere")
    if work_dir.is_dir() and any(work_dir.iterdir()) and not ((work_dir / LOCK_FILE).is_file()
                                                               or (work_dir / RUNS_FOLDER).is_dir()):
        raise PipelineError(f"{work_dir}: this folder exists and kp did not create it (no {WORK_MARKER} in it): "
                            "kp writes and deletes only in folders it made; set paths.work elsewhere or move it")
    work_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text("kp's work folder for one competition: kp may delete what is inside\n")


@contextlib.contextmanager
def competition_lock(work_dir: Path, wait: bool = False, poll_s: float = 0.5) -> Iterator[None]:
    """One writer per competition at a time: a second `kp` run stops at once (or, with `wait`, waits)
    instead of racing, naming the run that holds the lock. The folder is claimed first
    (`claim_work_folder`): kp never locks, writes or deletes in a user's folder.

    Args:
        work_dir: the competition's (or a variant's) work folder.
        wait: wait until the other run lets go (saying once who holds it), instead of stopping.
        poll_s: seconds between two tries while waiting.
    """
    claim_work_folder(work_dir)
    path = work_dir / LOCK_FILE
    with open(path, "a+") as handle:  # never truncated before it is ours: it names the holder
        said = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = lock_holder(path)
                if not wait:
                    raise PipelineError(f"{work_dir}: {holder}; wait for it to finish, or rerun with --wait to "
                                        "start as soon as it does") from None
                if not said:
                    print(f"waiting: {holder}", file=sys.stderr, flush=True)
                    said = True
                time.sleep(poll_s)
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "command": " ".join(["kp", *sys.argv[1:]]),
                                 "since": time.time()}) + "\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def lock_holder(path: Path) -> str:
    """Who holds the competition's lock file `path`, as a sentence: its process, command and for how long."""
    try:
        holder = json.loads(path.read_text())
        held = max(0, int(time.time() - float(holder["since"])))
    except (OSError, ValueError, KeyError, TypeError):
        return "another kp run holds this competition's lock"
    minutes, seconds = divmod(held, 60)
    return (f"another kp run holds this competition's lock: process {holder.get('pid')} "
            f"(`{holder.get('command')}`), for {f'{minutes} min ' if minutes else ''}{seconds} s")

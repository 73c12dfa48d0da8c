"""The settings of the last run in a work folder (`work/COMP/last-run.json`): the config files and `--set`s
that `kp all` / `kp STAGE` ran with, so that `kp status`, `report`, `runs`, `submit`, `package` and `kernel
push`, given no settings of their own, act on what the user just ran rather than on the files alone.
"""
from __future__ import annotations

import json
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

from pipeline.core.artifacts import LAST_RUN_FILE
from pipeline.core.cache import claim_work_folder, write_text_atomic
from pipeline.core.errors import PipelineError


WHERE_AND_HOW = ("paths.", "cache.wait")  # keys that say where the work folder is and how to take its lock


def own_settings(extra_files, sets) -> bool:
    """Whether a command was given settings of its own: a `--config`, or a `--set` of anything but `paths.*`
    and `cache.wait` (`--wait`), which say where the work folder is and how to wait for it."""
    return bool(extra_files) or any(not s.strip().startswith(WHERE_AND_HOW) for s in sets)


def remember(work_dir: Path, extra_files, sets) -> None:
    """Write what a run is about to run with into `work_dir` (claimed as kp's first): its config files as
    absolute paths and its `--set`s but `paths.*` and `cache.wait`."""
    claim_work_folder(work_dir)
    record = {"config": [str(Path(f).resolve()) for f in extra_files],
              "set": [s for s in sets if not s.strip().startswith(WHERE_AND_HOW)],
              "command": shlex.join(["kp", *sys.argv[1:]]),
              "recorded": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    write_text_atomic(work_dir / LAST_RUN_FILE, json.dumps(record, indent=1) + "\n")


def recalled(work_dir: Path) -> dict | None:
    """The last run's record in `work_dir`, or None when none was kept (or it holds no settings beyond the files).

    Raises:
        PipelineError: the record is not what `remember` writes, naming the file and the way out.
    """
    path = work_dir / LAST_RUN_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        files, sets = [str(f) for f in record["config"]], [str(s) for s in record["set"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PipelineError(f"{path}: not a record of the last run ({exc}); delete it, or pass --as-configured") \
            from None
    return {**record, "config": files, "set": sets} if files or sets else None


def described(record: dict) -> str:
    """The record's settings as the flags that give them (`--config FILE --set KEY=VALUE ...`)."""
    return shlex.join([*(a for f in record["config"] for a in ("--config", f)),
                       *(a for s in record["set"] for a in ("--set", s))])

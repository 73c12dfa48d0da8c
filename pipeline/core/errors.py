"""The one exception type a user sees, and the wording of the filesystem errors a user can meet.

Every failure a user can cause or meet ends as one message (exit status 2) naming the file, key,
row or path and what to do; the CLI and the runner's error boundary turn a `PipelineError` or an
`OSError` into that line, never a traceback.
"""
from __future__ import annotations

import errno
import shutil
from pathlib import Path


class PipelineError(Exception):
    """Bad input or a failed precondition, worded for the user.

    The message names the file, key or row at fault and what was expected. The CLI prints it
    and exits with status 2; it never carries a traceback to the terminal.
    """


class RunStopped(Exception):
    """A run stopped on purpose by whoever started it (a sweep stops a trial whose first folds are clearly
    worse than its best trial's): not a failure, so the runner lets it through untouched; what the run
    had stored (its finished units) stays in the run cache, the stage's own result is not written."""


def free_megabytes(path: Path) -> float:
    """Free space on the filesystem holding `path` (or its nearest existing parent), in MB."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free / 1e6


def describe_os_error(exc: OSError) -> str:
    """One line for a filesystem error: what happened, to which path, and what to do."""
    path = exc.filename or "(unknown path)"
    code = exc.errno
    if code in (errno.ENOSPC, errno.EDQUOT):
        return (f"disk full while writing {path} ({free_megabytes(Path(path)):.1f} MB free there); free some space "
                "(e.g. kp clean --keep-last 1) and run again: nothing already written was lost")
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"{path}: cannot write here ({exc.strerror}); make it writable or point paths.work / paths.submissions elsewhere"
    if code in (errno.ENOTDIR, errno.EEXIST):
        return f"{path}: a file is in the way where a folder is expected ({exc.strerror}); move it or change paths.*"
    return f"{path}: {exc.strerror or exc}"

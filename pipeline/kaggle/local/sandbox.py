"""How the local Kaggle server runs a pushed kernel the way Kaggle reruns a code submission: in a
subprocess of its own, with no network, within a time limit, given only the attached inputs.

- No network: the kernel runs in a network namespace of its own, `unshare --user --map-root-user
  --net` (its only device, loopback, is down: every connection fails with "Network is unreachable",
  127.0.0.1 included), where the machine allows unprivileged user namespaces (`network_isolation`
  checks once). Where it does not, a run is refused unless the caller accepts a kernel with network
  (`isolate=False`, said in the run's record).
- A time limit: at `timeout_s` the kernel's whole process group is killed and the run ends as an
  error saying so.
- Inputs: the kernel gets a Kaggle-like root of its own, `ROOT/input/NAME` (a link to each attached
  folder: the competition's files, the bundle's dataset) and `ROOT/working` (its working folder and
  output), through `KP_KAGGLE_ROOT` (Kaggle's is `/kaggle`); its environment holds nothing else of
  the caller's but `PATH`. Other files of the machine are not hidden (no chroot); a kernel is given
  no path to them.
- Output: a kernel that exits 0 but writes no `submission.csv` is an error naming that; a kernel that
  fails is an error with the last lines of its log.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from pipeline.core.artifacts import KERNEL_LOG, SUBMISSION_FILE

ISOLATE = ["unshare", "--user", "--map-root-user", "--net"]
LOG_TAIL = 3000  # characters of the kernel's log kept in its run record


@dataclass
class KernelRun:
    """How a kernel run ended: `complete` or `error` (with `failure`), in how long, with its log's tail;
    `isolated`: whether it ran without network."""

    status: str
    seconds: float
    log: str
    working: Path
    isolated: bool
    failure: str | None = None
    outputs: list[str] = field(default_factory=list)


@lru_cache(maxsize=1)
def network_isolation() -> bool:
    """Whether this machine can run a process in a network namespace of its own without root."""
    if shutil.which("unshare") is None:
        return False
    try:
        return subprocess.run([*ISOLATE, "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def run_kernel(script: Path, inputs: dict[str, Path], root: Path, timeout_s: float, python: str = sys.executable,
               isolate: bool = True) -> KernelRun:
    """Run the kernel `script` as Kaggle would, in `root` (created; `root/working` is its output).

    Args:
        script: the kernel's code (a Python script).
        inputs: attached folders by the name they get under `input/` (the competition's slug, a dataset's).
        root: the run's own Kaggle-like root.
        timeout_s: the time limit.
        python: the interpreter (Kaggle's image: one with TensorFlow and no kp, or a venv).
        isolate: run without network (refused with the reason where the machine cannot).

    Returns:
        The run's `KernelRun`.
    """
    if isolate and not network_isolation():
        raise RuntimeError("this machine cannot run a kernel without network (unprivileged user namespaces are "
                           "off: `unshare --user --net true` fails); pass isolate=False to run it with network")
    working = root / "working"
    working.mkdir(parents=True)
    (root / "input").mkdir()
    for name, folder in inputs.items():
        os.symlink(Path(folder).resolve(), root / "input" / name)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(working), "KP_KAGGLE_ROOT": str(root),
           "PYTHONUNBUFFERED": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
    command = [*(ISOLATE if isolate else []), python, str(script)]
    clock = time.perf_counter()
    with open(root / KERNEL_LOG, "w") as log:
        process = subprocess.Popen(command, cwd=working, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            code = process.wait(timeout=timeout_s)
            failure = None if code == 0 else f"the kernel exited with status {code}"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            failure = f"the kernel exceeded its time limit of {timeout_s:g} s and was stopped"
    seconds = round(time.perf_counter() - clock, 1)
    text = (root / KERNEL_LOG).read_text(errors="replace")
    if failure is None and not (working / SUBMISSION_FILE).is_file():
        failure = f"the kernel finished but wrote no {SUBMISSION_FILE} in its working folder"
    outputs = sorted(p.name for p in working.iterdir() if p.is_file())
    return KernelRun("error" if failure else "complete", seconds, text[-LOG_TAIL:], working, isolate, failure, outputs)

"""How the local Kaggle server runs a pushed kernel the way Kaggle reruns a code submission: confined to
its own view of the machine, with no network, within a time limit and output caps, given only its inputs.

- Confinement (`confinement()`: bubblewrap, Debian's `bwrap`, where it works): the kernel sees a root
  of its own holding only `/usr` and the system libraries, the Python it runs with (its prefix, its base
  installation, and kp's own packages where that Python imports them from a checkout), read-only;
  `/kaggle/input/NAME` for each attached folder, read-only; `/kaggle/working` (its working folder and
  output), the one place it can write besides a scratch `/tmp` that is discarded. It runs as an
  unprivileged user (uid 65534) in its own user, network, process, IPC and UTS namespaces: no path
  leads to the server's folders (a hidden test set's labels included) or any other file of the
  machine, its network is an empty loopback of its own, and ending the run ends every process it
  started, a daemonised one included.
- Where bubblewrap is missing or user namespaces are off, `confinement()` says so in one line
  (`SANDBOX_MISSING`) and a kernel runs unconfined: with `unshare --user --map-root-user --net` (no
  network) where that works, else only if the caller accepts a kernel with network (`isolate=False`,
  said in the run's record).
- Limits: at `timeout_s` the whole sandbox is killed and the run ends as an error saying so; the log
  keeps its first `max_log_bytes` (then one line saying it was cut, the rest drained unread); the
  working folder and the scratch /tmp may hold at most `max_output_bytes` together (Kaggle's 20 GB
  by default; a larger file stops with "File too large", folders that grow past it end the run).
- The kernel's environment holds nothing of the caller's but `PATH`; `KP_KAGGLE_ROOT` names its root
  (`/kaggle` when confined, as on Kaggle).
- Output: a kernel that exits 0 but writes no `submission.csv` is an error naming that; a kernel that
  fails is an error with the last lines of its log.
"""
from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from pipeline.core.artifacts import KERNEL_LOG, SUBMISSION_FILE

ISOLATE = ["unshare", "--user", "--map-root-user", "--net"]
LOG_TAIL = 3000  # characters of the kernel's log kept in its run record
MAX_LOG_BYTES = 10 << 20  # a kernel's log kept in full up to this (Kaggle shows a log, and cuts a long one)
MAX_OUTPUT_BYTES = 20 << 30  # Kaggle's limit on /kaggle/working
KAGGLE_ROOT = Path("/kaggle")  # the kernel's root inside the sandbox, as on Kaggle
NOBODY = "65534"
SYSTEM = [("--ro-bind", "/usr", "/usr"), ("--ro-bind-try", "/etc/alternatives", "/etc/alternatives"),
          ("--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"), ("--ro-bind-try", "/etc/localtime", "/etc/localtime"),
          ("--ro-bind-try", "/etc/fonts", "/etc/fonts")]
LINKS = [("usr/lib", "/lib"), ("usr/lib64", "/lib64"), ("usr/bin", "/bin"), ("usr/sbin", "/sbin")]
SANDBOX_MISSING = ("kernels run unconfined: bubblewrap (bwrap) is {why}, so a kernel can read and write this "
                   "machine's files, the hidden labels included (`apt-get install bubblewrap`; user namespaces on)")


@dataclass
class KernelRun:
    """How a kernel run ended: `complete` or `error` (with `failure`), in how long, with its log's tail;
    `isolated`: whether it ran without network; `confined`: whether it saw only its own files."""

    status: str
    seconds: float
    log: str
    working: Path
    isolated: bool
    failure: str | None = None
    outputs: list[str] = field(default_factory=list)
    confined: bool = False


@lru_cache(maxsize=1)
def network_isolation() -> bool:
    """Whether this machine can run a process in a network namespace of its own without root."""
    if confinement() is None:
        return True
    if shutil.which("unshare") is None:
        return False
    try:
        return subprocess.run([*ISOLATE, "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@lru_cache(maxsize=1)
def confinement() -> str | None:
    """None when bubblewrap confines kernels here; else the one line that says they run unconfined, and why."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return SANDBOX_MISSING.format(why="not installed")
    try:
        probe = subprocess.run([bwrap, *_system_view(), "--uid", NOBODY, "--gid", NOBODY, "true"],
                               capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return SANDBOX_MISSING.format(why=f"not usable ({exc})")
    if probe.returncode:
        return SANDBOX_MISSING.format(why=f"refused here ({probe.stderr.decode(errors='replace').strip()[:200]})")
    return None


def _system_view() -> list[str]:
    """bwrap's arguments for a root holding only the system: namespaces, /usr, /proc, /dev, links."""
    view = ["--unshare-all", "--die-with-parent", "--new-session", "--proc", "/proc", "--dev", "/dev"]
    for option, source, target in SYSTEM:
        view += [option, source, target]
    for target, link in LINKS:
        if Path(link).is_symlink() or Path("/" + target).is_dir():
            view += ["--symlink", target, link]
    return view


@lru_cache(maxsize=8)
def python_folders(python: str) -> tuple[str, ...]:
    """The folders interpreter `python` runs from: its prefix, its base installation, and the folders of
    kp's packages where it imports them from outside those (an editable install: the checkout's
    `pipeline/` and `stages/`, never the checkout whole, whose `work/` may hold the server's files)."""
    query = ("import importlib.util, json, sys\n"
             "found = [s.submodule_search_locations[0] for n in ('pipeline', 'stages')\n"
             "         if (s := importlib.util.find_spec(n)) and s.submodule_search_locations]\n"
             "print(json.dumps([sys.prefix, sys.base_prefix, sys.exec_prefix, *found]))")
    done = subprocess.run([python, "-c", query], capture_output=True, text=True, timeout=120)
    if done.returncode:
        raise RuntimeError(f"{python} cannot run: {done.stderr.strip()[-300:]}")
    folders = [str(Path(p).resolve()) for p in json.loads(done.stdout) if Path(p).is_dir()]
    folders += [str(Path(python).resolve().parent)]
    kept = []
    for folder in sorted(set(folders), key=len):  # outermost first; a folder inside one kept is covered
        if not any(Path(folder).is_relative_to(outer) for outer in kept) and not folder.startswith("/usr"):
            kept.append(folder)
    return tuple(kept)


def run_kernel(script: Path, inputs: dict[str, Path], root: Path, timeout_s: float, python: str = sys.executable,
               isolate: bool = True, max_log_bytes: int = MAX_LOG_BYTES,
               max_output_bytes: int = MAX_OUTPUT_BYTES) -> KernelRun:
    """Run the kernel `script` as Kaggle would, in `root` (created; `root/working` is its output).

    Args:
        script: the kernel's code (a Python script).
        inputs: attached folders by the name they get under `input/` (the competition's slug, a dataset's).
        root: the run's own folder outside the sandbox.
        timeout_s: the time limit.
        python: the interpreter (Kaggle's image: one with TensorFlow and no kp, or a venv).
        isolate: run without network (refused with the reason where the machine cannot).
        max_log_bytes: the log kept (the rest is drained unread, with a line saying so).
        max_output_bytes: the most the working folder may hold.

    Returns:
        The run's `KernelRun`.
    """
    confined = confinement() is None
    if isolate and not network_isolation():
        raise RuntimeError("this machine cannot run a kernel without network (unprivileged user namespaces are "
                           "off: `unshare --user --net true` fails); pass isolate=False to run it with network")
    working, scratch = root / "working", root / "tmp"
    for folder in (working, root / "input", scratch):
        folder.mkdir(parents=True)
    for name, folder in inputs.items():
        os.symlink(Path(folder).resolve(), root / "input" / name)
    if confined:
        command, kaggle_root = _confined_command(script, inputs, working, scratch, python, isolate), KAGGLE_ROOT
    else:
        command, kaggle_root = [*(ISOLATE if isolate else []), python, str(script)], root
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(kaggle_root / "working"),
           "KP_KAGGLE_ROOT": str(kaggle_root), "PYTHONUNBUFFERED": "1", "NO_ALBUMENTATIONS_UPDATE": "1",
           "TMPDIR": "/tmp" if confined else str(scratch)}
    clock = time.perf_counter()
    process = subprocess.Popen(command, cwd=working, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True, preexec_fn=lambda: _limit_file_size(max_output_bytes))
    logger = threading.Thread(target=_keep_log, args=(process.stdout, root / KERNEL_LOG, max_log_bytes), daemon=True)
    logger.start()
    failure = _wait(process, (working, scratch), timeout_s, max_output_bytes)
    logger.join(timeout=30)
    shutil.rmtree(scratch, ignore_errors=True)
    seconds = round(time.perf_counter() - clock, 1)
    text = (root / KERNEL_LOG).read_text(errors="replace")
    if failure is None and not (working / SUBMISSION_FILE).is_file():
        failure = f"the kernel finished but wrote no {SUBMISSION_FILE} in its working folder"
    outputs = sorted(p.name for p in working.iterdir() if p.is_file())
    return KernelRun("error" if failure else "complete", seconds, text[-LOG_TAIL:], working, isolate, failure, outputs,
                     confined)


def _confined_command(script: Path, inputs: dict[str, Path], working: Path, scratch: Path, python: str,
                      isolate: bool) -> list[str]:
    """bwrap's command line: the system and the Python read-only, the inputs read-only at /kaggle/input/NAME,
    the working folder at /kaggle/working, a scratch /tmp, as uid 65534 in namespaces of its own."""
    command = [shutil.which("bwrap"), *_system_view(), "--bind", str(scratch), "/tmp"]  # first: binds below it stay
    if not isolate:
        command.append("--share-net")
    for folder in python_folders(python):
        command += ["--ro-bind", folder, folder]
    command += ["--bind", str(working), str(KAGGLE_ROOT / "working")]
    for name, folder in inputs.items():
        command += ["--ro-bind", str(Path(folder).resolve()), str(KAGGLE_ROOT / "input" / name)]
    inside = KAGGLE_ROOT / "src" / script.name
    command += ["--ro-bind", str(script.resolve()), str(inside), "--chdir", str(KAGGLE_ROOT / "working"),
                "--uid", NOBODY, "--gid", NOBODY, "--", python, str(inside)]
    return command


def _limit_file_size(max_bytes: int) -> None:
    """In the child before it starts: no file it writes may grow past `max_bytes` (SIGXFSZ)."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))


def _keep_log(stream, path: Path, max_bytes: int) -> None:
    """Copy the kernel's output into its log up to `max_bytes`; past that, say so once and drain the rest."""
    kept = 0
    with open(path, "wb") as log:
        while chunk := stream.read1(1 << 16):
            if kept < max_bytes:
                log.write(chunk[:max_bytes - kept])
                kept += len(chunk)
                if kept >= max_bytes:
                    log.write(f"\n[kp: the log was cut at {max_bytes:,} bytes; the kernel went on]\n".encode())
                log.flush()


def _wait(process: subprocess.Popen, folders: tuple[Path, ...], timeout_s: float, max_output_bytes: int) -> str | None:
    """Wait for the kernel; kill the whole sandbox (its session and everything in it) past the time limit or
    once the folders it writes (its working folder and its scratch /tmp) hold more than the output cap.
    Returns the failure, or None when it exited 0."""
    deadline = time.monotonic() + timeout_s
    failure = None
    while failure is None:
        try:
            code = process.wait(timeout=max(min(1.0, deadline - time.monotonic()), 0.01))
            return None if code == 0 else f"the kernel exited with status {code}"
        except subprocess.TimeoutExpired:
            pass
        if time.monotonic() >= deadline:
            failure = f"the kernel exceeded its time limit of {timeout_s:g} s and was stopped"
        elif sum(_size(folder) for folder in folders) > max_output_bytes:
            failure = f"the kernel's working folder grew past {max_output_bytes:,} bytes and it was stopped"
    with contextlib.suppress(ProcessLookupError):  # gone already: nothing left to stop
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    return failure


def _size(folder: Path) -> int:
    total = 0
    for path in folder.rglob("*"):
        try:
            if path.is_file() and not path.is_symlink():
                total += path.stat().st_size
        except OSError:
            continue
    return total

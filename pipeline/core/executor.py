"""Where a stage's cached units are computed: in this process (`local`), or as Ray tasks (`ray`).

A unit is a piece of a stage with its own key in a `RunStore` (an ensemble member, ...). The driver
(the `kp` process) keeps everything that makes the cache safe: the competition lock, the stage's
manifest and its final rename. A unit only ever writes into its store through `RunStore.write`:
into a temporary folder renamed into place once complete, so two workers or a killed one can never
leave a unit that is accepted, and a rerun after a lost worker computes only the missing units.

`compute_units` runs the units that are not stored yet, with one progress bar over all of them,
and marks the stored ones as just used (`RunStore.touch`, what `kp clean --keep-last` keeps).
With `compute.backend: ray` each unit is a Ray task (`ray.init(address)`, or a local cluster of
`compute.local_cpus` CPUs when no address is given; `cpus_per_task` / `gpus_per_task` reserve
resources per unit, so several small trainings can share one GPU with a fraction); Ray retries a
unit whose worker died or that raised, `retries` times, and a unit that still fails is one error
naming it. Workers need the work folder and the images at the same paths (a shared filesystem, as
on a usual cluster); a worker that cannot see the store says so. Imports Ray inside the functions only.

Whoever runs a stage can watch its units as they are found stored or finish (`watching_units`): a
sweep reads each cv fold's score there and stops a trial whose first folds are clearly worse than
its best trial's (by raising `RunStopped` from the watcher; the units stored so far stay stored).
"""
from __future__ import annotations

import contextlib
import json
import shutil
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, Literal

from pydantic import Field

from pipeline.core.artifacts import UNIT_FILE
from pipeline.core.errors import PipelineError
from pipeline.core.readers import read_json
from pipeline.core.runs import RunStore
from pipeline.core.settings import StrictModel

BACKENDS = ("local", "ray")


class Compute(StrictModel):
    """The `compute` section: where and on what a stage's units run; in no fingerprint.

    Where a unit runs never changes what it produces; the device settings change it by rounding at
    most (a GPU's mixed precision and uint8 pixels; the plan a stage ran with is in its meta.json,
    see `pipeline.models.device`)."""

    backend: Literal[BACKENDS] = Field("local", description=(
        "local: in the kp process | ray: each unit a Ray task (pip install -e '.[ray]')"))
    address: str | None = Field(None, description=(
        "ray: null (start a local cluster of local_cpus CPUs) | auto | ray://HOST:10001"))
    local_cpus: int = Field(2, ge=1, description="ray without an address: the local cluster's CPUs")
    cpus_per_task: float = Field(1, gt=0, description="ray: CPUs reserved per unit")
    gpus_per_task: float = Field(0, ge=0, description=(
        "ray: GPUs per unit (a fraction lets several small trainings share one GPU)"))
    retries: int = Field(2, ge=0, description="ray: a unit whose worker died or that raised is retried this many times")
    shard_size: int = Field(4096, ge=1, description=(
        "precompute's images per unit, here or a Ray task (rounded up to whole batches; the arrays are the same; "
        "a killed run keeps the shards it finished)"))
    # How a frozen network's forward pass runs, wherever the unit is (`pipeline.models.device`):
    device: Literal["auto", "cpu", "gpu"] = Field("auto", description=(
        "auto: the first GPU TensorFlow sees, else the CPU | cpu | gpu (an error without one)"))
    precision: Literal["auto", "float32", "mixed_float16", "mixed_bfloat16"] = Field("auto", description=(
        "auto: mixed_bfloat16 on a GPU of compute capability 8.0+, mixed_float16 on older ones, float32 on CPU"))
    xla: Literal["auto"] | bool = Field("auto", description=(
        "auto: on a GPU (compiled once; the last batch padded); off on CPU, where it is slower"))
    pixels: Literal["auto", "float32", "uint8"] = Field("auto", description=(
        "auto: uint8 to a GPU (cast and preprocessed there), float32 on CPU"))
    device_batch_size: Literal["auto"] | Annotated[int, Field(ge=1)] = Field("auto", description=(
        "images per forward call on a GPU: auto (from its free memory) | a number; CPU: precompute.batch_size"))
    tensorboard: bool = Field(True, description=(
        "write each training's curves (loss, accuracy, learning rate per epoch) for TensorBoard under "
        "work/COMP/_tensorboard/ (make tensorboard COMP=NAME shows them)"))


@dataclass
class Unit:
    """One cached piece of a stage: `compute(folder)` writes its files into `folder` (a fresh temporary
    folder that becomes `store/key` once it returns) and returns its record (a dict of JSON values,
    kept as `unit.json`; None: no record); it must be picklable for Ray (a module-level function, or
    a `functools.partial` of one, with plain arguments). `backup`: where a resumable unit keeps its
    progress outside that folder, removed once the unit is stored."""

    key: str
    label: str  # how messages name it: "member 3 (seed 1002)"
    compute: Callable[[Path], Any]
    backup: Path | None = None


@dataclass
class UnitItem:
    """One unit a stage asks for (`StageContext.map_units`).

    label: how messages name it.
    key: what sets this unit apart from its siblings (a seed, its rows, a pass number): JSON values,
        hashed into its key with what every unit of the call shares (settings, upstream, code).
    args: handed to the unit's function after the config and the inputs; derived from `key` and the
        inputs (masks of the rows, preloaded arrays), so they need not be hashed.
    """

    label: str
    key: dict[str, Any]
    args: tuple = ()


@dataclass
class UnitResult:
    """A unit, stored: its key, its folder in the run store, its record, and whether an earlier run made it."""

    key: str
    folder: Path
    record: dict[str, Any]
    reused: bool


UnitWatcher = Callable[[str, Unit, dict], None]  # (the store's name, the unit, its record)
_WATCHERS: ContextVar[tuple[UnitWatcher, ...]] = ContextVar("unit_watchers", default=())


@contextlib.contextmanager
def watching_units(watcher: UnitWatcher) -> Iterator[None]:
    """Within the block, `watcher(store_name, unit, record)` is called in this process for each unit
    `compute_units` finds stored (first, in order) or finishes (as each does); what it raises ends the
    computation there, with every unit finished so far stored."""
    token = _WATCHERS.set((*_WATCHERS.get(), watcher))
    try:
        yield
    finally:
        _WATCHERS.reset(token)


def _tell_watchers(store: RunStore, unit: Unit) -> None:
    watchers = _WATCHERS.get()
    if watchers:
        record = read_record(store.path(unit.key))
        for watcher in watchers:
            watcher(store.root.name, unit, record)


def _store_unit(store: RunStore, unit: Unit) -> None:
    """Compute one unit into its store, atomically, with its record; then drop its backup."""
    with store.write(unit.key) as folder:
        record = unit.compute(folder)
        if record is not None:
            (folder / UNIT_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")
    if unit.backup is not None:
        shutil.rmtree(unit.backup, ignore_errors=True)


def read_record(folder: Path) -> dict[str, Any]:
    """A stored unit's record (`unit.json`), or {} for a unit that keeps none."""
    path = folder / UNIT_FILE
    return read_json(path) if path.is_file() else {}


def compute_units(settings: Compute | None, store: RunStore, units: list[Unit], log=print, progress=None) -> list[str]:
    """Compute every unit of `units` that `store` does not hold yet.

    Args:
        settings: the `compute` section (None: local).
        store: where the units are kept.
        units: the units, in order; a unit already stored is left as it is, touched as just used.
        log: prints a line per unit.
        progress: a tqdm-like bar over the units (advanced as each finishes), or None.

    Returns:
        The keys computed now (the others were reused).
    """
    missing = []
    for unit in units:
        if store.has(unit.key):
            store.touch(unit.key)
            log(f"{unit.label}: reused from {store.path(unit.key)}")
            _tell_watchers(store, unit)
        else:
            missing.append(unit)
    if progress is not None and len(missing) < len(units):  # the bar counts what is computed: its rate and
        progress.reset(total=len(missing))                   # ETA are those of the units still to come
        progress.set_postfix_str(f"{len(units) - len(missing)} reused", refresh=False)
    if settings is None or settings.backend == "local" or not missing:
        for unit in missing:
            log(f"{unit.label}: computing")
            _store_unit(store, unit)
            if progress is not None:
                progress.update(1)
            _tell_watchers(store, unit)
        return [unit.key for unit in missing]
    return _compute_on_ray(settings, store, missing, log, progress)


def _compute_on_ray(settings: Compute, store: RunStore, units: list[Unit], log, progress) -> list[str]:
    ray = connect(settings)
    task = ray.remote(_write_unit).options(num_cpus=settings.cpus_per_task, num_gpus=settings.gpus_per_task,
                                          max_retries=settings.retries, retry_exceptions=True)
    pending = {task.remote(str(store.root), unit): unit for unit in units}
    log(f"{len(units)} units sent to Ray ({ray.cluster_resources().get('CPU', 0):.0f} CPUs in the cluster)")
    failures = []
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        unit = pending.pop(done[0])
        try:
            where = ray.get(done[0])
        except Exception as exc:  # after Ray's retries: the unit's own error, or its worker's death
            failures.append(f"{unit.label}: {failure_reason(exc)}")
            log(f"{unit.label}: failed after {settings.retries} retries")
            continue
        log(f"{unit.label}: computed on {where}")
        if progress is not None:
            progress.update(1)
        _tell_watchers(store, unit)
    if failures:
        raise PipelineError(f"{len(failures)} of {len(units)} units failed on Ray (the others are stored; a rerun "
                            "computes only the missing ones): " + "; ".join(failures))
    return [unit.key for unit in units]


def say(message: str) -> None:
    """A unit's log line, wherever it runs (`pipeline.core.console.say`: beside the stage's bars, with its
    `[comp]`; a Ray worker's stderr goes to its log file)."""
    from pipeline.core.console import say as console_say

    console_say(message, warning=message.startswith("WARNING"))


def connect(settings: Compute):
    """`ray`, connected to `compute.address`, or to a local cluster this process starts once."""
    try:
        import ray
    except ImportError:
        raise PipelineError("compute.backend is ray, but Ray is not installed: pip install -e '.[ray]'") from None
    if not ray.is_initialized():
        if settings.address:
            try:
                ray.init(address=settings.address, log_to_driver=False)
            except ConnectionError as exc:  # Ray says only "Failed to connect"; why is in its log lines
                raise PipelineError(
                    f"compute.address {settings.address}: the Ray cluster refused the connection or is not there "
                    f"({exc}). A cluster with token authentication (on by default since Ray 2.60; Ray logs "
                    "'Unauthenticated' above) needs its token: export RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH="
                    "<the cluster's token file, ~/.ray/auth_token on its head node> (or RAY_AUTH_TOKEN=<token>); "
                    "see docs/compute.md") from None
        else:
            ray.init(num_cpus=settings.local_cpus, include_dashboard=False, log_to_driver=False,
                     object_store_memory=256 * 1024 * 1024)
    return ray


def _write_unit(store_root: str, unit: Unit) -> str:
    """On a worker: compute one unit into its store, atomically. Returns where it ran."""
    import os
    import socket

    # Units sharing a GPU (`gpus_per_task` < 1) must not each take all of its memory: TensorFlow reads
    # this when it first touches the GPU, which in a worker is inside a unit, after this line.
    os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")

    root = Path(store_root)
    if not root.parent.is_dir():
        raise PipelineError(f"this worker ({socket.gethostname()}) cannot see {root.parent}: the work folder must "
                            "be on a filesystem every Ray worker shares, at the same path")
    store = RunStore(root)
    if not store.has(unit.key):  # another attempt may have finished it
        _store_unit(store, unit)
    return f"{socket.gethostname()} pid {os.getpid()}"


def failure_reason(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None) or exc
    return " ".join(str(cause).split())[:300] or type(cause).__name__

"""The kaggle client's dataset, kernel and code-submission calls, wrapped as `pipeline.kaggle.api` wraps its
competition calls: timeouts and retries from `Network`, a call that creates something (a dataset version,
a kernel version, a submission) never sent twice, every failure one PipelineError naming what failed.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import PipelineError
from pipeline.kaggle.api import Network, bounded, client, describe_error, endpoint, server_message
from pipeline.kaggle.submissions import poll

DATASET_METADATA = "dataset-metadata.json"
KERNEL_METADATA = "kernel-metadata.json"
# Kaggle's KernelWorkerStatus, in the pipeline's words: a run still going, or how it ended.
QUEUED, RUNNING, COMPLETE, ERROR = "queued", "running", "complete", "error"


@dataclass(frozen=True)
class KernelState:
    """How a kernel's newest version stands: `status` one of the constants above (or Kaggle's other words,
    lower-cased, e.g. `cancel_acknowledged`), with Kaggle's failure message when it failed."""

    status: str
    failure: str

    @property
    def ended(self) -> bool:
        return self.status not in (QUEUED, RUNNING)


def _failed(what: str, exc: Exception) -> PipelineError:
    """One error for a failed call: the server's own message for an HTTP error, else what went wrong."""
    response = getattr(exc, "response", None)
    if getattr(response, "status_code", None) is not None and response.status_code not in (401,):
        return PipelineError(f"{what} failed: {response.status_code} from {endpoint()}: {server_message(response)}")
    return PipelineError(f"{what} failed: {describe_error(exc, '')}")


def user(network: Network = Network()) -> str:
    """The Kaggle user the client authenticates as (the owner of the datasets and kernels it pushes)."""
    api = client(network)
    name = api.get_config_value(api.CONFIG_NAME_USER)
    if not name:
        raise PipelineError("the kaggle client has no user name (KAGGLE_USERNAME or kaggle.json's username): "
                            "it owns the pushed dataset and kernel")
    return name


def dataset_status(ref: str, network: Network = Network()) -> str | None:
    """The status of dataset OWNER/SLUG (`ready` once usable), or None when it does not exist."""
    api = client(network)
    try:
        return api.dataset_status(ref)
    except Exception as exc:
        if getattr(getattr(exc, "response", None), "status_code", None) == 404:
            return None
        raise _failed(f"kaggle: the status of dataset {ref}", exc) from None


def push_dataset(folder: Path, ref: str, note: str, network: Network = Network()) -> str:
    """Create dataset `ref` from `folder` (its `dataset-metadata.json` names it), or add a version to it; each
    sub-folder goes up as one zip archive, which Kaggle decompresses. Returns "created" or "versioned"."""
    exists = dataset_status(ref, network) is not None
    api = client(network, repeatable=False)
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    seconds = network.worst_case_s() * 4 + size / 50_000  # a few calls, and 50 kB/s at worst
    hidden = [".*"]  # the run store's own bookkeeping (.entry.json) is not part of the dataset
    if exists:
        call = lambda: api.dataset_create_version(str(folder), note, quiet=True, dir_mode="zip",  # noqa: E731
                                                  ignore_patterns=hidden)
    else:
        call = lambda: api.dataset_create_new(str(folder), public=False, quiet=True, dir_mode="zip",  # noqa: E731
                                              ignore_patterns=hidden)
    what = f"kaggle: {'a new version of' if exists else 'creating'} dataset {ref} from {folder}"
    try:
        response = bounded(call, seconds, what)
    except PipelineError:
        raise
    except Exception as exc:
        raise _failed(what, exc) from None
    if getattr(response, "error", None):
        raise PipelineError(f"{what} failed: {response.error}")
    return "versioned" if exists else "created"


def wait_for_dataset(ref: str, timeout_s: float, every_s: float, say=print, network: Network = Network()) -> None:
    """Poll until dataset `ref`'s newest version is ready (Kaggle decompresses and checks it first)."""
    status = poll(lambda: dataset_status(ref, network), lambda answer: answer == "ready", timeout_s, every_s, say,
                  lambda answer, _: f"dataset {ref}: {answer}")
    if status != "ready":
        raise PipelineError(f"kaggle: dataset {ref} is {status} after {timeout_s:g}s, not ready; push again later")


def push_kernel(folder: Path, network: Network = Network()) -> int:
    """Push the kernel in `folder` (its `kernel-metadata.json` names it) as a new version, which Kaggle runs;
    returns the version's number."""
    api = client(network, repeatable=False)
    what = f"kaggle: pushing the kernel in {folder}"
    try:
        response = bounded(lambda: api.kernels_push(str(folder)), network.worst_case_s(), what)
    except PipelineError:
        raise
    except Exception as exc:
        raise _failed(what, exc) from None
    invalid = [f"{kind} {getattr(response, name)}" for kind, name in (
        ("datasets", "invalid_dataset_sources"), ("competitions", "invalid_competition_sources"),
        ("kernels", "invalid_kernel_sources")) if getattr(response, name, None)]
    if getattr(response, "error", None) or invalid:
        raise PipelineError(f"{what} failed: {response.error or 'Kaggle does not know the sources ' + ', '.join(invalid)}")
    return int(response.version_number)


def kernel_state(ref: str, network: Network = Network()) -> KernelState:
    """Where kernel OWNER/SLUG's newest version stands."""
    api = client(network)
    try:
        response = api.kernels_status(ref)
    except Exception as exc:
        raise _failed(f"kaggle: the status of kernel {ref}", exc) from None
    status = response.status.name if hasattr(response.status, "name") else str(response.status)
    return KernelState(status.lower(), response.failure_message or "")


def wait_for_kernel(ref: str, timeout_s: float, every_s: float, say=print, network: Network = Network()) -> KernelState:
    """Poll until kernel `ref`'s run has ended or `timeout_s` has passed (the client has no wait of its own)."""
    return poll(lambda: kernel_state(ref, network), lambda state: state.ended, timeout_s, every_s, say,
                lambda state, waited: f"kernel {ref}: {state.status} for {waited:.0f}s")


def kernel_output(ref: str, dest: Path, network: Network = Network()) -> tuple[list[Path], Path]:
    """Download kernel `ref`'s newest output files into `dest`; (their paths, the file of the run's log, which
    is absent when Kaggle sent no log)."""
    api = client(network)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        files, _ = api.kernels_output(ref, str(dest), force=True, quiet=True)
    except Exception as exc:
        raise _failed(f"kaggle: the output of kernel {ref}", exc) from None
    log = dest / f"{ref.split('/')[1]}.log"
    return [Path(f) for f in files if Path(f) != log], log


def submit_code(slug: str, kernel: str, version: int, file_name: str, description: str,
                network: Network = Network()) -> int:
    """Submit version `version` of kernel OWNER/SLUG to competition `slug` (Kaggle reruns it on the hidden test
    set and scores its `file_name`); the submission's ref. Never sent twice."""
    api = client(network, repeatable=False)
    what = f"kaggle: the code submission of {kernel} version {version} to {slug!r}"
    try:
        response = bounded(lambda: api.competition_submit_code(file_name, description, slug, kernel, version,
                                                               quiet=True), network.worst_case_s(), what)
    except PipelineError:
        raise
    except Exception as exc:
        raise _failed(what, exc) from None
    if not response.ref:
        raise PipelineError(f"{what} failed: {response.message or 'no submission ref returned'}")
    return int(response.ref)

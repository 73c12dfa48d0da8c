"""Submissions through Kaggle's API: one uploaded (never sent twice), its state read back, its score waited
for (`poll`, which kernel runs share). Kept apart from `api.py`'s download, so the download stage's code
holds none of it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import PipelineError
from pipeline.kaggle.api import Network, bounded, client, describe_error

# A submission's status, in the pipeline's words (the ledger's too); Kaggle's API says them in capitals.
PENDING, COMPLETE, ERROR = "pending", "complete", "error"


@dataclass(frozen=True)
class SubmissionState:
    """One submission as Kaggle lists it: status PENDING, COMPLETE or ERROR (the constants above)."""

    ref: int
    status: str
    public_score: float | None
    error: str | None


def submit_file(slug: str, path: Path, description: str, network: Network = Network()) -> int:
    """Upload `path` to competition `slug` with `description`; the submission's ref. Never retried
    once the server may have received it (a submission counts against the day's limit)."""
    api = client(network, repeatable=False)
    seconds = network.worst_case_s() * 3 + path.stat().st_size / 50_000  # three calls, and 50 kB/s at worst
    try:
        response = bounded(lambda: api.competition_submit(str(path), description, slug, quiet=True), seconds,
                            f"kaggle submission of {path} to {slug!r}")
    except PipelineError:
        raise
    except Exception as exc:
        raise PipelineError(f"kaggle submission of {path} to {slug!r} failed: {describe_error(exc, slug)}") from None
    if response.message == api.COMPETITION_SUBMIT_UPLOAD_FAILED_MESSAGE or not response.ref:
        raise PipelineError(f"kaggle submission of {path} to {slug!r} failed: the upload did not complete "
                            f"({response.message or 'no submission ref returned'})")
    return int(response.ref)


def check_can_submit(slug: str, network: Network = Network()) -> None:
    """Before any stage runs for an upload: credentials there, and the competition known to Kaggle and open
    to this account (its rules accepted); one PipelineError naming what is missing.

    A call that lists the competition's submissions, which answers 404 for an unknown competition and
    403 for one whose rules are not accepted."""
    from pipeline.kaggle.api import check_credentials

    check_credentials(uploading=True)
    api = client(network)
    try:
        api.competition_submissions(slug, page_size=1)
    except Exception as exc:
        raise PipelineError(f"kaggle: competition {slug!r} cannot take a submission from this account: "
                            f"{describe_error(exc, slug)}; nothing was run") from None


def submission_state(slug: str, ref: int, network: Network = Network()) -> SubmissionState:
    """Where submission `ref` of `slug` stands (it is among the newest 100)."""
    api = client(network)
    try:
        listed = api.competition_submissions(slug, page_size=100) or []
    except Exception as exc:
        raise PipelineError(f"kaggle: listing the submissions of {slug!r} failed: {describe_error(exc, slug)}") from None
    for item in listed:
        if item is not None and int(item.ref) == int(ref):
            status = (item.status.name if hasattr(item.status, "name") else str(item.status)).lower()
            score = float(item.public_score) if status == COMPLETE and item.public_score else None
            return SubmissionState(int(ref), status, score, item.error_description or None)
    raise PipelineError(f"kaggle: submission {ref} is not among the newest {len(listed)} submissions to {slug!r}")


def poll(ask, done, timeout_s: float, every_s: float, say, describe):
    """Call `ask()` every `every_s` until `done(answer)` or `timeout_s` has passed; the last answer. Between
    two calls `say`s `describe(answer, seconds waited so far)`, then when it asks again (the client waits for
    nothing itself)."""
    clock = time.monotonic()
    while True:
        answer = ask()
        if done(answer) or time.monotonic() + every_s > clock + timeout_s:
            return answer
        say(f"{describe(answer, time.monotonic() - clock)}, asking again in {every_s:g}s")
        time.sleep(every_s)


def wait_for_score(slug: str, ref: int, timeout_s: float, every_s: float, say=print,
                   network: Network = Network()) -> SubmissionState:
    """Poll until submission `ref` is scored or rejected, or `timeout_s` has passed (then still PENDING)."""
    return poll(lambda: submission_state(slug, ref, network), lambda state: state.status != PENDING, timeout_s,
                every_s, say, lambda state, _: f"submission {ref}: {state.status}")

"""The official `kaggle` client, wrapped: credentials checked up front, errors worded for the user.

Importing `kaggle` authenticates at import time and calls `exit(1)` without credentials, so this
module checks the places the client looks first and imports it only when they hold something.

With KAGGLE_API_ENVIRONMENT=LOCALHOST and KAGGLE_LOCAL_ENDPOINT=http://127.0.0.1:PORT the same client
talks to a local Kaggle-compatible server (`pipeline.kaggle.local`, `make kaggle-local`) instead.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.artifacts import TMP_PREFIX
from pipeline.core.cache import temporary_name
from pipeline.core.errors import PipelineError


def config_dir() -> Path:
    """Where the kaggle client looks for `kaggle.json` / `access_token` (same rule as kaggle 2.x)."""
    if os.environ.get("KAGGLE_CONFIG_DIR"):
        return Path(os.environ["KAGGLE_CONFIG_DIR"])
    legacy = Path.home() / ".kaggle"
    if legacy.exists():
        return legacy
    xdg = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(xdg) / "kaggle"


def check_credentials() -> str:
    """Which credentials the client will use; a PipelineError saying where it looked if none."""
    if os.environ.get("KAGGLE_API_TOKEN"):
        return "KAGGLE_API_TOKEN"
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return "KAGGLE_USERNAME/KAGGLE_KEY"
    folder = config_dir()
    if (folder / "access_token").is_file():
        return str(folder / "access_token")
    if (folder / "kaggle.json").is_file():
        _check_kaggle_json(folder / "kaggle.json")
        return str(folder / "kaggle.json")
    raise PipelineError(
        "Kaggle credentials not found: the kaggle client looks for KAGGLE_API_TOKEN, or KAGGLE_USERNAME "
        f"and KAGGLE_KEY in the environment, or {folder / 'kaggle.json'} (or access_token there; "
        "KAGGLE_CONFIG_DIR moves that folder). Create a token at kaggle.com > Settings > API, or use a "
        "downloaded archive offline with --set download.source=PATH/SLUG.zip"
    )


def _check_kaggle_json(path: Path) -> None:
    """The client prints its whole help twice on a bad kaggle.json; say what is wrong instead."""
    import json

    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise PipelineError(f"{path}: not valid JSON ({exc}); it should be "
                            '{"username": "YOU", "key": "YOUR_API_KEY"} as downloaded from kaggle.com > Settings > API') from None
    missing = [k for k in ("username", "key") if not isinstance(data, dict) or not isinstance(data.get(k), str)]
    if missing:
        raise PipelineError(f"{path}: missing {', '.join(repr(k) for k in missing)}; it should be "
                            '{"username": "YOU", "key": "YOUR_API_KEY"}')


LOCAL_ENDPOINT = "KAGGLE_LOCAL_ENDPOINT"


def _client():
    check_credentials()
    from kaggle.api.kaggle_api_extended import KaggleApi

    api = KaggleApi()
    api.authenticate()
    if os.environ.get("KAGGLE_API_ENVIRONMENT") == "LOCALHOST":
        from kagglesdk.kaggle_env import KaggleEnv, _env_to_endpoint

        # kagglesdk's LOCALHOST environment is http://localhost (port 80); point it at our server.
        _env_to_endpoint[KaggleEnv.LOCAL] = os.environ.get(LOCAL_ENDPOINT, _env_to_endpoint[KaggleEnv.LOCAL])
        if "--local" not in api.args:  # kaggle reads the variable once, when first imported
            api.args = [*api.args, "--local"]
    return api


def download_competition(slug: str, dest: Path) -> Path:
    """Download the competition archive to `dest/SLUG.zip` (written under a temporary name first)."""
    archive = dest / f"{slug}.zip"
    if archive.is_file():
        return archive
    api = _client()
    dest.mkdir(parents=True, exist_ok=True)
    partial = dest / temporary_name(TMP_PREFIX, "download")
    partial.mkdir()
    try:
        try:
            api.competition_download_files(slug, path=str(partial), force=True, quiet=False)
        except Exception as exc:  # the client raises requests' HTTPError, ConnectionError, ValueError...
            raise PipelineError(f"kaggle download of {slug!r} failed: {describe_error(exc, slug)}") from None
        files = sorted(partial.iterdir())
        if len(files) != 1:
            raise PipelineError(f"kaggle download of {slug!r}: expected one archive, got {[f.name for f in files]}")
        os.replace(files[0], archive)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return archive


# A submission's status, in the pipeline's words (the ledger's too); Kaggle's API says them in capitals.
PENDING, COMPLETE, ERROR = "pending", "complete", "error"


@dataclass(frozen=True)
class SubmissionState:
    """One submission as Kaggle lists it: status PENDING, COMPLETE or ERROR (the constants above)."""

    ref: int
    status: str
    public_score: float | None
    error: str | None


def submit_file(slug: str, path: Path, description: str) -> int:
    """Upload `path` to competition `slug` with `description`; the submission's ref."""
    api = _client()
    try:
        response = api.competition_submit(str(path), description, slug, quiet=True)
    except Exception as exc:
        raise PipelineError(f"kaggle submission of {path} to {slug!r} failed: {describe_error(exc, slug)}") from None
    if response.message == api.COMPETITION_SUBMIT_UPLOAD_FAILED_MESSAGE or not response.ref:
        raise PipelineError(f"kaggle submission of {path} to {slug!r} failed: the upload did not complete "
                            f"({response.message or 'no submission ref returned'})")
    return int(response.ref)


def submission_state(slug: str, ref: int) -> SubmissionState:
    """Where submission `ref` of `slug` stands (it is among the newest 100)."""
    api = _client()
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


def wait_for_score(slug: str, ref: int, timeout_s: float, every_s: float, say=print) -> SubmissionState:
    """Poll until submission `ref` is scored or rejected, or `timeout_s` has passed (then still PENDING)."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = submission_state(slug, ref)
        if state.status != PENDING or time.monotonic() + every_s > deadline:
            return state
        say(f"submission {ref}: {state.status}, asking again in {every_s:g}s")
        time.sleep(every_s)


def describe_error(exc: Exception, slug: str) -> str:
    response = getattr(exc, "response", None)
    code = getattr(response, "status_code", None)
    if code == 401:
        return "401 unauthorized: the Kaggle credentials were refused"
    if code == 403:
        return (f"403 forbidden: accept the rules at https://www.kaggle.com/competitions/{slug}/rules "
                "(it cannot be done through the API)")
    if code == 404:
        return f"404: no competition {slug!r} (check competition.slug)"
    name = type(exc).__name__
    if "ConnectionError" in name or "ConnectTimeout" in name:
        return f"cannot reach the Kaggle server ({exc})"
    if code is not None:
        return f"{code} from the Kaggle server: {_server_message(response)}"
    return f"{name}: {exc}"


def _server_message(response) -> str:
    try:
        return str(response.json().get("message") or response.text)
    except ValueError:
        return response.text[:300]

"""The official `kaggle` client, wrapped: credentials checked up front, errors worded for the user.

Importing `kaggle` authenticates at import time and calls `exit(1)` without credentials, so this
module checks the places the client looks first and imports it only when they hold something.

Every call has a connect and a read timeout and retries with backoff (`Network`, from the `kaggle`
section): the client sets none, so a server that accepts a connection and never answers would
hold `kp download` forever. Reads (the download, listing submissions) are retried after a
timeout; an upload is retried only when the connection was never made, so a submission is never
sent twice, and the whole upload is bounded too (the client's own upload session has no timeout).
Submitting and polling live in `pipeline.kaggle.submissions`, outside the download stage's code.
What a call brings back is checked before it is kept: a download enters the cache only as a
readable zip archive, and a cached one that no longer reads is fetched again.

With KAGGLE_API_ENVIRONMENT=LOCALHOST and KAGGLE_LOCAL_ENDPOINT=http://127.0.0.1:PORT the same client
talks to a local Kaggle-compatible server (`pipeline.kaggle.local`, `make kaggle-local`) instead.
"""
from __future__ import annotations

import os
import shutil
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.artifacts import TMP_PREFIX
from pipeline.core.cache import temporary_name
from pipeline.core.errors import PipelineError
from pipeline.data.archive import top_level


def config_dir() -> Path:
    """Where the kaggle client looks for `kaggle.json` / `access_token` (same rule as kaggle 2.x)."""
    if os.environ.get("KAGGLE_CONFIG_DIR"):
        return Path(os.environ["KAGGLE_CONFIG_DIR"])
    legacy = Path.home() / ".kaggle"
    if legacy.exists():
        return legacy
    xdg = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(xdg) / "kaggle"


def check_credentials(uploading: bool = False) -> str:
    """Which credentials the client will use; a PipelineError saying where it looked if none, and what to
    do instead (`uploading`: for `--upload`, else for a download)."""
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
    instead = ("or leave out --upload: kp submit writes the file, which you can upload on the competition's page"
               if uploading else "or use a downloaded archive offline with --set download.source=PATH/SLUG.zip")
    raise PipelineError(
        "Kaggle credentials not found: the kaggle client looks for KAGGLE_API_TOKEN, or KAGGLE_USERNAME "
        f"and KAGGLE_KEY in the environment, or {folder / 'kaggle.json'} (or access_token there; "
        f"KAGGLE_CONFIG_DIR moves that folder). Create a token at kaggle.com > Settings > API, {instead}"
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


@dataclass(frozen=True)
class Network:
    """How patient every call to Kaggle is (the `kaggle` section's `connect_timeout_s`,
    `read_timeout_s`, `retries`, `backoff_s`)."""

    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0
    retries: int = 3
    backoff_s: float = 1.0

    @classmethod
    def of(cls, settings) -> "Network":
        """From the `kaggle` config section (or anything with these attributes)."""
        return cls(settings.connect_timeout_s, settings.read_timeout_s, settings.retries, settings.backoff_s)

    def worst_case_s(self) -> float:
        """How long one call can take before it gives up: every try timed out, with the waits between."""
        waits = sum(self.backoff_s * 2 ** (attempt - 1) for attempt in range(2, self.retries + 1))
        return (self.retries + 1) * (self.connect_timeout_s + self.read_timeout_s) + waits


def _timed_adapter(network: Network, repeatable: bool):
    """A requests adapter that gives every request `network`'s timeouts and retries. `repeatable`:
    a request may be sent again after a read timeout (it changes nothing on the server); otherwise
    only a connection that was never made is retried."""
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    retry = Retry(total=network.retries, connect=network.retries, read=network.retries if repeatable else 0,
                  status=0, other=0, backoff_factor=network.backoff_s, raise_on_status=False,
                  allowed_methods=None if repeatable else Retry.DEFAULT_ALLOWED_METHODS)

    class TimedAdapter(HTTPAdapter):
        def send(self, request, **kwargs):
            if kwargs.get("timeout") is None:
                kwargs["timeout"] = (network.connect_timeout_s, network.read_timeout_s)
            return super().send(request, **kwargs)

    return TimedAdapter(max_retries=retry)


def client(network: Network, repeatable: bool = True):
    """The kaggle client, authenticated, every call with `network`'s timeouts and retries (`repeatable`:
    a call may be sent again after a read timeout; False for one that must never be sent twice)."""
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
    adapter = _timed_adapter(network, repeatable)
    build = api.build_kaggle_client

    def build_timed():
        """The client's HTTP session is made when first used, with no timeout: make it now and mount
        the timed adapter on it (the client then reuses it)."""
        client = build()
        http = client.http_client()
        http._init_session()
        session = getattr(http, "_session", None)
        if session is None:
            raise PipelineError("this version of the kaggle client keeps its HTTP session elsewhere: kp cannot set "
                                "its timeouts (pin the kaggle version in pyproject.toml)")
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        return client

    api.build_kaggle_client = build_timed
    download = api.download_file

    def download_timed(response, outfile, http_client, quiet=True, resume=False, **kwargs):
        """The client resumes a download cut off mid-way with its own requests: give them the same patience."""
        kwargs.setdefault("timeout", (network.connect_timeout_s, network.read_timeout_s))
        kwargs.setdefault("max_retries", network.retries)
        return download(response, outfile, http_client, quiet, resume, **kwargs)

    api.download_file = download_timed
    return api


def endpoint() -> str:
    """The server the client talks to, for messages."""
    if os.environ.get("KAGGLE_API_ENVIRONMENT") == "LOCALHOST":
        return os.environ.get(LOCAL_ENDPOINT, "http://localhost")
    return "https://www.kaggle.com"


def download_competition(slug: str, dest: Path, network: Network = Network(), expected: list[str] = ()) -> Path:
    """Download the competition archive to `dest/SLUG.zip`, verified before it is kept.

    Args:
        slug: the competition.
        dest: the download cache folder.
        network: timeouts and retries.
        expected: members the archive must hold at its top level (`download.expected`).

    Returns:
        The cached archive. One already there is reused if it still reads as a zip archive with
        the expected members; one that does not is deleted and fetched again (with a warning).
    """
    archive = dest / f"{slug}.zip"
    if archive.is_file() or archive.is_symlink():
        problem = _archive_problem(archive, expected)
        if problem is None:
            return archive
        print(f"warning: the cached download {archive} {problem}: fetching it again", flush=True)
        archive.unlink()
    elif archive.is_dir():  # what an older kp left when a server sent a page instead of an archive
        shutil.rmtree(archive)
    api = client(network)
    dest.mkdir(parents=True, exist_ok=True)
    partial = dest / temporary_name(TMP_PREFIX, "download")
    partial.mkdir()
    try:
        try:
            api.competition_download_files(slug, path=str(partial), force=True, quiet=False)
        except Exception as exc:  # the client raises requests' HTTPError, ConnectionError, ValueError...
            raise PipelineError(f"kaggle download of {slug!r} failed: {describe_error(exc, slug)}") from None
        files = sorted(p for p in partial.iterdir() if not p.name.startswith("."))
        if len(files) != 1 or not files[0].is_file():
            raise PipelineError(f"kaggle download of {slug!r} from {endpoint()}: expected one archive, got "
                                f"{[f.name for f in files]}")
        problem = _archive_problem(files[0], expected)
        if problem is not None:
            raise PipelineError(f"kaggle download of {slug!r} from {endpoint()}: what the server sent {problem} "
                                f"(first bytes: {_first_bytes(files[0])}); nothing was cached, run again to retry")
        os.replace(files[0], archive)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return archive


def _archive_problem(path: Path, expected) -> str | None:
    """Why `path` is not a usable competition archive, or None: it must open as a zip (its central
    directory intact: a truncated download is not) and hold the `expected` top-level members."""
    try:
        with zipfile.ZipFile(path) as zf:
            tops = {top_level(name) for name in zf.namelist()}
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        return f"is not a readable zip archive ({exc})"
    missing = [name for name in expected if name not in tops]
    if missing:
        return f"lacks the expected member(s) {missing}"
    return None


def _first_bytes(path: Path, n: int = 80) -> str:
    with open(path, "rb") as handle:
        return repr(handle.read(n))


def bounded(call, seconds: float, what: str):
    """`call()`, but give up after `seconds` with one message: for the parts of the client whose
    timeouts cannot be set (its upload session). The abandoned call's thread ends with the process."""
    result: dict = {}

    def work():
        try:
            result["value"] = call()
        except BaseException as exc:  # handed to the caller's thread
            result["error"] = exc

    worker = threading.Thread(target=work, daemon=True, name="kaggle-call")
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise PipelineError(f"{what}: no answer from {endpoint()} within {seconds:.0f}s (kaggle.connect_timeout_s, "
                            "kaggle.read_timeout_s and kaggle.retries set how long kp waits)")
    if "error" in result:
        raise result["error"]
    return result["value"]


def describe_error(exc: Exception, slug: str) -> str:
    """One line for what the client raised: the status and what it means, or what went wrong on
    the way (a timeout, no connection, an answer that is not what the API sends)."""
    response = getattr(exc, "response", None)
    code = getattr(response, "status_code", None)
    if code == 401:
        return "401 unauthorized: the Kaggle credentials were refused"
    if code == 403:
        return (f"403 forbidden: accept the rules at https://www.kaggle.com/competitions/{slug}/rules "
                "(it cannot be done through the API)")
    if code == 404:
        return f"404: no competition {slug!r} (check competition.slug)"
    if code is not None:
        return f"{code} from {endpoint()}: {server_message(response)}"
    name = type(exc).__name__
    if "Timeout" in name or "timed out" in str(exc):
        return (f"{endpoint()} did not answer in time, after retries ({name}); kaggle.connect_timeout_s, "
                "kaggle.read_timeout_s and kaggle.retries set how long kp waits")
    if "ConnectionError" in name or "ConnectTimeout" in name:
        return f"cannot reach the Kaggle server {endpoint()} ({exc})"
    if isinstance(exc, ValueError):  # JSONDecodeError and the like: a 200 whose body is not the API's JSON
        return f"{endpoint()} answered with something that is not the API's JSON ({name}: {exc})"
    return f"{name}: {exc}"


def server_message(response) -> str:
    """The server's `message` when it answered JSON, else the first bytes of what it sent (an HTML page)."""
    try:
        body = response.json()
        if isinstance(body, dict) and body.get("message"):
            return str(body["message"])
    except ValueError:
        pass
    try:
        text = response.text
    except Exception:  # a streamed body that cannot be read any more
        text = ""
    return f"{response.headers.get('Content-Type', 'no content type')} body {text[:120]!r}"

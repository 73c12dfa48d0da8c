"""Talking to Kaggle when the network or the server misbehaves: a server that accepts and never
answers, one that answers an HTML page or broken JSON, a download that is not a readable archive,
and a cached download damaged after the fact. Every case ends in one line naming the endpoint,
within the configured timeouts, and nothing bad is cached."""
from __future__ import annotations

import contextlib
import shutil
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pipeline.kaggle.api import Network
from tests.helpers import make_statefarm_like, statefarm_like_config
from tests.test_faults import kp, one_line_error

SLUG = "synth-statefarm"
IMPATIENT = ["--set", "kaggle.connect_timeout_s=1", "--set", "kaggle.read_timeout_s=0.5", "--set", "kaggle.retries=2",
             "--set", "kaggle.backoff_s=0.1"]


@pytest.fixture
def through_kaggle(project, tmp_path, kaggle_env):
    """The synthetic State Farm competition, downloaded through the kaggle client; returns a function
    that points the client at a URL."""
    archive = make_statefarm_like(tmp_path / "data")
    statefarm_like_config(project, archive)
    kaggle_env.setenv("KAGGLE_API_ENVIRONMENT", "LOCALHOST")

    def point_at(url: str) -> None:
        kaggle_env.setenv("KAGGLE_LOCAL_ENDPOINT", url)

    point_at.archive = archive
    return point_at


@contextlib.contextmanager
def silent_server():
    """A server on 127.0.0.1 that accepts every connection and never sends a byte."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    held, stop = [], threading.Event()

    def accept():
        while not stop.is_set():
            with contextlib.suppress(TimeoutError, OSError):
                held.append(listener.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}", held
    finally:
        stop.set()
        thread.join()
        for connection in held:
            connection.close()
        listener.close()


@contextlib.contextmanager
def answering(status: int, content_type: str, body: bytes):
    """A server on 127.0.0.1 that answers every request with the same status and body."""
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_server_that_never_answers_ends_the_download_within_the_timeouts(project, through_kaggle):
    with silent_server() as (url, held):
        through_kaggle(url)
        started = time.monotonic()
        result = kp("download", "--comp", "synth", "--set", "download.source=kaggle", *IMPATIENT)
        took = time.monotonic() - started
    one_line_error(result, f"kaggle download of '{SLUG}' failed: {url} did not answer in time, after retries",
                   "kaggle.read_timeout_s")
    bound = Network(1, 0.5, 2, 0.1).worst_case_s()
    assert took < bound + 15, (took, bound)  # 15 s: starting the client; a hang would never end
    assert len(held) == 3  # a download changes nothing on the server: tried again twice
    assert not (project / "work" / "synth" / "_cache" / "kaggle" / f"{SLUG}.zip").exists()


@pytest.mark.parametrize("status, content_type, body, fragment", [
    (500, "text/html", b"<html><body>Internal Server Error</body></html>",
     "500 from {url}: text/html body '<html><body>Internal Server Error"),
    (200, "application/json", b"{not json", "{url} answered with something that is not the API's JSON"),
])
def test_a_server_error_page_or_broken_json_is_one_line_with_the_status(project, through_kaggle, status,
                                                                          content_type, body, fragment):
    with answering(status, content_type, body) as url:
        through_kaggle(url)
        result = kp("download", "--comp", "synth", "--set", "download.source=kaggle", *IMPATIENT)
    one_line_error(result, f"kaggle download of '{SLUG}' failed: " + fragment.format(url=url))


@pytest.mark.parametrize("served", ["truncated", "html page"])
def test_a_download_that_is_not_a_readable_archive_is_never_cached(project, tmp_path, through_kaggle, served):
    from pipeline.kaggle.local.server import KaggleLocalServer

    data = tmp_path / "served"
    (data / SLUG).mkdir(parents=True)
    good = through_kaggle.archive.read_bytes()
    bad = good[: len(good) // 2] if served == "truncated" else b"<!DOCTYPE html><html>Please sign in</html>"
    (data / SLUG / f"{SLUG}.zip").write_bytes(bad)
    cached = project / "work" / "synth" / "_cache" / "kaggle" / f"{SLUG}.zip"
    with KaggleLocalServer(data, log_dir=tmp_path / "log") as server:
        through_kaggle(server.url)
        one_line_error(kp("download", "--comp", "synth", "--set", "download.source=kaggle"),
                       f"kaggle download of '{SLUG}' from {server.url}: what the server sent is not a readable zip",
                       "nothing was cached")
        assert not cached.exists()
        (data / SLUG / f"{SLUG}.zip").write_bytes(good)  # the server is fixed: the next run just works
        assert kp("download", "--comp", "synth", "--set", "download.source=kaggle").exit_code == 0
    assert cached.read_bytes() == good


def test_a_cached_download_damaged_later_is_fetched_again(project, tmp_path, through_kaggle):
    from pipeline.kaggle.local.server import KaggleLocalServer

    data = tmp_path / "served"
    (data / SLUG).mkdir(parents=True)
    shutil.copy(through_kaggle.archive, data / SLUG / f"{SLUG}.zip")
    cached = project / "work" / "synth" / "_cache" / "kaggle" / f"{SLUG}.zip"
    with KaggleLocalServer(data, log_dir=tmp_path / "log") as server:
        through_kaggle(server.url)
        assert kp("download", "--comp", "synth", "--set", "download.source=kaggle").exit_code == 0
        cached.write_bytes(cached.read_bytes()[:1000])
        again = kp("download", "--comp", "synth", "--set", "download.source=kaggle", "--force")
        assert again.exit_code == 0, again.output
        assert f"the cached download {cached} is not a readable zip archive" in again.output
        assert server.requests.count(f"GET /files/{SLUG}/{SLUG}.zip") == 2
    assert cached.read_bytes() == through_kaggle.archive.read_bytes()


@pytest.mark.parametrize("body, reason", [
    ({"competitionName": SLUG, "fileName": "a.csv", "contentLength": "abc"},
     "contentLength must be a whole number of bytes, got 'abc'"),
    ([1, 2], "request body is not a JSON object"),
    ({"competitionName": SLUG, "pageSize": "many"}, "bad request to"),
])
def test_the_local_server_answers_a_malformed_request_with_400_and_the_reason(tmp_path, body, reason):
    import json
    import urllib.error
    import urllib.request

    from pipeline.kaggle.local.server import API, COMPETITIONS, KaggleLocalServer

    data = tmp_path / "served"
    (data / SLUG).mkdir(parents=True)
    (data / SLUG / f"{SLUG}.zip").write_bytes(make_statefarm_like(tmp_path / "data").read_bytes())
    method = "StartSubmissionUpload" if isinstance(body, list) or "fileName" in body else "ListSubmissions"
    with KaggleLocalServer(data, log_dir=tmp_path / "log") as server:
        request = urllib.request.Request(f"{server.url}{API}{COMPETITIONS}/{method}", data=json.dumps(body).encode(),
                                         headers={"Authorization": "Basic eDp5", "Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(request, timeout=10)
    assert answer.value.code == 400
    assert reason in json.loads(answer.value.read())["message"]


def test_an_upload_to_a_server_that_never_answers_is_sent_once_and_ends(kaggle_env, tmp_path):
    from pipeline.core.errors import PipelineError
    from pipeline.kaggle import submissions

    submission = tmp_path / "submission.csv"
    submission.write_text("img,c0\na.jpg,1\n")
    kaggle_env.setenv("KAGGLE_API_ENVIRONMENT", "LOCALHOST")
    with silent_server() as (url, held):
        kaggle_env.setenv("KAGGLE_LOCAL_ENDPOINT", url)
        with pytest.raises(PipelineError, match=f"kaggle submission of {submission} to '{SLUG}' failed: {url} did not "
                                                "answer in time"):
            submissions.submit_file(SLUG, submission, "x", Network(1, 0.5, 2, 0.1))
    assert len(held) == 1  # the server may have taken it: never sent twice

"""A local server that speaks Kaggle's competition API, for tests and offline work (`make kaggle-local`).

It serves the competitions in a folder laid out like ../shared/data/competitions (`SLUG/SLUG.zip`
+ `SLUG/solution.csv`) on 127.0.0.1 to the real `kaggle` client (kaggle 2.x / kagglesdk): every
call is `POST /api/v1/<service>/<Method>` with camelCase JSON; errors are JSON bodies with `code`
>= 400, which the client raises as HTTPError. Implemented: competitions (ListDataFiles,
DownloadDataFiles: a 302 to the archive on this server; StartSubmissionUpload: a token and an
upload URL on this server, then the PUT of the file there; CreateSubmission, ListSubmissions,
CreateCodeSubmission), blobs (StartBlobUpload, then the PUT), datasets (CreateDataset,
CreateDatasetVersion, GetDatasetStatus) and kernels (SaveKernel, GetKernelSessionStatus,
ListKernelSessionOutput, whose file URLs are on this server). What a competition holds and how a
submission is scored is `pipeline.kaggle.local.competitions`; datasets, kernels and their runs
`pipeline.kaggle.local.kernels`; this module is only the HTTP side.

Point the pipeline at it with KAGGLE_API_ENVIRONMENT=LOCALHOST and KAGGLE_LOCAL_ENDPOINT=http://
127.0.0.1:PORT (see `pipeline.kaggle.api`); credentials can be any KAGGLE_USERNAME / KAGGLE_KEY.
The `kaggle` command line gets there with KAGGLE_API_ENVIRONMENT=LOCALHOST and HTTP_PROXY=<the URL>.
    python -m pipeline.kaggle.local [--data ../shared/data/competitions] [--port 8765] [--log DIR]
                                    [--kernel-timeout SECONDS] [--kernel-python PYTHON]
"""
from __future__ import annotations

import argparse
import email.utils
import json
import os
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

from pipeline.kaggle.local.competitions import CompetitionError, LocalCompetitions
from pipeline.kaggle.local.kernels import DATASET_UPLOAD, LocalKernels
from pipeline.kaggle.local.sandbox import confinement

MAX_REQUEST_BYTES = 16 << 20  # an API call's JSON body (files go up through the upload URL)
API = "/api/v1/"
COMPETITIONS, BLOBS = "competitions.CompetitionApiService", "blobs.BlobApiService"
DATASETS, KERNELS = "datasets.DatasetApiService", "kernels.KernelsApiService"
UPLOAD_PREFIX = "/upload/"  # TOKEN: where a submission's or a dataset's file is PUT
OUTPUT_PREFIX = "/kernel-output/"  # OWNER/SLUG/VERSION/FILE: a kernel run's output file


class KaggleLocalServer:
    """Serves `data_dir`'s competitions on 127.0.0.1:`port` (0: a free port) in a background thread.

    Uploads, the submissions log, datasets and kernel runs go to `log_dir` (default: a new temporary
    folder); kernels run with `kernel_python` (Kaggle's image is one with TensorFlow and without kp: the
    bundle's wheels install it) and are stopped after `kernel_timeout_s` (Kaggle's limit is 9 hours)."""

    def __init__(self, data_dir: Path, port: int = 0, rules_not_accepted=frozenset(), log_dir: Path | None = None,
                 scoring_delay_s: float = 1.0, kernel_timeout_s: float = 9 * 3600, kernel_python: str = sys.executable):
        log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="kaggle-local-"))
        self.competitions = LocalCompetitions(data_dir, log_dir, rules_not_accepted, scoring_delay_s)
        self.kernels = LocalKernels(log_dir, self.competitions, kernel_timeout_s, kernel_python)
        self.requests: list[str] = []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def client_environment(self) -> dict[str, str]:
        """The variables that send the pipeline's kaggle client here."""
        return {"KAGGLE_API_ENVIRONMENT": "LOCALHOST", "KAGGLE_LOCAL_ENDPOINT": self.url}

    def start(self) -> "KaggleLocalServer":
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.kernels.wait()
        self.competitions.wait_for_scoring()

    def __enter__(self) -> "KaggleLocalServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _handler(self):
        server, competitions, kernels = self, self.competitions, self.kernels

        class Handler(BaseHTTPRequestHandler):
            timeout = 300  # seconds a stalled client may hold a connection between two reads

            def log_message(self, fmt, *args):  # keep test output quiet
                pass

            def _json(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _error(self, status: int, message: str) -> None:
                self._json(status, {"code": status, "message": message})

            def _body(self) -> bytes:
                length = self.headers.get("Content-Length") or "0"
                return self.rfile.read(int(length) if length.isdigit() else 0)

            def do_POST(self):
                path = urlparse(self.path).path
                server.requests.append(f"POST {path}")
                length = self.headers.get("Content-Length") or "0"
                if not length.isdigit() or int(length) > MAX_REQUEST_BYTES:
                    self.close_connection = True  # its body is not read
                    return self._error(400, f"Content-Length {length[:40]!r}: a request body is a number of bytes, "
                                            f"at most {MAX_REQUEST_BYTES:,}")
                try:
                    body = json.loads(self._body() or b"{}")
                except ValueError:
                    return self._error(400, "request body is not JSON")
                if not isinstance(body, dict):
                    return self._error(400, "request body is not a JSON object")
                service, _, method = path[len(API):].partition("/")
                if not path.startswith(API) or service not in (COMPETITIONS, BLOBS, DATASETS, KERNELS):
                    return self._error(404, f"no such endpoint {path}")
                if not self.headers.get("Authorization"):
                    return self._error(401, "Unauthenticated: no credentials")
                try:
                    if service == COMPETITIONS:
                        self._call(method, body)
                    else:
                        self._json(200, self._kernels_call(method, body))
                except CompetitionError as exc:
                    self._error(exc.status, str(exc))
                except (TypeError, ValueError) as exc:  # a field of the wrong kind: the client's mistake, said so
                    self._error(400, f"bad request to {path}: {exc}")
                except Exception as exc:  # the server's own failure still answers: a client never waits on it
                    self._error(500, f"the local server failed on {path}: {type(exc).__name__}: {exc}")

            def _call(self, method: str, body: dict) -> None:
                slug = body.get("competitionName", "")
                if method == "ListDataFiles":
                    return self._json(200, {"files": competitions.data_files(slug), "nextPageToken": ""})
                if method == "DownloadDataFiles":
                    archive = competitions.check_access(slug)
                    self.send_response(302)
                    self.send_header("Location", f"{server.url}/files/{slug}/{archive.name}")
                    self.send_header("Content-Length", "0")
                    return self.end_headers()
                if method == "StartSubmissionUpload":
                    token = competitions.start_upload(slug, body.get("fileName", ""), body.get("contentLength", 0))
                    return self._json(200, {"token": token, "createUrl": f"{server.url}{UPLOAD_PREFIX}{token}"})
                if method == "CreateSubmission":
                    submission = competitions.create_submission(slug, body.get("blobFileTokens", ""),
                                                                body.get("submissionDescription", ""))
                    return self._json(200, {"message": f"Successfully submitted to {slug}", "ref": submission.ref})
                if method == "ListSubmissions":
                    listed = competitions.submissions(slug)
                    size = int(body.get("pageSize") or 20)
                    start = int(body.get("pageToken") or 0)
                    more = start + size < len(listed)
                    return self._json(200, {"submissions": [s.as_api() for s in listed[start:start + size]],
                                            "nextPageToken": str(start + size) if more else ""})
                if method == "CreateCodeSubmission":
                    submission = kernels.submit_code(
                        slug, f"{body.get('kernelOwner', '')}/{body.get('kernelSlug', '')}", body.get("kernelVersion"),
                        body.get("fileName", ""), body.get("submissionDescription", ""))
                    return self._json(200, {"message": f"Successfully submitted to {slug}", "ref": submission.ref})
                return self._error(501, f"{method} is not implemented by this local server")

            def _kernels_call(self, method: str, body: dict) -> dict:
                """Uploads, datasets and kernels: the answer's JSON body."""
                if method == "StartBlobUpload":
                    token = competitions.uploads.start(DATASET_UPLOAD, body.get("name", ""), body.get("contentLength", 0))
                    return {"token": token, "createUrl": f"{server.url}{UPLOAD_PREFIX}{token}"}
                if method == "GetDatasetStatus":
                    return {"status": kernels.dataset_status(body.get("ownerSlug", ""), body.get("datasetSlug", ""))}
                if method in ("CreateDataset", "CreateDatasetVersion"):
                    new = method == "CreateDataset"
                    owner, slug = body.get("ownerSlug", ""), body.get("slug" if new else "datasetSlug", "")
                    files = body.get("files") if new else (body.get("body") or {}).get("files")
                    _, error = kernels.write_dataset(owner, slug, files, new)
                    return {"ref": f"{owner}/{slug}", "url": f"{server.url}/datasets/{owner}/{slug}",
                            "status": "error" if error else "ok", "error": error}
                if method == "SaveKernel":
                    version = kernels.save_kernel(body)
                    return {"ref": f"/code/{version.ref}", "url": f"{server.url}/code/{version.ref}",
                            "versionNumber": version.number}
                owner, slug = body.get("userName", ""), body.get("kernelSlug", "")
                if method == "GetKernelSessionStatus":
                    version = kernels.version(owner, slug)
                    return {"status": version.status, "failureMessage": version.failure}
                if method == "ListKernelSessionOutput":
                    version = kernels.version(owner, slug)
                    files = version.run.outputs if version.run else []
                    base = f"{server.url}{OUTPUT_PREFIX}{version.ref}/{version.number}/"
                    return {"files": [{"fileName": name, "url": base + name} for name in files],
                            "log": version.run.log if version.run else "", "nextPageToken": ""}
                raise CompetitionError(501, f"{method} is not implemented by this local server")

            def do_PUT(self):
                path = urlparse(self.path).path
                server.requests.append(f"PUT {path}")
                if not path.startswith(UPLOAD_PREFIX):
                    return self._error(404, f"no such upload URL {path}")
                probe = (self.headers.get("Content-Range") or "").startswith("bytes */")  # a resume's question
                length = self.headers.get("Content-Length") or "0"
                try:
                    if not length.isdigit():
                        raise CompetitionError(400, f"Content-Length {length!r} is not a number of bytes")
                    complete = competitions.uploads.receive(path[len(UPLOAD_PREFIX):], self.rfile.read, int(length),
                                                            probe)
                except CompetitionError as exc:
                    return self._error(exc.status, str(exc))
                except Exception as exc:  # the server's own failure still answers: a client never waits on it
                    return self._error(500, f"the local server failed on {path}: {type(exc).__name__}: {exc}")
                self._json(200 if complete else 308, {})

            def do_GET(self):
                path = unquote(urlparse(self.path).path)
                server.requests.append(f"GET {path}")
                parts = path.strip("/").split("/")
                if len(parts) == 3 and parts[0] == "files":
                    found = competitions.archive(parts[1])
                    found = found if found is not None and parts[2] == found.name else None
                elif len(parts) == 5 and path.startswith(OUTPUT_PREFIX) and parts[3].isdigit():
                    try:
                        found = kernels.output_file(parts[1], parts[2], int(parts[3]), parts[4])
                    except CompetitionError:
                        found = None
                else:
                    found = None
                if found is None:
                    return self._error(404, f"no file {path}")
                self.send_response(200)
                self.send_header("Content-Type", "application/zip" if found.suffix == ".zip" else
                                 "application/octet-stream")
                self.send_header("Content-Length", str(found.stat().st_size))
                self.send_header("Last-Modified", email.utils.formatdate(found.stat().st_mtime, usegmt=True))
                self.end_headers()
                with open(found, "rb") as handle:
                    while chunk := handle.read(1 << 20):
                        self.wfile.write(chunk)

        return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve Kaggle-layout competitions to the kaggle client locally.")
    default_data = os.environ.get("KAGGLE_LOCAL_DATA", str(Path(__file__).resolve().parents[4] / "shared" / "data" /
                                                           "competitions"))
    parser.add_argument("--data", default=default_data, help="folder of SLUG/SLUG.zip (+ SLUG/solution.csv)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("KAGGLE_LOCAL_PORT", "8765")))
    parser.add_argument("--log", default=os.environ.get("KAGGLE_LOCAL_LOG", str(Path.cwd() / "work" / "kaggle-local")),
                        help="where uploads, each competition's submissions.jsonl, datasets and kernel runs are kept")
    parser.add_argument("--kernel-timeout", type=float, default=9 * 3600, metavar="SECONDS",
                        help="a pushed kernel's time limit (Kaggle's: 9 hours)")
    parser.add_argument("--kernel-python", default=sys.executable, metavar="PYTHON",
                        help="the interpreter kernels run with (default: this one, which has kp installed)")
    args = parser.parse_args()
    server = KaggleLocalServer(Path(args.data), args.port, log_dir=Path(args.log), kernel_timeout_s=args.kernel_timeout,
                               kernel_python=args.kernel_python)
    for name, value in {**server.client_environment(), "KAGGLE_USERNAME": "local", "KAGGLE_KEY": "local"}.items():
        print(f"export {name}={value}")
    print(f"# for the kaggle command line also: export HTTP_PROXY={server.url}")
    print(f"# serving {sorted(p.name for p in Path(args.data).iterdir() if p.is_dir())} on {server.url}; "
          f"submissions logged in {args.log}; Ctrl-C stops", flush=True)
    unconfined = confinement()
    if unconfined:
        print(f"# {unconfined}", flush=True)
    try:
        server.httpd.serve_forever()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()

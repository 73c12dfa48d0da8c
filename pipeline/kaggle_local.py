"""A local server that speaks Kaggle's competition API, for tests and offline work (`make kaggle-local`).

It serves the competitions in a folder laid out like ../shared/data/competitions (`SLUG/SLUG.zip`
+ `SLUG/solution.csv`) on 127.0.0.1 to the real `kaggle` client (kaggle 2.x / kagglesdk): every
call is `POST /api/v1/competitions.CompetitionApiService/<Method>` with camelCase JSON; errors are
JSON bodies with `code` >= 400, which the client raises as HTTPError. Implemented: ListDataFiles,
DownloadDataFiles (a 302 to the archive on this server). Submissions (StartSubmissionUpload, the
PUT, CreateSubmission, ListSubmissions, scoring) are not implemented yet.

Point the pipeline at it with KAGGLE_API_ENVIRONMENT=LOCALHOST and KAGGLE_LOCAL_ENDPOINT=http://
127.0.0.1:PORT (see `pipeline.kaggle_api`); credentials can be any KAGGLE_USERNAME / KAGGLE_KEY.
    python -m pipeline.kaggle_local [--data ../shared/data/competitions] [--port 8765]
"""
from __future__ import annotations

import argparse
import email.utils
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

SERVICE = "/api/v1/competitions.CompetitionApiService/"


class KaggleLocalServer:
    """Serves `data_dir`'s competitions on 127.0.0.1:`port` (0: a free port) in a background thread."""

    def __init__(self, data_dir: Path, port: int = 0, rules_not_accepted: set[str] = frozenset()):
        self.data_dir = Path(data_dir)
        self.rules_not_accepted = set(rules_not_accepted)
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

    def __enter__(self) -> "KaggleLocalServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def archive(self, slug: str) -> Path | None:
        path = self.data_dir / slug / f"{slug}.zip"
        return path if "/" not in slug and ".." not in slug and path.is_file() else None

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
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

            def do_POST(self):
                path = urlparse(self.path).path
                server.requests.append(f"POST {path}")
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    body = json.loads(self.rfile.read(length) or b"{}")
                except ValueError:
                    return self._error(400, "request body is not JSON")
                if not path.startswith(SERVICE):
                    return self._error(404, f"no such endpoint {path}")
                if not self.headers.get("Authorization"):
                    return self._error(401, "Unauthenticated: no credentials")
                method, slug = path[len(SERVICE):], body.get("competitionName", "")
                if server.archive(slug) is None:
                    return self._error(404, f"Competition {slug!r} not found")
                if slug in server.rules_not_accepted:
                    return self._error(403, "You must accept this competition's rules before you can use it")
                if method == "ListDataFiles":
                    return self._json(200, {"files": self._files(slug), "nextPageToken": ""})
                if method == "DownloadDataFiles":
                    self.send_response(302)
                    self.send_header("Location", f"{server.url}/files/{slug}/{slug}.zip")
                    self.send_header("Content-Length", "0")
                    return self.end_headers()
                return self._error(501, f"{method} is not implemented by this local server")

            def _files(self, slug: str) -> list[dict]:
                archive = server.archive(slug)
                return [{"name": archive.name, "totalBytes": archive.stat().st_size,
                         "creationDate": email.utils.formatdate(archive.stat().st_mtime, usegmt=True)}]

            def do_GET(self):
                path = unquote(urlparse(self.path).path)
                server.requests.append(f"GET {path}")
                parts = path.strip("/").split("/")
                archive = server.archive(parts[1]) if len(parts) == 3 and parts[0] == "files" else None
                if archive is None or parts[2] != archive.name:
                    return self._error(404, f"no file {path}")
                size = archive.stat().st_size
                self.send_response(200)
                self.send_header("Content-Type", "application/zip")
                self.send_header("Content-Length", str(size))
                self.send_header("Last-Modified", email.utils.formatdate(archive.stat().st_mtime, usegmt=True))
                self.end_headers()
                with open(archive, "rb") as handle:
                    while chunk := handle.read(1 << 20):
                        self.wfile.write(chunk)

        return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve Kaggle-layout competitions to the kaggle client locally.")
    default_data = os.environ.get("KAGGLE_LOCAL_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data" /
                                                           "competitions"))
    parser.add_argument("--data", default=default_data, help="folder of SLUG/SLUG.zip (+ SLUG/solution.csv)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("KAGGLE_LOCAL_PORT", "8765")))
    args = parser.parse_args()
    server = KaggleLocalServer(Path(args.data), args.port)
    for name, value in {**server.client_environment(), "KAGGLE_USERNAME": "local", "KAGGLE_KEY": "local"}.items():
        print(f"export {name}={value}")
    print(f"# serving {sorted(p.name for p in Path(args.data).iterdir() if p.is_dir())} on {server.url}; Ctrl-C stops",
          flush=True)
    try:
        server.httpd.serve_forever()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()

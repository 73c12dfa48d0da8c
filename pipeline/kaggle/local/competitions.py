"""What the local Kaggle-compatible server knows: each competition's files, uploads, submissions and scores.

A competition is a folder `SLUG/` holding `SLUG.zip` (what `download` gets, with its
`sample_submission.csv`) and `solution.csv` (the hidden test labels). A submission goes through
Kaggle's three steps: `start_upload` (a one-time token), the file's bytes PUT to its URL
(`Uploads.receive`), `create_submission` (PENDING); it is scored a moment later in the background, like Kaggle's queue,
and becomes COMPLETE with a public score, or ERROR with the reason (wrong header, missing,
unexpected or duplicate ids, NaN or non-numeric values). The evaluation is read from the sample
submission and the solution (`pipeline.evaluation.scoring.competition_from_files`); log loss is Kaggle's: clipped
to [1e-15, 1 - 1e-15], rows renormalised. A code submission (`create_code_submission`) has no upload:
it is PENDING while the kernel reruns on the hidden test set (`pipeline.kaggle.local.kernels`), then
its output is scored on that set's labels.

Uploads (a submission's file, a dataset's) are `Uploads`: a start call announces a file and gets a
token and URL, one PUT brings its bytes (a resume probe, `Content-Range: bytes */N` with no body,
only asks whether it is complete), and a later call hands the token back for the file; a token
handed back for another purpose (another competition, a dataset) is refused.

Every submitted file is kept under `log_dir/SLUG/files/` and every scored submission is appended to
`log_dir/SLUG/submissions.jsonl`, which a restarted server reads back.
"""
from __future__ import annotations

import io
import json
import shutil
import threading
import uuid
import zipfile
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from pipeline.core.artifacts import SOLUTION_FILE, file_name_problem
from pipeline.core.errors import PipelineError
from pipeline.evaluation.scoring import competition_from_files, read_submission, score_submission

SAMPLE_NAME = "sample_submission.csv"
LOG_NAME = "submissions.jsonl"
PENDING, COMPLETE, ERROR = "PENDING", "COMPLETE", "ERROR"


class CompetitionError(Exception):
    """A request the server refuses: `status` is the HTTP code, the message goes back to the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Submission:
    ref: int
    competition: str
    file_name: str
    total_bytes: int
    date: str  # ISO 8601 UTC, as kagglesdk parses it
    description: str
    status: str = PENDING
    public_score: str | None = None
    error_description: str | None = None

    def as_api(self) -> dict:
        """The camelCase `ApiSubmission` the kaggle client reads."""
        body = {"ref": self.ref, "fileName": self.file_name, "totalBytes": self.total_bytes, "date": self.date,
                "description": self.description, "status": self.status, "submittedBy": "local"}
        if self.public_score is not None:
            body["publicScore"] = self.public_score
        if self.error_description is not None:
            body["errorDescription"] = self.error_description
        return body


@dataclass
class Upload:
    """One file announced by a start call: its name, announced length, and where its bytes are once received."""

    purpose: str
    name: str
    length: int
    path: Path
    complete: bool = False


MAX_UPLOAD_BYTES = 100 << 30  # Kaggle's limit on a dataset (a submission file is far smaller)


class Uploads:
    """Uploads under `folder` (thread-safe)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)  # each upload's bytes in folder/TOKEN/NAME
        self._lock = threading.Lock()
        self._uploads: dict[str, Upload] = {}

    def start(self, purpose: str, name: str, length) -> str:
        """A token for the upload of `name`, `length` bytes, for `purpose`; a 400 for a bad name or length."""
        shown = repr(name) if len(str(name)) <= 80 else f"{str(name)[:60]!r}... ({len(str(name)):,} characters)"
        problem = file_name_problem(name) or ("a hidden name (starting with '.')" if name.startswith(".") else None)
        if problem:
            raise CompetitionError(400, f"invalid file name {shown}: {problem}")
        try:
            length = int(length)
        except (TypeError, ValueError):
            raise CompetitionError(400, f"contentLength must be a whole number of bytes, got {length!r}") from None
        if length < 0:
            raise CompetitionError(400, f"contentLength must not be negative, got {length}")
        if length > MAX_UPLOAD_BYTES:
            raise CompetitionError(400, f"contentLength {length:,} is above this server's limit of "
                                        f"{MAX_UPLOAD_BYTES:,} bytes per upload")
        token = uuid.uuid4().hex
        with self._lock:
            self._uploads[token] = Upload(purpose, name, length, self.folder / token / name)
        return token

    def receive(self, token: str, read, length: int, probe: bool = False) -> bool:
        """Store the `length` bytes PUT for `token`, read in chunks with `read(n)` (never held whole in
        memory); whether the upload is complete (a probe only asks)."""
        with self._lock:
            upload = self._uploads.get(token)
        if upload is None:
            raise CompetitionError(404, "unknown or expired upload URL")
        if probe:
            return upload.complete
        if length != upload.length:
            raise CompetitionError(400, f"received {length:,} bytes, the upload announced {upload.length:,}")
        upload.path.parent.mkdir(parents=True, exist_ok=True)
        left = length
        with open(upload.path, "wb") as out:
            while left:
                chunk = read(min(left, 1 << 20))
                if not chunk:
                    raise CompetitionError(400, f"the upload ended after {length - left:,} of {length:,} bytes")
                out.write(chunk)
                left -= len(chunk)
        upload.complete = True
        return True

    def take(self, token: str, purpose: str, refusal: str) -> Upload:
        """The complete upload `token` names for `purpose`, handed over once (its file is the caller's to
        move; `discard` drops it); a 400 saying `refusal` otherwise."""
        with self._lock:
            upload = self._uploads.get(token)
            if upload is None or upload.purpose != purpose or not upload.complete:
                raise CompetitionError(400, refusal)
            del self._uploads[token]
        return upload

    def discard(self, upload: Upload) -> None:
        """Remove what is left of a taken upload."""
        shutil.rmtree(upload.path.parent, ignore_errors=True)


class LocalCompetitions:
    """The competitions under `data_dir` and the submissions made to them (thread-safe)."""

    def __init__(self, data_dir: Path, log_dir: Path, rules_not_accepted=frozenset(), scoring_delay_s: float = 1.0):
        self.data_dir = Path(data_dir)
        self.log_dir = Path(log_dir)
        self.rules_not_accepted = set(rules_not_accepted)
        self.scoring_delay_s = scoring_delay_s
        self._lock = threading.Lock()
        self.uploads = Uploads(self.log_dir / "uploads")  # a submission's file, and (kernels.py) a dataset's
        self._submissions: dict[str, list[Submission]] = {}
        self._next_ref = 1 + max((s.ref for subs in map(self._read_log, self._slugs()) for s in subs), default=0)
        self._timers: list[threading.Timer] = []

    def _slugs(self) -> list[str]:
        return sorted(p.name for p in self.data_dir.iterdir() if self.archive(p.name)) if self.data_dir.is_dir() else []

    # -- the competition and its data files ------------------------------------------------------------

    def archive(self, slug: str) -> Path | None:
        if not isinstance(slug, str) or file_name_problem(slug) or slug.startswith("."):
            return None
        path = self.data_dir / slug / f"{slug}.zip"
        return path if path.is_file() else None

    def check_access(self, slug: str) -> Path:
        """The competition's archive; 404 for an unknown slug, 403 where its rules are not accepted."""
        archive = self.archive(slug)
        if archive is None:
            raise CompetitionError(404, f"Competition {slug!r} not found")
        if slug in self.rules_not_accepted:
            raise CompetitionError(403, "You must accept this competition's rules before you can use it")
        return archive

    def data_files(self, slug: str) -> list[dict]:
        archive = self.check_access(slug)
        created = datetime.fromtimestamp(archive.stat().st_mtime, timezone.utc)
        return [{"name": archive.name, "totalBytes": archive.stat().st_size, "creationDate": _iso(created)}]

    # -- submitting: token, upload, submission ------------------------------------------------------------

    def start_upload(self, slug: str, file_name: str, content_length) -> str:
        self.check_access(slug)
        return self.uploads.start(f"competition {slug}", file_name, content_length)

    def create_submission(self, slug: str, token: str, description: str) -> Submission:
        self.check_access(slug)
        upload = self.uploads.take(token, f"competition {slug}",
                                   "blobFileTokens does not name a completed upload to this competition")
        submission = self._new_submission(slug, upload.name, upload.length, description)
        stored = self.log_dir / slug / "files" / f"{submission.ref}-{upload.name}"
        stored.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(upload.path, stored)
        self.uploads.discard(upload)
        self._score_later(submission, lambda: stored, None, self.scoring_delay_s)
        return submission

    def create_code_submission(self, slug: str, kernel: str, file_name: str, description: str, produce,
                               solution: Path) -> Submission:
        """A code submission: PENDING while `produce()` (the kernel's rerun on the hidden test set) runs, then
        the file it returns scored on `solution`; ERROR with the reason `produce` raised (a CompetitionError)."""
        self.check_access(slug)
        submission = self._new_submission(slug, f"{kernel}/{file_name}", 0, description)
        self._score_later(submission, produce, solution, 0.0)
        return submission

    def _new_submission(self, slug: str, file_name: str, size: int, description: str) -> Submission:
        with self._lock:
            submission = Submission(ref=self._next_ref, competition=slug, file_name=file_name, total_bytes=size,
                                    date=_iso(datetime.now(timezone.utc)), description=description or "")
            self._next_ref += 1
            self._submissions.setdefault(slug, self._read_log(slug)).append(submission)
        return submission

    def _score_later(self, submission: Submission, produce, solution: Path | None, delay_s: float) -> None:
        """Score the file `produce()` returns after `delay_s`, in the background, like Kaggle's queue."""
        timer = threading.Timer(delay_s, self._score, args=(submission, produce, solution))
        timer.daemon = True
        with self._lock:
            self._timers.append(timer)
        timer.start()

    def submissions(self, slug: str) -> list[Submission]:
        """Newest first, as Kaggle lists them."""
        self.check_access(slug)
        with self._lock:
            listed = self._submissions.setdefault(slug, self._read_log(slug))
            return sorted(listed, key=lambda s: s.ref, reverse=True)

    def wait_for_scoring(self) -> None:
        """Block until every submission made so far has been scored (for shutdown and tests)."""
        for timer in list(self._timers):
            timer.join()

    # -- scoring and the log ----------------------------------------------------------------------------

    def _score(self, submission: Submission, produce, solution: Path | None) -> None:
        try:
            score = self.score_file(submission.competition, produce(), solution)
            update = {"status": COMPLETE, "public_score": f"{score:.5f}"}
        except (PipelineError, CompetitionError) as exc:
            update = {"status": ERROR, "error_description": f"Submission scoring error: {exc}"}
        except Exception as exc:  # a server bug must still end the submission, as Kaggle's would
            update = {"status": ERROR, "error_description": f"internal scoring error: {type(exc).__name__}: {exc}"}
        with self._lock:
            for key, value in update.items():
                setattr(submission, key, value)
            log = self.log_dir / submission.competition / LOG_NAME
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "a") as handle:
                handle.write(json.dumps(asdict(submission)) + "\n")

    def solution_path(self, slug: str) -> Path:
        return self.data_dir / slug / SOLUTION_FILE

    def score_file(self, slug: str, path: Path, solution: Path | None = None) -> float:
        """The public score of a submission file (.csv, .csv.gz or .zip) on `solution` (default: the
        competition's, of its public test set); PipelineError if malformed."""
        labels = pd.read_csv(solution or self.solution_path(slug), dtype=str)
        with zipfile.ZipFile(self.check_access(slug)) as zf:
            sample = pd.read_csv(io.BytesIO(zf.read(SAMPLE_NAME)), dtype=str)
        submission = read_submission(path)
        return score_submission(submission, labels, competition_from_files(sample, labels))

    def _read_log(self, slug: str) -> list[Submission]:
        log = self.log_dir / slug / LOG_NAME
        if not log.is_file():
            return []
        return [Submission(**json.loads(line)) for line in log.read_text().splitlines() if line.strip()]


def _iso(moment: datetime) -> str:
    """A UTC time as kagglesdk's DateTimeSerializer writes and parses it: 2026-11-22T10:54:10.641Z."""
    return moment.astimezone(timezone.utc).replace(tzinfo=None).isoformat(timespec="milliseconds") + "Z"

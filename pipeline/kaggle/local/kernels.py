"""The local Kaggle server's uploads, datasets and kernels, and the rerun behind a code submission.

- Uploads (`StartBlobUpload`): the competitions' `Uploads`, for the purpose `dataset`.
- Datasets (`CreateDataset`, `CreateDatasetVersion`, `GetDatasetStatus`): version N of OWNER/SLUG is
  written from completed uploads to `log_dir/datasets/OWNER/SLUG/N/`; a zip archive is decompressed
  into a folder of its name, as Kaggle does (`--dir-mode zip` uploads each folder as one archive).
  A version is READY as soon as it is written.
- Kernels (`SaveKernel`, `GetKernelSessionStatus`, `ListKernelSessionOutput`): version N of OWNER/SLUG
  keeps its script and settings in `log_dir/kernels/OWNER/SLUG/N/` and runs at once in the background
  in the sandbox (`pipeline.kaggle.local.sandbox`): no network, the server's time limit, and under
  `input/` only its competition's files (`inputs.public_input`) and the newest version of each dataset
  it names. Python only: a script as it is, a notebook as its code cells run in order as one script.
- A code submission (`CreateCodeSubmission`) names a kernel version that ran to COMPLETE without
  internet access and wrote the file it names; the server reruns that version on the competition's
  hidden test set (`inputs.hidden_input`) and scores the file of that rerun, as Kaggle does.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.artifacts import SUBMISSION_FILE, TMP_PREFIX, file_name_problem
from pipeline.core.cache import temporary_name
from pipeline.core.errors import PipelineError
from pipeline.data.archive import extract_zip
from pipeline.kaggle.local.competitions import CompetitionError, LocalCompetitions
from pipeline.kaggle.local.inputs import HiddenTestError, hidden_input, public_input
from pipeline.kaggle.local.sandbox import KernelRun, network_isolation, run_kernel

QUEUED, RUNNING, COMPLETE, ERROR = "QUEUED", "RUNNING", "COMPLETE", "ERROR"  # Kaggle's KernelWorkerStatus names
READY = "READY"  # Kaggle's DatabundleVersionStatus once a dataset version can be used
DATASET_UPLOAD = "dataset"  # the purpose of an upload started by StartBlobUpload
RUN_RECORD = "run.json"  # beside a run's working folder: how it ended, in how long, with or without network


@dataclass
class KernelVersion:
    """One pushed version of a kernel: where its files are, and how its run stands."""

    owner: str
    slug: str
    number: int
    folder: Path
    settings: dict
    status: str = QUEUED
    run: KernelRun | None = None

    @property
    def ref(self) -> str:
        return f"{self.owner}/{self.slug}"

    @property
    def failure(self) -> str:
        return self.run.failure if self.run and self.run.failure else ""


def _split_ref(ref: str, what: str) -> tuple[str, str]:
    parts = (ref or "").split("/") if isinstance(ref, str) else []
    if len(parts) != 2 or any(file_name_problem(p) or p.startswith(".") for p in parts):
        shown = repr(ref) if len(str(ref)) <= 80 else f"{str(ref)[:60]!r}... ({len(str(ref)):,} characters)"
        raise CompetitionError(400, f"{what} must be OWNER/SLUG (two plain names), got {shown}")
    return parts[0], parts[1]


class LocalKernels:
    """Uploads, datasets and kernels of the local server (thread-safe).

    Args:
        log_dir: where uploads, dataset versions and kernel runs are kept.
        competitions: the server's competitions (their files, and their submissions).
        timeout_s: the time limit of every kernel run.
        python: the interpreter kernels run with (the server's own by default).
        isolate: run kernels without network; None: wherever the machine allows (`network_isolation`).
    """

    def __init__(self, log_dir: Path, competitions: LocalCompetitions, timeout_s: float = 9 * 3600,
                 python: str = sys.executable, isolate: bool | None = None):
        self.log_dir = Path(log_dir)
        self.competitions = competitions
        self.timeout_s = timeout_s
        self.python = python
        self.isolate = network_isolation() if isolate is None else isolate
        self._lock = threading.Lock()
        self._kernels: dict[str, list[KernelVersion]] = {}
        self._threads: list[threading.Thread] = []

    # -- datasets -------------------------------------------------------------------------------------------

    def _dataset_dir(self, owner: str, slug: str) -> Path:
        return self.log_dir / "datasets" / owner / slug

    def dataset_versions(self, owner: str, slug: str) -> list[int]:
        folder = self._dataset_dir(owner, slug)
        return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []

    def dataset_folder(self, ref: str) -> Path | None:
        """The newest version of dataset OWNER/SLUG, or None when there is none."""
        owner, slug = _split_ref(ref, "a dataset")
        versions = self.dataset_versions(owner, slug)
        return self._dataset_dir(owner, slug) / str(versions[-1]) if versions else None

    def dataset_status(self, owner: str, slug: str) -> str:
        if not self.dataset_versions(owner, slug):
            raise CompetitionError(404, f"Dataset {owner}/{slug} not found")
        return READY

    def write_dataset(self, owner: str, slug: str, files: list, new: bool) -> tuple[int, str]:
        """Version N of OWNER/SLUG from the uploads `files` names: (N, an error for the client or "")."""
        _split_ref(f"{owner}/{slug}", "a dataset")
        refusal = "files must name completed uploads (StartBlobUpload, then the PUT)"
        if not files:
            raise CompetitionError(400, refusal)
        with self._lock:  # checked, the uploads taken and the version written as one step
            versions = self.dataset_versions(owner, slug)
            if new and versions:
                return 0, f'The requested slug "{slug}" is already in use by a dataset. Please choose another slug.'
            if not new and not versions:
                raise CompetitionError(404, f"Dataset {owner}/{slug} not found")
            uploads = [self.competitions.uploads.take(str((f or {}).get("token", "")), DATASET_UPLOAD, refusal)
                       for f in files]
            number = (versions[-1] if versions else 0) + 1
            folder = self._dataset_dir(owner, slug) / str(number)
            partial = folder.parent / temporary_name(TMP_PREFIX, str(number))  # a version appears complete or not at all
            try:
                partial.mkdir(parents=True)
                for upload in uploads:
                    if zipfile.is_zipfile(upload.path):  # decompressed into a folder of its name, as Kaggle does
                        extract_zip(upload.path, partial / Path(upload.name).stem, label=upload.name)
                    else:
                        shutil.move(upload.path, partial / upload.name)
                os.replace(partial, folder)
            except (PipelineError, OSError) as exc:
                shutil.rmtree(partial, ignore_errors=True)
                return 0, f"dataset {owner}/{slug}: no version written: {exc}"
            finally:
                for upload in uploads:
                    self.competitions.uploads.discard(upload)
        return number, ""

    # -- kernels --------------------------------------------------------------------------------------------

    def save_kernel(self, body: dict) -> KernelVersion:
        """Store a pushed kernel's new version and start its run."""
        owner, slug = _split_ref(body.get("slug", ""), "the kernel's id")
        if body.get("kernelType") not in ("script", "notebook") or body.get("language") != "python":
            raise CompetitionError(400, "the local server runs Python kernels only (kernel_type: script or notebook, "
                                        f"language: python), not {body.get('kernelType')}/{body.get('language')}")
        code = body.get("text") or ""
        if body["kernelType"] == "notebook":  # its code cells, in order, run as one script
            try:
                cells = json.loads(code)["cells"]
            except (ValueError, KeyError, TypeError):
                raise CompetitionError(400, "the notebook's text is not a Jupyter notebook (no cells)") from None
            code = "\n\n".join(c.get("source", "") if isinstance(c.get("source"), str) else "".join(c["source"])
                                for c in cells if c.get("cell_type") == "code")
        competitions = list(body.get("competitionDataSources") or [])
        datasets = list(body.get("datasetDataSources") or [])
        inputs = {}
        for name in competitions:
            inputs[name] = public_input(self.competitions.check_access(name), self.log_dir / "inputs" / name)
        for ref in datasets:
            folder = self.dataset_folder(ref)
            if folder is None:
                raise CompetitionError(400, f"dataset source {ref!r} does not exist (push the dataset first)")
            inputs[ref.split("/")[1]] = folder
        settings = {"enable_internet": bool(body.get("enableInternet", True)), "enable_gpu": bool(body.get("enableGpu")),
                    "competitions": competitions, "datasets": datasets,
                    "inputs": {name: str(path) for name, path in inputs.items()}}
        with self._lock:
            versions = self._kernels.setdefault(f"{owner}/{slug}", [])
            number = len(versions) + 1
            folder = self.log_dir / "kernels" / owner / slug / str(number)
            folder.mkdir(parents=True)
            (folder / "script.py").write_text(code)
            (folder / "settings.json").write_text(json.dumps(settings, indent=2) + "\n")
            version = KernelVersion(owner, slug, number, folder, settings)
            versions.append(version)
        self._start(lambda: self._run(version))
        return version

    def _start(self, work) -> None:
        thread = threading.Thread(target=work, daemon=True, name="kernel-run")
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _run(self, version: KernelVersion) -> None:
        version.status = RUNNING
        inputs = {name: Path(path) for name, path in version.settings["inputs"].items()}
        version.run = self._sandbox(version.folder / "script.py", inputs, version.folder / "run")
        version.status = COMPLETE if version.run.status == "complete" else ERROR

    def _sandbox(self, script: Path, inputs: dict[str, Path], root: Path) -> KernelRun:
        """Run `script` in the sandbox in `root`; how it ended is also written to `root/run.json`."""
        try:
            run = run_kernel(script, inputs, root, self.timeout_s, self.python, isolate=self.isolate)
        except Exception as exc:  # the server's own failure still ends the run, as Kaggle's would
            run = KernelRun("error", 0.0, "", root / "working", self.isolate, f"the server could not run it: {exc}")
        root.mkdir(parents=True, exist_ok=True)
        (root / RUN_RECORD).write_text(json.dumps({
            "status": run.status, "seconds": run.seconds, "isolated": run.isolated, "confined": run.confined,
            "failure": run.failure,
            "outputs": run.outputs, "inputs": {name: str(path) for name, path in inputs.items()}}, indent=2) + "\n")
        return run

    def version(self, owner: str, slug: str, number: int | None = None) -> KernelVersion:
        with self._lock:
            versions = self._kernels.get(f"{owner}/{slug}", [])
        if not versions:
            raise CompetitionError(404, f"Kernel {owner}/{slug} not found")
        if number is None:
            return versions[-1]
        if not 1 <= number <= len(versions):
            raise CompetitionError(404, f"Kernel {owner}/{slug} has no version {number} (it has {len(versions)})")
        return versions[number - 1]

    def output_file(self, owner: str, slug: str, number: int, name: str) -> Path | None:
        version = self.version(owner, slug, number)
        path = version.folder / "run" / "working" / name
        return path if version.run and name in version.run.outputs and path.is_file() else None

    # -- code submissions -----------------------------------------------------------------------------------

    def submit_code(self, competition: str, kernel: str, number: int | None, file_name: str, description: str):
        """A code submission of kernel version `number` (None: the newest): rerun on the hidden test set, scored."""
        owner, slug = _split_ref(kernel, "the kernel")
        file_name = file_name or SUBMISSION_FILE
        version = self.version(owner, slug, int(number) if number else None)
        if version.settings["enable_internet"]:
            raise CompetitionError(400, f"{kernel} version {version.number} has internet access enabled; a code "
                                        "competition accepts only kernels that run without it")
        if competition not in version.settings["competitions"]:
            raise CompetitionError(400, f"{kernel} version {version.number} does not have {competition!r} as a "
                                        "competition source")
        if version.status != COMPLETE or not self.output_file(owner, slug, version.number, file_name):
            raise CompetitionError(400, f"{kernel} version {version.number} is {version.status} and has no output "
                                        f"file {file_name!r}: only a version that ran to completion and wrote it "
                                        "can be submitted")
        try:
            test_input, solution = hidden_input(self.competitions.check_access(competition),
                                                self.competitions.solution_path(competition),
                                                self.log_dir / "inputs" / competition)
        except HiddenTestError as exc:
            raise CompetitionError(400, f"the local server cannot rerun {kernel} on a hidden test set: {exc}") from None
        inputs = {**{n: Path(p) for n, p in version.settings["inputs"].items()}, competition: test_input}

        def rerun() -> Path:
            root = version.folder / f"submission-{uuid.uuid4().hex[:8]}"
            run = self._sandbox(version.folder / "script.py", inputs, root)
            if run.failure:
                raise CompetitionError(400, f"the kernel failed on the hidden test set: {run.failure}")
            path = run.working / file_name
            if not path.is_file():
                raise CompetitionError(400, f"the kernel wrote no {file_name} on the hidden test set")
            return path

        return self.competitions.create_code_submission(competition, kernel, file_name, description, rerun, solution)

    def wait(self) -> None:
        """Block until every kernel run started so far has ended (for shutdown and tests)."""
        for thread in list(self._threads):
            thread.join()

"""A code competition, end to end: the bundle pushed as a dataset, the kernel pushed and run, its version
submitted (`kp kernel push`, `kp kernel status`, and `kp submit --upload` when `competition.submission: code`).

Recipe: `kp package` of the source (reused when it holds the source's current result) -> its
`dataset-metadata.json`, and the bundle pushed as dataset USER/`kernel.dataset` (created, else a new
version; each folder goes up as one zip, which Kaggle decompresses; not again when the last push
uploaded the same bundle there), waited for until ready -> the
kernel folder `work/COMP/package/kernel/` (kernel.py, or kernel.ipynb for `kernel.kind: notebook`, and kernel-metadata.json with `enable_internet:
false` always, since the client turns it on when the key is missing; the competition and the dataset
as sources; `enable_gpu` from config) pushed as a new version, which Kaggle runs on the public test
set -> polled until it ends (`kernel.poll_timeout_s`, every `kernel.poll_every_s`) -> a failure is one
error with Kaggle's message and the end of the kernel's log; a success has its output downloaded to
`work/COMP/package/output/`. `push.json` records the kernel, its version, the source's fingerprint
and how the run ended. A code submission submits the recorded version when it runs the current
source and ran to completion (else it pushes first); Kaggle reruns it on the hidden test set and
scores its `submission.csv`.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.core.artifacts import (KERNEL_DIR, KERNEL_NOTEBOOK, KERNEL_OUTPUT_DIR, KERNEL_SCRIPT, PACKAGE_DIR,
                                     PUSH_RECORD, SUBMISSION_FILE)
from pipeline.core.cache import Manifest, write_text_atomic
from pipeline.core.errors import PipelineError
from pipeline.core.ownership import add_to_record, check_replaceable
from pipeline.kaggle import kernel_api
from pipeline.kaggle.api import Network

if TYPE_CHECKING:
    from pipeline.engine.config import ResolvedConfig

LOG_TAIL_LINES = 20


def _network(config: ResolvedConfig) -> Network:
    return Network.of(config.kaggle)


def _record_path(config: ResolvedConfig) -> Path:
    return config.work_dir / PACKAGE_DIR / PUSH_RECORD


def read_push(config: ResolvedConfig) -> dict | None:
    """What `kp kernel push` recorded last, or None."""
    path = _record_path(config)
    return json.loads(path.read_text()) if path.is_file() else None


def _write_push(config: ResolvedConfig, record: dict) -> None:
    write_text_atomic(_record_path(config), json.dumps(record, indent=2) + "\n")


def push(config: ResolvedConfig, source: str, say=print, force: bool = False) -> dict:
    """Push `source`'s bundle and kernel, wait for the kernel's run, download its output.

    Args:
        config: the competition's resolved config (its source stage already up to date).
        source: the predicting stage the kernel reproduces.
        say: prints a line.
        force: replace the package's bundle, kernel and output folders even where a person added to or
            edited them (`pipeline.core.ownership`); push a bundle whose estimated time is over
            `kernel.time_limit_s`.

    Returns:
        The push record (`push.json`): kernel, version, dataset, source, fingerprint, status, output files.

    Raises:
        PipelineError: a push refused, or a run that failed (Kaggle's message and the end of its log).
    """
    from pipeline.shipping.kernel_time import check_within_limit
    from pipeline.shipping.packaging import current_bundle, kernel_notebook, kernel_script, package, package_store

    settings, network = config.section("kernel"), _network(config)
    dataset_slug, kernel_slug = settings.names(config.comp)
    bundle, record = (current_bundle(config, source, settings.wheels)
                      or package(config, source, settings.wheels, say, force))
    check_within_limit(record, settings, force)
    store = package_store(config)
    check_replaceable(store.path(KERNEL_DIR), "kp writes the kernel folder whole: move them out of it (edit the "
                      "kernel in kp, or push your own with the kaggle client), or pass --force", force)
    user = kernel_api.user(network)
    dataset, kernel = f"{user}/{dataset_slug}", f"{user}/{kernel_slug}"
    contents = {"dataset": dataset, "source": source, "fingerprint": record["fingerprints"][source],
                "wheels": settings.wheels}
    previous = read_push(config) or {}
    if all(previous.get(key) == value for key, value in contents.items()):
        say(f"dataset {dataset} already holds this bundle (pushed {previous['pushed']}): not uploaded again")
    else:
        (bundle / kernel_api.DATASET_METADATA).write_text(json.dumps(
            {"title": dataset_slug, "id": dataset, "licenses": [{"name": "CC0-1.0"}]}, indent=2) + "\n")
        add_to_record(bundle, kernel_api.DATASET_METADATA)
        note = f"kp {config.comp} {source} fp={record['fingerprints'][source][:12]}"
        how = kernel_api.push_dataset(bundle, dataset, note, network)
        say(f"dataset {dataset} {how} from {bundle} ({record['size_bytes'] / 1e6:.1f} MB)")
        kernel_api.wait_for_dataset(dataset, settings.poll_timeout_s, config.kaggle.poll_every_s, say, network)

    code_file = KERNEL_SCRIPT if settings.kind == "script" else KERNEL_NOTEBOOK
    script = kernel_script(config)
    with store.write(KERNEL_DIR) as folder:
        (folder / code_file).write_text(script if settings.kind == "script" else kernel_notebook(script))
        (folder / kernel_api.KERNEL_METADATA).write_text(json.dumps({
            "id": kernel, "title": kernel_slug, "code_file": code_file, "language": "python",
            "kernel_type": settings.kind, "is_private": True, "enable_gpu": settings.enable_gpu,
            "enable_internet": False, "dataset_sources": [dataset], "competition_sources": [config.competition.slug],
            "kernel_sources": [], "model_sources": []}, indent=2) + "\n")
    version = kernel_api.push_kernel(store.path(KERNEL_DIR), network)
    say(f"kernel {kernel} version {version} pushed (no internet{', GPU' if settings.enable_gpu else ''}); "
        f"waiting up to {settings.poll_timeout_s:g}s for its run")
    pushed = {"kernel": kernel, "version": version, **contents, "bundle_bytes": record["size_bytes"],
              "pushed": datetime.now(timezone.utc).isoformat(timespec="seconds"), "status": kernel_api.QUEUED}
    _write_push(config, pushed)
    return follow(config, pushed, wait=True, say=say, force=force)


def follow(config: ResolvedConfig, pushed: dict, wait: bool, say=print, force: bool = False) -> dict:
    """The pushed kernel's state now (`wait`: once its run has ended or `kernel.poll_timeout_s` has passed),
    recorded in `push.json`; its output downloaded once complete (into `package/output/`, replaced whole;
    `force`: even where a person added to it).

    Raises:
        PipelineError: the run failed: Kaggle's message and the end of the kernel's log.
    """
    from pipeline.shipping.packaging import package_store

    settings, network = config.section("kernel"), _network(config)
    kernel = pushed["kernel"]
    if wait:
        state = kernel_api.wait_for_kernel(kernel, settings.poll_timeout_s, settings.poll_every_s, say, network)
    else:
        state = kernel_api.kernel_state(kernel, network)
    pushed = {**pushed, "status": state.status, "failure": state.failure}
    if state.ended:
        store = package_store(config)
        check_replaceable(store.path(KERNEL_OUTPUT_DIR), "kp replaces the kernel's downloaded output whole: move "
                          "them out of it, or pass --force", force)
        with store.write(KERNEL_OUTPUT_DIR) as written:
            files, log = kernel_api.kernel_output(kernel, written, network)
        out = store.path(KERNEL_OUTPUT_DIR)
        log = out / log.name
        pushed["outputs"] = sorted(p.name for p in files)
        if state.status == kernel_api.COMPLETE and SUBMISSION_FILE not in pushed["outputs"]:
            pushed = {**pushed, "status": kernel_api.ERROR, "failure": f"the run wrote no {SUBMISSION_FILE}"}
        _write_push(config, pushed)
        if pushed["status"] != kernel_api.COMPLETE:
            tail = "\n".join(log.read_text().rstrip().splitlines()[-LOG_TAIL_LINES:]) if log.is_file() else ""
            raise PipelineError(f"kernel {kernel} version {pushed['version']} failed: "
                                f"{pushed['failure'] or pushed['status']}" +
                                (f"\nthe end of its log ({log}):\n{tail}" if tail else ""))
        say(f"kernel {kernel} version {pushed['version']}: complete; its output is in {out}")
    else:
        _write_push(config, pushed)
        say(f"kernel {kernel} version {pushed['version']}: {state.status}"
            + (f" after {settings.poll_timeout_s:g}s; `kp kernel status --comp {config.comp} --wait` waits again"
               if wait else ""))
    return pushed


def submit(config: ResolvedConfig, source: str, description: str, say=print) -> tuple[int, str]:
    """Submit the kernel that runs `source`'s current result (pushed first unless `push.json` says it ran to
    completion); (the submission's ref, `USER/KERNEL vN`)."""
    manifest = Manifest.read(config.work_dir / source)
    pushed = read_push(config)
    if not (pushed and manifest and pushed["source"] == source and pushed["fingerprint"] == manifest.fingerprint
            and pushed["status"] == kernel_api.COMPLETE):
        say(f"no kernel of {source}'s current result has run to completion yet: pushing it first")
        pushed = push(config, source, say)
    ref = kernel_api.submit_code(config.competition.slug, pushed["kernel"], pushed["version"], SUBMISSION_FILE,
                                 description, _network(config))
    return ref, f"{pushed['kernel']} v{pushed['version']}"

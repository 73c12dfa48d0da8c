"""Uploading the written submission to Kaggle and reading its public score back (`kp submit --upload`).

Recipe: take the file the up-to-date `submit` stage wrote (its manifest names it, with the config
fingerprint, split strategy and validation score) -> upload it through the kaggle client with a
description that carries the fingerprint (a code competition, `competition.submission: code`:
submit the kernel that runs the same source instead, `pipeline.shipping.code_submission`) -> record a `pending`
row in the ledger at once, of kind `csv` or `code` (an upload spends one of the day's submissions,
so it is never forgotten) -> poll, bounded by `kaggle.poll_timeout_s` (`kernel.poll_timeout_s` for
a code submission, which Kaggle reruns first) -> complete the row with the public score, or with
Kaggle's reason for rejecting it. The CSV stays on disk whatever happens; a score that was not
ready in time is read later by `kp ledger --refresh`.
"""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from pipeline.core.artifacts import LEDGER_PLOT, RAW_DIR
from pipeline.core.cache import Manifest
from pipeline.core.config_reader import ConfigReader
from pipeline.core.errors import PipelineError
from pipeline.kaggle import submissions
from pipeline.kaggle.api import Network
from pipeline.kaggle.ledger import ERROR, PENDING, ledger_path, plot_ledger, read_ledger, record, with_score


def describe(comp: str, meta: dict, message: str | None) -> str:
    """The submission description Kaggle shows: the user's message, then what produced the file."""
    produced = (f"kp {comp} {meta['source']} split={meta['split_strategy']} "
                f"{meta['score_name']}={meta[meta['score_name']]:.4f} fp={meta['fingerprint'][:12]}")
    return f"{message} [{produced}]" if message else produced


def upload(config: ConfigReader, message: str | None = None, again: bool = False, say=print,
           submit_kernel=None) -> dict:
    """Upload the current submission of `config`'s competition; its ledger row, completed if scored.

    `submit_kernel(config, source, description, say)` submits a code competition's kernel instead
    (`pipeline.shipping.code_submission.submit`: it pushes one first when needed), returning (ref, what was submitted).
    """
    manifest = Manifest.read(config.work_dir / "submit")
    if manifest is None:
        raise PipelineError(f"{config.work_dir / 'submit'}: no submission written yet (run `kp submit` first)")
    meta = manifest.metrics
    code = config.competition.submission == "code"
    path, ledger = config.submissions_dir / Path(meta["file"]).name, ledger_path(config)
    if not code and not path.is_file():
        raise PipelineError(f"{path}: the submission file named by the submit stage's manifest is gone; "
                            "rerun `kp submit --force`")
    earlier = [r for r in read_ledger(ledger) if r["fingerprint"] == meta["fingerprint"] and r["status"] != ERROR]
    if earlier and not again:
        say(f"{Path(earlier[-1]['file']).name} was already uploaded on {earlier[-1]['time']} (ref {earlier[-1]['ref']}, "
            f"{earlier[-1]['status']}); not spending another submission on it (--force uploads it again)")
        return earlier[-1]

    slug, description = config.competition.slug, describe(config.comp, meta, message)
    network = Network.of(config.kaggle)
    if not code:
        _check_rows(config, path)
    if code:
        if submit_kernel is None:
            raise PipelineError(f"{config.comp} is a code competition (competition.submission: code): its kernel is "
                                "submitted, not the file")
        ref, submitted = submit_kernel(config, meta["source"], description, say)
        timeout_s, every_s = config.get("kernel.poll_timeout_s"), config.get("kernel.poll_every_s")
    else:
        try:
            ref = submissions.submit_file(slug, path, description, network)
        except PipelineError as exc:
            raise PipelineError(f"{exc}; the submission stays at {path}") from None
        submitted, timeout_s, every_s = str(path), config.get("kaggle.poll_timeout_s"), config.get("kaggle.poll_every_s")
    row = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "file": submitted,
           "kind": "code" if code else "csv", "fingerprint": meta["fingerprint"],
           "split_strategy": meta["split_strategy"], "validation": meta.get("validation", "holdout"),
           "metric": meta["metric"], "val_score": f"{meta[meta['score_name']]:.5f}", "status": PENDING, "ref": ref,
           "description": description}
    record(ledger, row)
    say(f"{f'submitted kernel {submitted}' if code else f'uploaded {path.name}'} to {slug} (submission {ref}); "
        f"waiting up to {timeout_s:g}s for its score")
    state = submissions.wait_for_score(slug, ref, timeout_s, every_s, say, network)
    row = _complete(config, row, state)
    if row["status"] == ERROR:
        kept = "" if code else "The file stays on disk; "
        raise PipelineError(f"Kaggle rejected submission {ref} ({submitted}): {state.error}. "
                            f"{kept}the ledger {ledger} records the rejection")
    if row["status"] == PENDING:
        say(f"submission {ref} is not scored after {timeout_s:g}s; "
            f"`kp ledger --comp {config.comp} --refresh` reads its score later")
    else:
        say(f"leaderboard {meta['metric']} {row['lb_score']} vs validation {row['val_score']} "
            f"(difference {row['difference']})")
    return row


def _check_rows(config: ConfigReader, path: Path) -> None:
    """The file to upload has one row per row of the competition's sample submission (checked before a
    submission is spent on it: Kaggle would reject it, counting it against the day's limit)."""
    import gzip

    sample = config.work_dir / "download" / RAW_DIR / config.get("download.sample_submission")
    if not sample.is_file():
        return
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as handle:
        rows = sum(1 for line in handle if line.strip()) - 1
    with open(sample, encoding="utf-8", errors="replace") as handle:
        expected = sum(1 for line in handle if line.strip()) - 1
    if rows != expected:
        raise PipelineError(f"{path}: {rows:,} rows, while {sample.name} asks for {expected:,}; not uploaded (rerun "
                            "kp submit --force to write it again)")


def refresh(config: ConfigReader, say=print) -> list[dict]:
    """Ask Kaggle again about every pending row of the ledger; the rows that changed."""
    changed = []
    for row in read_ledger(ledger_path(config)):
        if row["status"] == PENDING:
            state = submissions.submission_state(config.competition.slug, int(row["ref"]), Network.of(config.kaggle))
            if state.status != PENDING:
                changed.append(_complete(config, row, state))
                say(f"submission {row['ref']}: {changed[-1]['status']} {changed[-1]['lb_score'] or state.error}")
    return changed


def draw(config: ConfigReader) -> Path:
    """ledger.png beside ledger.csv."""
    path = ledger_path(config).with_name(LEDGER_PLOT)
    plot_ledger(read_ledger(ledger_path(config)), path, f"{config.comp}: validation vs leaderboard")
    return path


def _complete(config: ConfigReader, row: dict, state: submissions.SubmissionState) -> dict:
    done = with_score(row, state.status, state.public_score, state.error)
    record(ledger_path(config), done)
    if done["status"] != PENDING:
        draw(config)
    return done

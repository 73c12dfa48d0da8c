"""submit: write the submission file exactly as sample_submission.csv asks, and score it on valid.

Recipe: read the test probabilities of `submit.source` (a stage that writes predictions) -> put
them in sample_submission.csv's id order (ids the model never saw, e.g. skipped undecodable
images, get the training class frequencies, with a warning) -> shape them for the metric (binary:
P(positive class); multi-class: one column per class; accuracy: the argmax label) -> clip to
`competition.clip` (and renormalise rows if asked) -> validate (ids, order, columns, row count,
no NaN, probabilities in [0, 1], rows summing to 1 where asked) -> write `submission.csv` here and
`submissions/COMP/NAME.csv[.gz]` with `NAME.json` (fingerprint, validation score) beside it.
The validation score is computed with the same clipping as the file.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from pydantic import Field, field_validator

from pipeline.core.artifacts import (INDEX_FILE, LEDGER_FILE, LEDGER_PLOT, RAW_DIR, SUBMISSION_FILE, SUBMISSION_META,
                                     file_name_problem)
from pipeline.core.cache import write_bytes_atomic
from pipeline.core.errors import PipelineError
from pipeline.core.readers import read_json, read_table
from pipeline.core.settings import StrictModel
from pipeline.core.stage import Stage, StageContext



SUBMISSIONS_ARTIFACTS = (LEDGER_FILE, LEDGER_PLOT)  # what else lives in submissions/COMP/


class Settings(StrictModel):
    """The `submit` section: the submission file."""

    source: str = Field("finetune", description=(
        "the predicting stage whose test predictions are submitted: finetune | bnretrain | tune | ensemble | cv | "
        "smooth | pseudo | blend"))
    name: str = Field("{comp}-{source}-{fingerprint}", description=(
        "file name without extension ({comp}, {source}, {fingerprint})"))
    gzip: bool = Field(False, description="write NAME.csv.gz instead of NAME.csv")
    renormalize: bool = Field(False, description=(
        "multi-class: rescale clipped rows to sum to 1 (Kaggle renormalises anyway)"))

    @field_validator("name")
    @classmethod
    def _known_placeholders(cls, name: str) -> str:
        try:
            name.format(comp="c", source="s", fingerprint="f")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"may use only {{comp}}, {{source}} and {{fingerprint}} ({exc!r})") from None
        problem = file_name_problem(name, room=len("-12345678.csv.gz"))  # a {fingerprint} and the extension
        if problem:
            raise ValueError(f"must be a plain file name: {problem}")
        taken = taken_by(name)
        if taken:
            raise ValueError(f"{name!r} would write over {taken} beside the submissions: choose another name")
        return name


def taken_by(name: str) -> str | None:
    """The artifact of `submissions/COMP/` that a submission called `name` (`NAME.csv[.gz]`, `NAME.json`)
    would overwrite (the ledger, its plot), or None."""
    ours = {f"{name}.csv", f"{name}.csv.gz", f"{name}.json", f"{name}.png"}
    for artifact in SUBMISSIONS_ARTIFACTS:
        if artifact in ours or Path(artifact).stem == name:
            return artifact
    return None


def run(ctx: StageContext) -> dict:
    from pipeline.evaluation.metrics import evaluate, score_for
    from pipeline.evaluation.predictions import load_predictions, validation_kind
    from pipeline.evaluation.submission import in_sample_order, submission_frame, validate_submission

    s, competition = ctx.settings, ctx.config.competition
    predictions = load_predictions(ctx.input(s.source))
    sample_path = ctx.input("download") / RAW_DIR / ctx.config.get("download.sample_submission")
    sample = read_table(sample_path, dtype={competition.id_column: str}, keep_default_na=False)
    if list(sample.columns) != competition.submission_columns:
        raise PipelineError(f"{sample_path}: columns {list(sample.columns)}, expected "
                            f"competition.submission_columns {competition.submission_columns}")

    sample_ids = sample[competition.id_column].tolist()
    test_probs, missing = in_sample_order(sample_ids, predictions.test_ids, predictions.test_probs,
                                          fallback=_class_frequencies(ctx))
    if missing:
        ctx.warn(f"{len(missing)} test ids have no prediction (first: {missing[:3]}); "
                 "they get the training class frequencies")
    frame = submission_frame(sample_ids, test_probs, competition, s.renormalize)
    validate_submission(frame, sample, competition, s.renormalize)

    scores = evaluate(predictions.valid_labels, predictions.valid_probs, competition, clip=True,
                      renormalize=s.renormalize)
    (ctx.out / SUBMISSION_FILE).write_text(frame.to_csv(index=False, float_format="%.6g"))
    fingerprint = ctx.config_fingerprint
    name = s.name.format(comp=ctx.comp, source=s.source, fingerprint=fingerprint[:8])
    if taken_by(name):  # a template that names the ledger only once filled in (a competition called `ledger`)
        raise PipelineError(f"submit.name {s.name!r} gives {name!r}, which would write over {taken_by(name)} in "
                            f"{ctx.config.submissions_dir}: choose another submit.name")
    meta = {
        "file": str(ctx.config.submissions_dir / (name + (".csv.gz" if s.gzip else ".csv"))),
        "fingerprint": fingerprint,
        "source": s.source,
        "split_strategy": ctx.config.get("split.strategy"),
        "validation": validation_kind(ctx.input(s.source)),
        "metric": competition.metric,
        "score_name": score_for(competition.metric).submitted,
        **scores,
        "clip": list(competition.clip),
        "rows": len(frame),
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    (ctx.out / SUBMISSION_META).write_text(json.dumps(meta, indent=2) + "\n")
    publish(ctx)
    ctx.log(f"submission: {meta['file']} (validation {meta['score_name']} {meta[meta['score_name']]:.4f})")
    return meta


def publish(ctx: StageContext) -> None:
    """Copy the run's submission (and its metadata) to `submissions/COMP/NAME.csv[.gz]` + `NAME.json`;
    also what restoring a stored submit run does, so the file there is always the current one's."""
    meta = read_json(ctx.out / SUBMISSION_META)
    target = ctx.config.submissions_dir / Path(meta["file"]).name
    record = target.with_name(target.name.split(".csv")[0] + ".json")
    if target.exists() and not _published_by_kp(target, record):
        raise PipelineError(f"{target}: kp did not write it (no {record.name} of kp's beside it): kp replaces only "
                            "what it made; move it, or choose another submit.name")
    data = (ctx.out / SUBMISSION_FILE).read_bytes()
    if target.name.endswith(".gz"):
        import gzip

        data = gzip.compress(data, mtime=0)
    write_bytes_atomic(target, data)
    write_bytes_atomic(record, (json.dumps(meta, indent=2) + "\n").encode())


def _published_by_kp(target: Path, record: Path) -> bool:
    """Whether `target` is a submission kp published: its record beside it names it."""
    try:
        return Path(read_json(record).get("file", "")).name == target.name
    except (OSError, PipelineError):
        return False


def _class_frequencies(ctx: StageContext):
    import numpy as np

    from pipeline.data.features import label_indices
    from pipeline.data.index import read_index

    index = read_index(ctx.input("download") / INDEX_FILE)
    classes = ctx.config.competition.classes
    labels = label_indices(index.label[index.subset == "train"], classes)
    return np.bincount(labels, minlength=len(classes)) / len(labels)


def _headline(m: dict) -> str:
    clipped = " (clipped as submitted)" if m.get("clip") and m["metric"] == "log_loss" else ""  # accuracy takes no clip
    return f"{m['metric']} on valid {m[m['score_name']]:.4f}{clipped} -> {m['file']}"


STAGE = Stage(
    name="submit",
    settings=Settings,
    run=run,
    needs=("download",),
    extra_needs=lambda config: (config.get("submit.source"),),
    reads=("competition", "download.sample_submission", "split.strategy", "paths.submissions"),
    outs=(SUBMISSION_FILE, SUBMISSION_META),
    headline=_headline,
    restore=publish,
    reads_predictions=lambda s: {"submit.source": s.source},
    submits=True,
)

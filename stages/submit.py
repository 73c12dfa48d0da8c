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
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import field_validator

from pipeline.cache import write_bytes_atomic
from pipeline.dataset_index import INDEX_FILE, read_index
from pipeline.errors import PipelineError
from pipeline.features import label_indices
from pipeline.metrics import clip_probabilities, competition_score
from pipeline.predictions import load_predictions
from pipeline.stage import Stage, StageContext, StrictModel
from pipeline.submission import in_sample_order, submission_frame, validate_submission

SUBMISSION_FILE = "submission.csv"


class Settings(StrictModel):
    source: Literal["finetune", "ensemble"]
    name: str
    gzip: bool
    renormalize: bool

    @field_validator("name")
    @classmethod
    def _known_placeholders(cls, name: str) -> str:
        try:
            name.format(comp="c", source="s", fingerprint="f")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"may use only {{comp}}, {{source}} and {{fingerprint}} ({exc!r})") from None
        if "/" in name or not name.strip():
            raise ValueError("must be a plain file name without '/'")
        return name


def run(ctx: StageContext) -> dict:
    s, competition = ctx.settings, ctx.config.competition
    predictions = load_predictions(ctx.input(s.source))
    sample_path = ctx.input("download") / "raw" / ctx.config.get("data.sample_submission")
    sample = pd.read_csv(sample_path, dtype={competition.id_column: str}, keep_default_na=False)
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

    valid_probs = clip_probabilities(predictions.valid_probs, *competition.clip, renormalize=s.renormalize)
    val_score = competition_score(competition.task, competition.metric, predictions.valid_labels, valid_probs)
    unclipped = competition_score(competition.task, competition.metric, predictions.valid_labels,
                                  predictions.valid_probs)

    text = frame.to_csv(index=False, float_format="%.6g")
    (ctx.out / SUBMISSION_FILE).write_text(text)
    fingerprint = ctx.config_fingerprint
    name = s.name.format(comp=ctx.comp, source=s.source, fingerprint=fingerprint[:8])
    target = ctx.config.submissions_dir / (name + (".csv.gz" if s.gzip else ".csv"))
    write_bytes_atomic(target, _encode(text, s.gzip))
    meta = {
        "file": str(target),
        "fingerprint": fingerprint,
        "source": s.source,
        "split_strategy": ctx.config.get("split.strategy"),
        "metric": competition.metric,
        "val_score": round(val_score, 5),
        "val_score_unclipped": round(unclipped, 5),
        "clip": list(competition.clip),
        "rows": len(frame),
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_bytes_atomic(target.with_name(name + ".json"), (json.dumps(meta, indent=2) + "\n").encode())
    ctx.log(f"submission: {target} (validation {competition.metric} {val_score:.4f})")
    return meta


def _class_frequencies(ctx: StageContext) -> np.ndarray:
    index = read_index(ctx.input("download") / INDEX_FILE)
    classes = ctx.config.competition.classes
    labels = label_indices(index.label[index.subset == "train"], classes)
    return np.bincount(labels, minlength=len(classes)) / len(labels)


def _encode(text: str, compress: bool) -> bytes:
    import gzip

    data = text.encode()
    return gzip.compress(data, mtime=0) if compress else data


def _headline(m: dict) -> str:
    return f"{m['metric']} on valid {m['val_score']:.4f} (clipped) -> {m['file']}"


STAGE = Stage(
    name="submit",
    settings=Settings,
    run=run,
    needs=("download",),
    extra_needs=lambda config: (config.get("submit.source"),),
    reads=("competition", "data.sample_submission", "split.strategy"),
    version=1,
    headline=_headline,
)

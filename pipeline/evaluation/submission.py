"""Building and checking a submission table exactly as sample_submission.csv asks.

`submission_frame` puts test probabilities in the sample's id order and shape for the metric
(binary: P(positive class) in the one value column; multi-class: one column per class; accuracy:
the argmax label), clipped to `competition.clip`. `validate_submission` checks the result against
the sample before anything is written: columns, row count, ids and their order, no NaN,
probabilities in [0, 1], rows summing to 1 where asked.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.core.errors import PipelineError
from pipeline.evaluation.metrics import clip_probabilities


def in_sample_order(sample_ids: list[str], test_ids: list[str], test_probs: np.ndarray,
                    fallback: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Rows of `test_probs` reordered to `sample_ids`; ids without a prediction get `fallback`.
    Returns the probabilities and the ids that had none."""
    position = {test_id: i for i, test_id in enumerate(test_ids)}
    missing = [i for i in sample_ids if i not in position]
    probs = np.empty((len(sample_ids), test_probs.shape[1]))
    for row, test_id in enumerate(sample_ids):
        probs[row] = test_probs[position[test_id]] if test_id in position else fallback
    return probs, missing


def submission_frame(sample_ids: list[str], probs: np.ndarray, competition, renormalize: bool) -> pd.DataFrame:
    id_column, columns = competition.id_column, competition.submission_columns
    frame = pd.DataFrame({id_column: sample_ids})
    if competition.metric == "accuracy":
        frame[columns[1]] = np.array(competition.classes)[np.argmax(probs, axis=1)]
    elif competition.task == "binary":
        frame[columns[1]] = clip_probabilities(probs[:, 1], *competition.clip)
    else:
        if columns[1:] != competition.classes:
            raise PipelineError(f"competition.submission_columns {columns[1:]} must list competition.classes "
                                f"{competition.classes} in order for a multi-class log loss submission")
        clipped = clip_probabilities(probs, *competition.clip, renormalize=renormalize)
        for k, name in enumerate(competition.classes):
            frame[name] = clipped[:, k]
    return frame


def validate_submission(frame: pd.DataFrame, sample: pd.DataFrame, competition, renormalize: bool) -> None:
    problems = []
    if list(frame.columns) != list(sample.columns):
        problems.append(f"columns {list(frame.columns)} != sample's {list(sample.columns)}")
    if len(frame) != len(sample):
        problems.append(f"{len(frame)} rows, the sample has {len(sample)}")
    elif not (frame.iloc[:, 0].astype(str).values == sample.iloc[:, 0].astype(str).values).all():
        problems.append("ids differ from the sample's ids or their order")
    values = frame.iloc[:, 1:]
    if values.isna().any().any():
        problems.append(f"{int(values.isna().any(axis=1).sum())} rows with NaN")
    elif competition.metric == "log_loss":
        numbers = values.to_numpy(dtype=np.float64)
        if (numbers < 0).any() or (numbers > 1).any():
            problems.append("probabilities outside [0, 1]")
        if renormalize and competition.task == "multiclass" and not np.allclose(numbers.sum(axis=1), 1, atol=1e-6):
            problems.append("rows do not sum to 1")
    if problems:
        raise PipelineError("submission failed validation, nothing written: " + "; ".join(problems))

"""Scoring a submission file against hidden labels, as Kaggle's server does.

Only a scoring server or a benchmark may call this with a `solution.csv`; no stage ever reads one.
The solution's first column is the id, its second the true label (`label` 0/1 for a binary task,
a class name such as `c3` for multi-class, a digit for accuracy). Submissions are matched by id,
in any order; a missing, extra or duplicate id, or a NaN, is an error, as on Kaggle.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.core.artifacts import SOLUTION_FILE
from pipeline.core.competition import Competition
from pipeline.core.config_reader import ConfigReader
from pipeline.core.errors import PipelineError
from pipeline.core.readers import read_table
from pipeline.data.features import label_indices
from pipeline.evaluation.metrics import accuracy, binary_log_loss, multiclass_log_loss


def competition_from_files(sample: pd.DataFrame, solution: pd.DataFrame) -> Competition:
    """What a scoring server that holds only the sample submission and the solution can tell:
    one column per class -> multi-class log loss; one value column of fractions (the sample's
    0.5) -> binary log loss of P(label 1); one column of whole labels -> accuracy."""
    columns = [str(c) for c in sample.columns]
    if len(columns) > 2:
        return Competition.for_scoring(columns[0], columns, "log_loss", "multiclass", columns[1:])
    values = pd.to_numeric(sample.iloc[:, 1], errors="coerce")
    classes = sorted(solution.iloc[:, 1].astype(str).unique())
    if values.notna().all() and (values % 1 != 0).any():
        return Competition.for_scoring(columns[0], columns, "log_loss", "binary", ["0", "1"])
    return Competition.for_scoring(columns[0], columns, "accuracy", "multiclass", classes)


def solution_file(config: ConfigReader) -> Path:
    """Where a competition's hidden labels are: beside its local SLUG.zip (../shared/data layout), or
    written by the embedded digits source. For scoring servers and benchmarks only."""
    if config.get("download.source") == "sklearn-digits":
        return config.work_dir / "download" / SOLUTION_FILE
    source = config.path(config.get("download.source"))
    path = (source.parent if source.is_file() else source) / SOLUTION_FILE
    if not path.is_file():
        raise PipelineError(f"{path}: no solution.csv beside download.source (needs a local copy of the competition)")
    return path


def read_submission(path: Path) -> pd.DataFrame:
    try:
        return read_table(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise PipelineError(f"{path}: cannot read as CSV ({exc})") from None


def score_file_on_test_set(config: ConfigReader, submission_path: Path, solution_path: Path | None = None
                           ) -> tuple[float, float | None]:
    """A submission file scored on the competition's hidden labels (`solution_path`, default
    `solution_file(config)`): (the leaderboard metric, the accuracy of its probabilities, or None
    when the metric is accuracy already)."""
    solution = read_table(solution_path or solution_file(config), dtype=str)
    submission = read_submission(Path(submission_path))
    return (score_submission(submission, solution, config.competition),
            score_accuracy_of_probabilities(submission, solution, config.competition))


def score_submission(submission: pd.DataFrame, solution: pd.DataFrame, competition) -> float:
    """The competition's metric for `submission` (as submitted: strings) against `solution`."""
    id_column = competition.id_column
    if list(submission.columns) != competition.submission_columns:
        raise PipelineError(f"wrong header: expected {','.join(competition.submission_columns)}, "
                            f"got {','.join(submission.columns)}")
    ids = submission[id_column]
    if ids.duplicated().any():
        raise PipelineError(f"duplicate ids, e.g. {ids[ids.duplicated()].iloc[0]!r}")
    truth = _labels_by_id(solution)
    missing, extra = sorted(set(truth.index) - set(ids)), sorted(set(ids) - set(truth.index))
    if missing or extra:
        parts = [f"{len(found)} {what} (e.g. {found[:2]})" for what, found in (("missing", missing),
                                                                              ("unexpected", extra)) if found]
        raise PipelineError(f"ids do not match the test set: {', '.join(parts)}")
    labels = truth.loc[ids].to_numpy()
    values = submission.iloc[:, 1:]
    if competition.metric == "accuracy":
        return float(np.mean(values.iloc[:, 0].to_numpy() == labels))
    numbers = values.apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    if np.isnan(numbers).any():
        raise PipelineError(f"{int(np.isnan(numbers).any(axis=1).sum())} rows have missing or non-numeric values")
    if competition.task == "binary":
        return binary_log_loss(labels.astype(int) == 1, numbers[:, 0])
    return multiclass_log_loss(label_indices(labels, competition.classes), numbers)


def score_accuracy_of_probabilities(submission: pd.DataFrame, solution: pd.DataFrame, competition) -> float | None:
    """For multi-class or binary probability files, the share of rows whose top class is right."""
    if competition.metric == "accuracy":
        return None
    truth = _labels_by_id(solution)
    labels = truth.loc[submission[competition.id_column]].to_numpy()
    numbers = submission.iloc[:, 1:].astype(float).to_numpy()
    if competition.task == "binary":
        return float(np.mean((numbers[:, 0] > 0.5) == (labels.astype(int) == 1)))
    return accuracy(label_indices(labels, competition.classes), numbers)


def _labels_by_id(solution: pd.DataFrame) -> pd.Series:
    """The solution's label column (its second) as strings, indexed by its id column (its first) as strings."""
    truth = solution.set_index(solution.columns[0])[solution.columns[1]].astype(str)
    truth.index = truth.index.astype(str)
    return truth

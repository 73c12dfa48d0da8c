"""Class probabilities on the validation and test rows: what finetune and ensemble write, submit reads.

A predictions folder holds `valid_probs.npy` (n_valid, k) with `valid_rows.csv` (id, label) and
`test_probs.npy` (n_test, k) with `test_rows.csv` (id), rows aligned. Every producer writes it
through `save_predictions`, every consumer reads it through `load_predictions`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.core.artifacts import FOLD_TEST_FILE, PREDICTION_FILES, probs_file, rows_file
from pipeline.core.errors import PipelineError
from pipeline.core.readers import read_table
from pipeline.data.arrays import load_array


@dataclass
class Predictions:
    valid_ids: list[str]
    valid_labels: np.ndarray  # class indices
    valid_probs: np.ndarray
    test_ids: list[str]
    test_probs: np.ndarray


def save_predictions(folder: Path, p: Predictions) -> None:
    np.save(folder / probs_file("valid"), p.valid_probs.astype(np.float32))
    np.save(folder / probs_file("test"), p.test_probs.astype(np.float32))
    pd.DataFrame({"id": p.valid_ids, "label": p.valid_labels}).to_csv(folder / rows_file("valid"), index=False)
    pd.DataFrame({"id": p.test_ids}).to_csv(folder / rows_file("test"), index=False)


def load_predictions(folder: Path) -> Predictions:
    missing = [name for name in PREDICTION_FILES if not (folder / name).is_file()]
    if missing:
        raise PipelineError(f"{folder}: no predictions ({missing[0]} missing)")
    valid = read_table(folder / rows_file("valid"), dtype={"id": str})
    test = read_table(folder / rows_file("test"), dtype={"id": str})
    p = Predictions(valid["id"].tolist(), valid["label"].to_numpy(), load_array(folder / probs_file("valid"), in_memory=True),
                    test["id"].tolist(), load_array(folder / probs_file("test"), in_memory=True))
    if len(p.valid_ids) != len(p.valid_probs) or len(p.test_ids) != len(p.test_probs):
        raise PipelineError(f"{folder}: probabilities and row ids have different lengths")
    return p


def save_fold_test(folder: Path, fold_test: np.ndarray) -> None:
    """Each fold model's test probabilities, (folds, n_test, classes), rows as `test_rows.csv`."""
    np.save(folder / FOLD_TEST_FILE, np.asarray(fold_test, dtype=np.float32))


def load_fold_test(folder: Path, n_test: int, n_folds: int | None = None) -> np.ndarray:
    """What `save_fold_test` wrote, checked to hold `n_test` rows per fold (and `n_folds` folds)."""
    path = folder / FOLD_TEST_FILE
    if not path.exists():
        raise PipelineError(f"{path} is missing: the stage that wrote {folder} predates per-fold test "
                            "probabilities or did not train folds; rerun it")
    fold_test = load_array(path, in_memory=True)
    if fold_test.ndim != 3 or fold_test.shape[1] != n_test or n_folds not in (None, fold_test.shape[0]):
        raise PipelineError(f"{path}: shape {fold_test.shape}, expected {n_folds or 'F'} folds of {n_test} test rows")
    return fold_test


def validation_kind(folder: Path) -> str:
    """What a predicting stage's `valid` rows are: `holdout` (the split's validation rows) or
    `cvF-oof` (every training row, out of fold), from its manifest."""
    from pipeline.core.cache import Manifest

    manifest = Manifest.read(folder)
    return (manifest.metrics.get("validation") if manifest else None) or "holdout"

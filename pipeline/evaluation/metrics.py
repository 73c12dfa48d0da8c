"""Scores as Kaggle computes them, and the clipping that protects a submission's log loss.

Kaggle's multi-class log loss clips each probability to [1e-15, 1 - 1e-15], renormalises each row
and averages -log p(true class); its binary log loss scores P(positive class) alone. A confident
wrong answer costs up to 34.5 nats, so submissions clip further (`competition.clip`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

KAGGLE_EPS = 1e-15


def clip_probabilities(probs: np.ndarray, lo: float, hi: float, renormalize: bool = False) -> np.ndarray:
    clipped = np.clip(np.asarray(probs, dtype=np.float64), lo, hi)
    if renormalize and clipped.ndim == 2:
        clipped = clipped / clipped.sum(axis=1, keepdims=True)
    return clipped


def multiclass_log_loss(labels: np.ndarray, probs: np.ndarray) -> float:
    """Kaggle's multi-class log loss: labels are class indices, probs an (n, k) array."""
    p = np.clip(np.asarray(probs, dtype=np.float64), KAGGLE_EPS, 1 - KAGGLE_EPS)
    p = p / p.sum(axis=1, keepdims=True)
    return float(-np.mean(np.log(p[np.arange(len(labels)), labels])))


def binary_log_loss(is_positive: np.ndarray, p_positive: np.ndarray) -> float:
    """Kaggle's binary log loss on P(positive)."""
    p = np.clip(np.asarray(p_positive, dtype=np.float64), KAGGLE_EPS, 1 - KAGGLE_EPS)
    y = np.asarray(is_positive, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def accuracy(labels: np.ndarray, probs: np.ndarray) -> float:
    return float(np.mean(np.argmax(probs, axis=1) == labels))


def competition_score(task: str, metric: str, labels: np.ndarray, probs: np.ndarray) -> float:
    """The leaderboard's metric for (n, k) class probabilities; for binary tasks class 1 is positive."""
    if metric == "accuracy":
        return accuracy(labels, probs)
    if task == "binary":
        return binary_log_loss(labels == 1, probs[:, 1])
    return multiclass_log_loss(labels, probs)


SCORE_NAMES = ("val_log_loss", "val_log_loss_clipped", "val_accuracy")


def evaluate(labels: np.ndarray, probabilities: np.ndarray, competition=None, clip: bool = False,
             renormalize: bool = False) -> dict[str, float]:
    """The validation scores every stage reports, under one name each (`SCORE_NAMES`).

    Args:
        labels: true class indices.
        probabilities: (n, k) class probabilities.
        competition: the `competition` section (task, clip); needed only with `clip`.
        clip: also score the probabilities as submitted, clipped to `competition.clip`.
        renormalize: with `clip`, rescale clipped rows to sum to 1 (submit.renormalize).

    Returns:
        `val_log_loss` (Kaggle's, eps-clipped only), `val_accuracy`, and with `clip`
        `val_log_loss_clipped`; rounded to 5 decimals.
    """
    scores = {"val_log_loss": multiclass_log_loss(labels, probabilities),
              "val_accuracy": accuracy(labels, probabilities)}
    if clip:
        clipped = clip_probabilities(probabilities, *competition.clip, renormalize=renormalize)
        scores["val_log_loss_clipped"] = competition_score(competition.task, "log_loss", labels, clipped)
    return {name: round(float(value), 5) for name, value in scores.items()}


@dataclass(frozen=True)
class Score:
    """What a competition's metric means for our own scores: the one place that maps a metric to score
    names and says which way is better.

    name: the validation score runs are compared on (sweeps, `kp runs`): every predicting stage has it.
    submitted: the score of the probabilities as submitted (clipped), what the leaderboard's compares with.
    higher_is_better: accuracy; log loss is lower.
    """

    name: str
    submitted: str
    higher_is_better: bool

    def loss(self, value: float) -> float:
        """`value` as a loss (lower is better): log loss itself, the error rate for accuracy."""
        return 1.0 - value if self.higher_is_better else value


LOG_LOSS = Score("val_log_loss", "val_log_loss_clipped", higher_is_better=False)
ACCURACY = Score("val_accuracy", "val_accuracy", higher_is_better=True)


def score_for(metric: str) -> Score:
    """The `Score` of a competition's metric (`competition.metric`: log_loss or accuracy)."""
    return ACCURACY if metric == "accuracy" else LOG_LOSS


def score_named(name: str) -> Score:
    """The `Score` one of whose names is `name` (`val_log_loss`, `val_log_loss_clipped`, `val_accuracy`)."""
    return next(score for score in (LOG_LOSS, ACCURACY) if name in (score.name, score.submitted))

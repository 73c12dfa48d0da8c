"""Scores as Kaggle computes them, and the clipping that protects a submission's log loss.

Kaggle's multi-class log loss clips each probability to [1e-15, 1 - 1e-15], renormalises each row
and averages -log p(true class); its binary log loss scores P(positive class) alone. A confident
wrong answer costs up to 34.5 nats, so submissions clip further (`competition.clip`).
"""
from __future__ import annotations

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

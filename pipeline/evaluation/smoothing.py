"""Neighbour smoothing: blend each row's probabilities with those of its nearest rows in feature space.

State Farm's winner credited this alone with 40% of his leaderboard gain: consecutive frames of one
driver look alike, so averaging a test image's prediction with its nearest test images' removes
noise. Rows are smoothed only among rows of their own set (test rows with test rows, validation
rows with validation rows): `neighbours` never returns a row as its own neighbour, and never a row
of another set because it only ever sees one set.

Choosing `k` and `weight` on validation rows and then reporting the smoothed validation score would
report a tuned number. `cross_fitted` avoids that: the rows are cut into two halves (by group when
there are groups, e.g. drivers); each half is smoothed with the setting chosen on the other half's
labels, so no reported row took part in choosing its own setting. Imports scikit-learn.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.evaluation.metrics import multiclass_log_loss

METRICS = ("cosine", "euclidean")


@dataclass(frozen=True)
class Neighbours:
    """Each row's nearest other rows of the same set, nearest first."""

    index: np.ndarray  # (n, k_max) row numbers
    distance: np.ndarray  # (n, k_max)


def neighbours(features: np.ndarray, k: int, metric: str) -> Neighbours:
    """The `k` nearest other rows of every row (fewer when the set is smaller), by `metric`.

    Args:
        features: (n, ...) features of one set of rows (flattened per row).
        k: neighbours per row.
        metric: cosine | euclidean.
    """
    from sklearn.neighbors import NearestNeighbors

    x = np.asarray(features, dtype=np.float32).reshape(len(features), -1)
    k = min(k, len(x) - 1)
    if k < 1:
        return Neighbours(np.zeros((len(x), 0), np.int64), np.zeros((len(x), 0), np.float32))
    distance, index = NearestNeighbors(n_neighbors=k + 1, metric=metric, algorithm="brute").fit(x).kneighbors(x)
    own = index == np.arange(len(x))[:, None]
    own[~own.any(axis=1), -1] = True  # a row tied with duplicates of itself: drop the farthest instead
    keep = ~own
    return Neighbours(index[keep].reshape(len(x), k), distance[keep].reshape(len(x), k).astype(np.float32))


def smooth(probs: np.ndarray, near: Neighbours, k: int, weight: float, distance_weighted: bool = False) -> np.ndarray:
    """(1 - weight) * own probabilities + weight * the mean of the `k` nearest rows' probabilities
    (weighted by 1 / distance when `distance_weighted`). weight 0 returns `probs` unchanged."""
    if weight == 0 or k == 0 or near.index.shape[1] == 0:
        return probs
    index, distance = near.index[:, :k], near.distance[:, :k]
    shares = 1.0 / (distance + 1e-6) if distance_weighted else np.ones_like(distance)
    shares = shares / shares.sum(axis=1, keepdims=True)
    blended = np.einsum("nk,nkc->nc", shares, probs[index])
    return ((1 - weight) * probs + weight * blended).astype(probs.dtype)


def choose(probs: np.ndarray, labels: np.ndarray, near: Neighbours, ks: list[int], weights: list[float],
           distance_weighted: bool, rows: np.ndarray) -> tuple[int, float, float]:
    """The (k, weight) of the grid with the lowest log loss on `rows` (a boolean mask), and that loss.
    Neighbours may be any rows of the set; only the labels of `rows` are read."""
    best = None
    for k in ks:
        for weight in weights:
            loss = multiclass_log_loss(labels[rows], smooth(probs, near, k, weight, distance_weighted)[rows])
            if best is None or loss < best[2]:
                best = (k, weight, float(loss))
    return best


def halves(n: int, groups: np.ndarray | None, seed: int = 0) -> np.ndarray:
    """A boolean mask cutting n rows in two: whole groups to one side when `groups` is given."""
    rng = np.random.default_rng(seed)
    if groups is not None and len(set(groups)) >= 2:
        names = sorted(set(groups))
        first = set(rng.permutation(names)[: len(names) // 2])
        return np.array([g in first for g in groups])
    mask = np.zeros(n, bool)
    mask[rng.permutation(n)[: n // 2]] = True
    return mask


def cross_fitted(probs: np.ndarray, labels: np.ndarray, near: Neighbours, ks: list[int], weights: list[float],
                 distance_weighted: bool, side: np.ndarray) -> tuple[np.ndarray, list[dict]]:
    """Smoothed probabilities of every row, each half with the setting chosen on the other half.

    Returns:
        (the smoothed rows, [{"chosen_on": 0|1, "k", "weight", "loss"} for each half's choice]).
    """
    out = probs.copy()
    choices = []
    for chosen_on in (True, False):
        k, weight, loss = choose(probs, labels, near, ks, weights, distance_weighted, side == chosen_on)
        applied = side != chosen_on
        out[applied] = smooth(probs, near, k, weight, distance_weighted)[applied]
        choices.append({"chosen_on_half": int(not chosen_on), "k": k, "weight": weight, "loss": round(loss, 5)})
    return out, choices

"""Neighbour smoothing: blend each row's probabilities with those of its nearest rows in feature space.

State Farm's winner credited this alone with 40% of his leaderboard gain: consecutive frames of one
driver look alike, so averaging a test image's prediction with its nearest test images' removes
noise. Rows are smoothed only among rows of their own set (test rows with test rows, validation
rows with validation rows): `neighbours` never returns a row as its own neighbour, and never a row
of another set because it only ever sees one set.

Choosing `k` and `weight` on validation rows and then reporting the smoothed validation score would
report a tuned number. `cross_fitted` avoids that: the rows are cut into two halves (by group when
there are groups, e.g. drivers); each half is smoothed with the setting chosen on the other half's
labels, so no reported row took part in choosing its own setting.

A row's neighbours are only as near as the set it is smoothed in is dense: 1,400 dogs-vs-cats
training images hold closer look-alikes than 200 test images do, so a weight chosen among all
validation rows over-smooths the test rows. `size_matched_sets` cuts the validation rows into
sets of about the test set's size (whole groups, e.g. drivers, where there are groups), and
validation rows find their neighbours within their own set only, as test rows do among the test
rows. `smooth_predictions` is the
whole procedure on a predicting stage's output, as the smooth stage (and pseudo's `smooth`) runs
it. Imports scikit-learn.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.core.config_reader import ConfigReader
from pipeline.core.readers import read_table
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


def neighbours_within(features: np.ndarray, sets: list[np.ndarray], k: int, metric: str) -> Neighbours:
    """`neighbours` computed inside each of `sets` (arrays of row numbers covering every row once),
    as row numbers of `features`; k is capped so that every set has k other rows."""
    k = min(k, min(len(rows) for rows in sets) - 1)
    index = np.zeros((len(features), max(k, 0)), np.int64)
    distance = np.zeros((len(features), max(k, 0)), np.float32)
    for rows in sets:
        near = neighbours(features[rows], k, metric)
        index[rows], distance[rows] = rows[near.index], near.distance
    return Neighbours(index, distance)


def size_matched_sets(n: int, size: int, groups: np.ndarray | None, seed: int = 0) -> list[np.ndarray]:
    """Row numbers 0..n-1 cut into round(n / size) sets (at least one) of about `size` rows each: whole
    groups per set when `groups` is given (largest group first, each to the smallest set so far),
    else a seeded random partition."""
    count = max(1, round(n / max(size, 1)))
    rng = np.random.default_rng(seed)
    if groups is None or len(set(groups)) < count:
        return [np.sort(part) for part in np.array_split(rng.permutation(n), count)]
    names = list(rng.permutation(sorted(set(groups))))
    sizes = {name: int((groups == name).sum()) for name in names}
    members: list[list[str]] = [[] for _ in range(count)]
    totals = [0] * count
    for name in sorted(names, key=lambda g: -sizes[g]):  # stable: ties keep the seeded order
        smallest = totals.index(min(totals))
        members[smallest].append(name)
        totals[smallest] += sizes[name]
    return [np.flatnonzero(np.isin(groups, chosen)) for chosen in members]


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


def smooth_predictions(config: ConfigReader, inputs: dict, before, settings, where: str,
                       fold_test: np.ndarray | None = None):
    """Smooth a predicting stage's valid and test probabilities with the `smooth` section's settings.

    The valid rows (the split's validation rows, or every training row out of fold) are smoothed
    among themselves (with `settings.match_test_size`, within sets of about the test set's size),
    the test rows among themselves, each on precompute's clean features of the same rows. With `settings.tune`, k and weight come from the grid: the reported valid rows are
    cross-fitted over two halves (by group where the competition has groups), the test rows get
    the setting chosen on all valid rows.

    Args:
        config: a config view reading `competition.classes`.
        inputs: upstream folders by stage name: `download`, `precompute`, `split`.
        before: the `Predictions` to smooth.
        settings: the `smooth` section (k, weight, metric, distance_weighted, match_test_size, tune,
            grid, seed).
        where: the folder `before` came from, for error messages.
        fold_test: (folds, n_test, classes) each fold model's test probabilities, smoothed alike.

    Returns:
        (the smoothed `Predictions`, the metrics: k, weight, scores before and after, the
        cross-fitted choices; the smoothed `fold_test` or None).
    """

    from pipeline.core.artifacts import INDEX_FILE, SPLIT_FILE
    from pipeline.core.errors import PipelineError
    from pipeline.data.features import load_split_features
    from pipeline.data.index import read_index
    from pipeline.evaluation.metrics import evaluate
    from pipeline.evaluation.predictions import Predictions

    s = settings
    split_ids = read_table(inputs["split"] / SPLIT_FILE, dtype={"id": str})["id"].to_numpy()
    scored = np.isin(split_ids, before.valid_ids)  # the split's validation rows, or every row out of fold (cv)
    data = load_split_features(inputs["precompute"], inputs["split"], config.competition.classes,
                               sides=(~scored, scored))
    for side, ids, expected in (("valid", before.valid_ids, data.valid_ids), ("test", before.test_ids, data.test_ids)):
        if list(ids) != list(expected):
            raise PipelineError(f"{where}: its {side} rows are not precompute's {side} rows of this split, in order; "
                                "rerun it")
    ks = sorted(set(s.grid.k)) if s.tune else [s.k]
    weights = sorted(set(s.grid.weight)) if s.tune else [s.weight]
    train = read_index(inputs["download"] / INDEX_FILE).query("subset == 'train'")
    group_of = dict(zip(train.id, train.group))
    groups = np.array([group_of[i] for i in data.valid_ids])
    groups = groups if (groups != "").all() else None  # no groups: random rows
    sets = (size_matched_sets(len(data.valid_ids), len(data.test_ids), groups, s.seed) if s.match_test_size
            else [np.arange(len(data.valid_ids))])
    valid_near = neighbours_within(data.x_valid, sets, max(ks), s.metric)
    test_near = neighbours(data.x_test, max(ks), s.metric)

    result = {"metric": s.metric, "distance_weighted": s.distance_weighted, "tune": s.tune,
              "valid_sets": len(sets), "valid_set_rows": [len(rows) for rows in sets]}
    if s.tune:
        side = halves(len(data.valid_ids), groups, s.seed)
        valid, choices = cross_fitted(before.valid_probs, data.y_valid, valid_near, ks, weights,
                                      s.distance_weighted, side)
        k, weight, _ = choose(before.valid_probs, data.y_valid, valid_near, ks, weights, s.distance_weighted,
                              np.ones(len(data.valid_ids), bool))
        result.update({"cross_fit_choices": choices, "halves_by": "group" if groups is not None else "row"})
    else:
        k, weight = s.k, s.weight
        valid = smooth(before.valid_probs, valid_near, k, weight, s.distance_weighted)
    test = smooth(before.test_probs, test_near, k, weight, s.distance_weighted)
    unsmoothed = evaluate(data.y_valid, before.valid_probs)
    result.update({"k": k, "weight": weight, **evaluate(data.y_valid, valid),
                   **{f"{name}_before": value for name, value in unsmoothed.items()}})
    result["log_loss_gain"] = round(result["val_log_loss_before"] - result["val_log_loss"], 5)
    smoothed_folds = None if fold_test is None else np.stack(
        [smooth(probs, test_near, k, weight, s.distance_weighted) for probs in fold_test])
    return (Predictions(before.valid_ids, before.valid_labels, valid, before.test_ids, test), result, smoothed_folds)

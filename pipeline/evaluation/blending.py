"""Blending several sources' class probabilities with weights chosen on out-of-fold rows, cross-fitted.

Methods (`blend.method`):
- `weights`: non-negative weights summing to one that minimise the log loss of the weighted mean of
  the sources' probabilities (SLSQP on the simplex).
- `hill_climb`: ensemble selection (Caruana et al., 2004), as top Kaggle solutions blend: start from
  the best source, then add (with replacement) the source that lowers the log loss most, up to
  `rounds` times, stopping when none does; a source's weight is how often it was picked.
- `stack`: a multinomial logistic regression (L2, `C`) on the sources' log-probabilities.

Cross-fitting (`cross_fit`): the rows are cut into folds; fold f's rows are blended by what was
chosen on the other folds' rows, so no reported row chose its own weights. The test rows get what
was chosen on all rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.evaluation.metrics import multiclass_log_loss

METHODS = ("weights", "hill_climb", "stack")
EPSILON = 1e-7  # probabilities are clipped to [EPSILON, 1 - EPSILON] before a logarithm


@dataclass
class Blender:
    """What one choice made: the sources' weights (`weights`, `hill_climb`) or a stacked model (`stack`)."""

    weights: np.ndarray  # (sources,); for stack, each source's share of the absolute coefficients
    model: object = None  # a fitted sklearn LogisticRegression (stack)

    def apply(self, probs: np.ndarray) -> np.ndarray:
        """Blend `probs` (sources, rows, classes) into (rows, classes)."""
        if self.model is None:
            return np.tensordot(self.weights, probs, axes=1)
        return self.model.predict_proba(_stack_features(probs))

    def to_record(self) -> dict:
        """Everything `apply` uses, as JSON-ready lists (floats kept exactly): `from_record` rebuilds it."""
        record = {"weights": [float(w) for w in self.weights]}
        if self.model is not None:
            record["stack"] = {"coef": self.model.coef_.tolist(), "intercept": self.model.intercept_.tolist(),
                               "classes": self.model.classes_.tolist()}
        return record

    @classmethod
    def from_record(cls, record: dict) -> "Blender":
        """The `Blender` a `to_record` dict describes (a stacked model's fitted state restored into sklearn's
        own class, so `apply` runs the same code as when it was chosen)."""
        model = None
        if "stack" in record:
            from sklearn.linear_model import LogisticRegression

            fitted = record["stack"]
            model = LogisticRegression()
            model.coef_, model.intercept_ = np.asarray(fitted["coef"]), np.asarray(fitted["intercept"])
            model.classes_ = np.asarray(fitted["classes"])
        return cls(np.asarray(record["weights"], dtype=np.float64), model)


def choose(method: str, probs: np.ndarray, labels: np.ndarray, rounds: int = 100, c: float = 1.0,
           seed: int = 0) -> Blender:
    """Choose a blend of `probs` (sources, rows, classes) on those rows' `labels`.

    Args:
        method: one of METHODS.
        probs: each source's probabilities of the same rows.
        labels: class indices.
        rounds: hill_climb: the most picks.
        c: stack: inverse L2 strength.
        seed: stack: the solver's seed.

    Returns:
        A `Blender`.
    """
    if method == "weights":
        return Blender(simplex_weights(probs, labels))
    if method == "hill_climb":
        return Blender(hill_climb(probs, labels, rounds))
    if method == "stack":
        return _stacked(probs, labels, c, seed)
    raise ValueError(f"unknown blend method {method!r}; expected one of {METHODS}")


def simplex_weights(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Non-negative weights summing to one that minimise the log loss of the weighted mean."""
    from scipy.optimize import minimize

    n_sources = len(probs)
    picked = np.clip(probs[:, np.arange(probs.shape[1]), labels], EPSILON, 1.0)  # (sources, rows)

    def loss(w):
        return -np.mean(np.log(np.clip(w @ picked, EPSILON, None)))

    def gradient(w):
        return -np.mean(picked / np.clip(w @ picked, EPSILON, None), axis=1)

    start = np.full(n_sources, 1.0 / n_sources)
    found = minimize(loss, start, jac=gradient, method="SLSQP", bounds=[(0.0, 1.0)] * n_sources,
                     constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones_like(w)}])
    weights = np.clip(found.x, 0.0, None)
    return weights / weights.sum()


def hill_climb(probs: np.ndarray, labels: np.ndarray, rounds: int) -> np.ndarray:
    """Ensemble selection with replacement: the fraction of `rounds` picks each source got."""
    losses = [multiclass_log_loss(labels, p) for p in probs]
    counts = np.zeros(len(probs))
    best = int(np.argmin(losses))
    counts[best], total, current = 1, probs[best].astype(np.float64), losses[best]
    for picks in range(1, rounds):
        trials = [multiclass_log_loss(labels, (total + p) / (picks + 1)) for p in probs]
        pick = int(np.argmin(trials))
        if trials[pick] >= current:
            break
        counts[pick] += 1
        total, current = total + probs[pick], trials[pick]
    return counts / counts.sum()


def _stack_features(probs: np.ndarray) -> np.ndarray:
    logs = np.log(np.clip(probs, EPSILON, 1 - EPSILON))  # (sources, rows, classes)
    return np.concatenate(list(logs), axis=1)


def _stacked(probs: np.ndarray, labels: np.ndarray, c: float, seed: int) -> Blender:
    from sklearn.linear_model import LogisticRegression

    n_classes = probs.shape[2]
    model = LogisticRegression(C=c, max_iter=2000, random_state=seed)
    features = _stack_features(probs)
    present = np.unique(labels)
    if len(present) < n_classes:  # a class absent from these rows: the model could not predict it
        raise ValueError(f"stack needs every class among the rows it fits on; classes {sorted(set(range(n_classes)) - set(present))} "
                         "are missing (use blend.method weights)")
    model.fit(features, labels)
    share = np.abs(model.coef_).reshape(len(model.coef_), len(probs), n_classes).sum(axis=(0, 2))
    return Blender(share / share.sum(), model)


def cross_fit(method: str, probs: np.ndarray, labels: np.ndarray, folds: np.ndarray, **options):
    """Blend each fold's rows with what was chosen on the other folds' rows.

    Args:
        method, options: as `choose`.
        probs: (sources, rows, classes).
        labels: class indices of the rows.
        folds: each row's fold.

    Returns:
        (blended probabilities of every row, {fold: its `Blender`}).
    """
    blended = np.empty(probs.shape[1:], dtype=np.float64)
    blenders = {}
    for fold in np.unique(folds):
        inside = folds == fold
        blenders[int(fold)] = choose(method, probs[:, ~inside], labels[~inside], **options)
        blended[inside] = blenders[int(fold)].apply(probs[:, inside])
    return blended, blenders

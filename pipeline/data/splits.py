"""Validation-set design: which training rows are held out, as pure functions of labels and groups.

Every function returns an integer fold per row. For a single hold-out (`random`, `group`) fold 0
is validation and fold 1 is training; for k folds (`kfold`, `group_kfold`) folds are 0..k-1.
`group` keeps every group (State Farm's driver) on one side only, as the leaderboard's unseen
drivers demand; a random split there lets the model recognise drivers and flatters validation.
"""
from __future__ import annotations

import numpy as np


def random_split(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Stratified by class: each class holds out `fraction` of its rows."""
    from sklearn.model_selection import train_test_split

    rows = np.arange(len(labels))
    _, valid = train_test_split(rows, test_size=fraction, stratify=labels, random_state=seed)
    folds = np.ones(len(labels), dtype=np.int64)
    folds[valid] = 0
    return folds


def group_split(labels: np.ndarray, groups: np.ndarray, fraction: float, seed: int,
                candidates: int = 4000) -> np.ndarray:
    """Hold out whole groups: about `fraction` of the rows, with class shares as close to the
    overall ones as the groups allow.

    Searches `candidates` random orders of the groups; each order's prefix closest to `fraction`
    is a candidate, scored by |valid share - fraction| + the total-variation distance between the
    valid and overall class distributions. The same seed always gives the same split.
    """
    names, group_of_row = np.unique(groups, return_inverse=True)
    if len(names) < 2:
        raise ValueError(f"a group split needs at least 2 groups, got {len(names)}")
    classes, class_of_row = np.unique(labels, return_inverse=True)
    counts = np.zeros((len(names), len(classes)))
    np.add.at(counts, (group_of_row, class_of_row), 1)
    sizes, total = counts.sum(axis=1), counts.sum()
    overall = counts.sum(axis=0) / total

    rng = np.random.default_rng(seed)
    best_score, best_groups = np.inf, None
    for _ in range(candidates):
        order = rng.permutation(len(names))
        share = np.cumsum(sizes[order])[:-1] / total  # never all groups
        take = int(np.argmin(np.abs(share - fraction))) + 1
        chosen = order[:take]
        valid_counts = counts[chosen].sum(axis=0)
        balance = 0.5 * np.abs(valid_counts / valid_counts.sum() - overall).sum()
        score = abs(share[take - 1] - fraction) + balance
        if score < best_score - 1e-12:
            best_score, best_groups = score, np.sort(chosen)
    folds = np.ones(len(labels), dtype=np.int64)
    folds[np.isin(group_of_row, best_groups)] = 0
    return folds


def kfold(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Stratified k folds."""
    from sklearn.model_selection import StratifiedKFold

    folds = np.empty(len(labels), dtype=np.int64)
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    for fold, (_, valid) in enumerate(splitter.split(np.zeros(len(labels)), labels)):
        folds[valid] = fold
    return folds


def group_kfold(labels: np.ndarray, groups: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k folds of whole groups, stratified by class as far as the groups allow."""
    from sklearn.model_selection import StratifiedGroupKFold

    if len(np.unique(groups)) < k:
        raise ValueError(f"group_kfold with {k} folds needs at least {k} groups, got {len(np.unique(groups))}")
    folds = np.empty(len(labels), dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    for fold, (_, valid) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups)):
        folds[valid] = fold
    return folds


def class_balance(labels: np.ndarray, valid: np.ndarray) -> float:
    """Total-variation distance between the validation and overall class distributions (0 = same)."""
    classes = np.unique(labels)
    overall = np.array([(labels == c).mean() for c in classes])
    held = np.array([(labels[valid] == c).mean() for c in classes]) if valid.any() else overall
    return float(0.5 * np.abs(held - overall).sum())

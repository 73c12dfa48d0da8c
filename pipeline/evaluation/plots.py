"""Plots: loss and accuracy per epoch, the confusion matrix, ensemble members, augmentation previews.

Uses matplotlib's non-interactive Agg backend (no display on these machines).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _saved(plt, fig, path: Path, dpi: int = 90):
    """Lay out, save and close `fig`; returns it (closed)."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return fig


def plot_history(history: dict[str, list[float]], path: Path, title: str = ""):
    """loss.png: train vs valid loss (left) and accuracy (right) per epoch. Returns the (closed) figure."""
    plt = pyplot()
    epochs = np.arange(1, len(history["loss"]) + 1)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ["loss", "accuracy"]):
        ax.plot(epochs, history[key], "o-", label=f"train {key}")
        if f"val_{key}" in history:
            ax.plot(epochs, history[f"val_{key}"], "s-", label=f"valid {key}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    return _saved(plt, fig, path)


def plot_confusion(labels: np.ndarray, predicted: np.ndarray, classes: list[str], path: Path, title: str = ""):
    """confusion.png: counts of (true class, predicted class) on the validation set. Returns the (closed) figure."""
    plt = pyplot()
    k = len(classes)
    matrix = np.zeros((k, k), dtype=int)
    np.add.at(matrix, (labels, predicted), 1)
    fig, ax = plt.subplots(figsize=(1.0 + 0.5 * k, 1.0 + 0.5 * k))
    ax.imshow(matrix, cmap="Blues")
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center",
                    color="white" if matrix[i, j] > matrix.max() / 2 else "black", fontsize=8)
    ax.set_xticks(range(k), classes, rotation=45)
    ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    return _saved(plt, fig, path)


def plot_members(members: list[dict], ensemble: dict, path: Path, title: str = ""):
    """members.png: each member's validation log loss and accuracy, with the ensemble's as a line.
    Returns the (closed) figure."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    x = [m["member"] for m in members]
    for ax, key, label in [(axes[0], "val_log_loss", "validation log loss"),
                           (axes[1], "val_accuracy", "validation accuracy")]:
        ax.plot(x, [m[key] for m in members], "o", label="members")
        ax.axhline(ensemble[key], color="C3", label=f"ensemble ({ensemble[key]:.4f})")
        ax.axhline(ensemble[f"mean_member_{key}"], color="gray", linestyle="--",
                   label=f"mean member ({ensemble[f'mean_member_{key}']:.4f})")
        ax.set_xlabel("member")
        ax.set_ylabel(label)
        ax.set_xticks(x)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    return _saved(plt, fig, path)


def plot_augmentations(originals: list[np.ndarray], versions: list[list[np.ndarray]], path: Path,
                       title: str = ""):
    """preview.png: one row per image, the original (uint8) first, then its augmented versions.
    Returns the (closed) figure."""
    plt = pyplot()
    columns = 1 + max((len(v) for v in versions), default=0)
    fig, axes = plt.subplots(len(originals), columns, figsize=(1.8 * columns, 1.8 * len(originals)), squeeze=False)
    for row, (original, changed) in enumerate(zip(originals, versions)):
        for column, image in enumerate([original, *changed]):
            ax = axes[row][column]
            ax.imshow(image.squeeze(), cmap="gray" if image.shape[-1] == 1 else None, vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title("original" if column == 0 else f"pass {column}", fontsize=9)
    fig.suptitle(title, fontsize=9)
    return _saved(plt, fig, path, dpi=80)


def plot_sweep(trials: list[dict], score_name: str, path: Path, title: str = ""):
    """sweep.png: a sweep's score against each setting it varied, one panel per setting (numbers on an
    axis, log-scaled when they span more than a factor of 5; other values as categories). A cv trial's
    point carries a bar from its best to its worst fold, so that a difference smaller than the folds'
    own spread is not read as a win. Returns the (closed) figure."""
    plt = pyplot()
    keys = list(dict.fromkeys(key for trial in trials for key in trial["overrides"]))
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(4.5 * max(1, len(keys)), 3.6), squeeze=False)
    scores = np.asarray([trial[score_name] for trial in trials], dtype=float)
    folds = [list((trial.get("fold_scores") or {}).values()) for trial in trials]
    spread = None
    if all(len(f) >= 2 for f in folds):  # below and above each point: to its best and worst fold
        spread = np.asarray([[max(s - min(f), 0.0) for s, f in zip(scores, folds)],
                             [max(max(f) - s, 0.0) for s, f in zip(scores, folds)]])
    for ax, key in zip(axes[0], keys):
        raw = [trial["overrides"].get(key, "") for trial in trials]
        try:
            values = [float(v) for v in raw]
        except ValueError:
            labels = list(dict.fromkeys(raw))
            positions = [labels.index(v) for v in raw]
            ax.errorbar(positions, scores, yerr=spread, fmt="o", capsize=3)
            ax.set_xticks(range(len(labels)), [label[:30] for label in labels], rotation=15, fontsize=7)
        else:
            ax.errorbar(values, scores, yerr=spread, fmt="o", capsize=3)
            positive = [v for v in values if v > 0]
            if len(positive) == len(values) and max(values) / min(values) > 5:
                from matplotlib.ticker import NullFormatter

                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(key)
        ax.set_ylabel(score_name + (" (bars: best to worst fold)" if spread is not None else ""))
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return _saved(plt, fig, path)


def plot_model_curves(histories: list[dict[str, list[float]]], path, title: str = ""):
    """The learning curves of several models averaged into one prediction (an ensemble's members, a cv's
    folds): each model's training loss (left) and validation loss where it has one (right), per epoch.
    `path`: a file or a binary stream. Returns the (closed) figure."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for n, history in enumerate(histories, start=1):
        epochs = np.arange(1, len(history["loss"]) + 1)
        axes[0].plot(epochs, history["loss"], "-", alpha=0.7, label=f"model {n}")
        if "val_loss" in history:
            axes[1].plot(epochs, history["val_loss"], "-", alpha=0.7, label=f"model {n}")
    for ax, name in zip(axes, ("training loss", "validation loss")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        if ax.lines and len(histories) <= 10:
            ax.legend(fontsize=7)
    fig.suptitle(title)
    return _saved(plt, fig, path)


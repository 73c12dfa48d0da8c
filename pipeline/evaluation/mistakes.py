"""The model's worst mistakes: `top_losses.png` and the most confused class pairs (fastai's `plot_top_losses`).

Every predicting stage calls `write_mistakes` on its validation (or out-of-fold) rows: the rows
with the highest log loss, i.e. where the model gave the true class the least probability, are
drawn with their true label, the predicted label and its probability; the class pairs most often
confused (true -> predicted, counts) go into the stage's manifest. The images are decoded as
precompute sees them (`pipeline.evaluation.gallery.load_training_images`). Imports TensorFlow for
image files.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.core.artifacts import TOP_LOSSES_PLOT
from pipeline.core.config_reader import ConfigReader
from pipeline.evaluation.gallery import IMAGE_READS, load_training_images

MISTAKES_READS = ("competition.classes", *IMAGE_READS)  # what `write_mistakes` reads of the config


def top_losses(labels: np.ndarray, probs: np.ndarray, n: int) -> np.ndarray:
    """Row numbers of the `n` rows with the highest log loss (lowest probability of the true class), worst first."""
    true = np.asarray(probs, np.float64)[np.arange(len(labels)), labels]
    return np.argsort(true, kind="stable")[:n]


def most_confused(labels: np.ndarray, predicted: np.ndarray, classes: list[str], n: int = 5) -> list[dict]:
    """The `n` (true, predicted) class pairs with true != predicted seen most often, with their counts."""
    k = len(classes)
    counts = np.zeros((k, k), dtype=int)
    np.add.at(counts, (labels, predicted), 1)
    np.fill_diagonal(counts, 0)
    order = np.argsort(-counts, axis=None, kind="stable")[:n]
    return [{"true": classes[i], "predicted": classes[j], "count": int(counts[i, j])}
            for i, j in zip(*np.unravel_index(order, counts.shape)) if counts[i, j] > 0]


def write_mistakes(config: ConfigReader, download_dir: Path, predictions, out: Path, title: str, n: int = 12) -> dict:
    """`top_losses.png` in `out` and the metrics for the manifest.

    Args:
        config: a config view that reads `MISTAKES_READS`.
        download_dir: the download stage's output (index and raw files).
        predictions: the stage's `Predictions`; its valid rows are drawn.
        out: the stage's output folder.
        title: the plot's title.
        n: images drawn.

    Returns:
        {"most_confused": [{"true", "predicted", "count"}], "top_losses": [{"id", "true", "predicted",
        "probability", "log_loss"}]}.
    """
    from pipeline.core.artifacts import INDEX_FILE
    from pipeline.data.index import read_index
    from pipeline.evaluation.plots import pyplot

    classes = config.competition.classes
    labels = np.asarray(predictions.valid_labels)
    probs = np.asarray(predictions.valid_probs)
    predicted = probs.argmax(axis=1)
    worst = top_losses(labels, probs, n)
    train = read_index(download_dir / INDEX_FILE).query("subset == 'train'").reset_index(drop=True)
    position = {row_id: i for i, row_id in enumerate(train["id"])}
    images = load_training_images(config, download_dir, train, [position[predictions.valid_ids[r]] for r in worst])
    rows = [{"id": predictions.valid_ids[r], "true": classes[labels[r]], "predicted": classes[predicted[r]],
             "probability": round(float(probs[r, predicted[r]]), 4),
             "log_loss": round(float(-np.log(max(probs[r, labels[r]], 1e-15))), 4)} for r in worst]
    plt = pyplot()
    columns = min(4, max(1, len(rows)))
    lines = max(1, -(-len(rows) // columns))
    fig, axes = plt.subplots(lines, columns, figsize=(2.6 * columns, 2.7 * lines), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, row in zip(axes.flat, images, rows):
        ax.imshow(image.squeeze(), cmap="gray" if image.shape[-1] == 1 else None, vmin=0, vmax=255)
        ax.set_title(f"{row['id']}\ntrue {row['true']}, predicted {row['predicted']} ({row['probability']:.2f})\n"
                     f"loss {row['log_loss']:.2f}", fontsize=7)
    fig.suptitle(f"{title}: the {len(rows)} validation rows with the highest loss", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / TOP_LOSSES_PLOT, dpi=80)
    plt.close(fig)
    return {"most_confused": most_confused(labels, predicted, classes), "top_losses": rows}


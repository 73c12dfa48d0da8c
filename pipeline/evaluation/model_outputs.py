"""A trained model in its stage's folder: its files from the unit that trained it, its plots drawn there.

The finetune, bnretrain and tune stages each train one model as a unit of the run cache (so a
plot's or a headline's edit reruns the stage without retraining); `write_model_outputs` links the
unit's model, history and probabilities into the stage's folder, draws `loss.png` and
`confusion.png` from them, and writes `top_losses.png` (`pipeline.evaluation.mistakes`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.core.artifacts import (CONFUSION_PLOT, HISTORY_FILE, LOSS_PLOT, MODEL_FILE, PREDICTION_FILES,
                                     TOP_LOSSES_PLOT)
from pipeline.core.cache import link_or_copy
from pipeline.core.config_reader import ConfigReader
from pipeline.core.readers import read_table

TRAINED_FILES = (MODEL_FILE, HISTORY_FILE, *PREDICTION_FILES)  # what the training unit wrote
MODEL_OUTPUTS = (*TRAINED_FILES, LOSS_PLOT, CONFUSION_PLOT, TOP_LOSSES_PLOT)  # a model-training stage's outs


def passes_text(m: dict) -> str:
    """What a training headline adds for augmented passes and TTA."""
    text = f", clean + {m['train_passes']} passes" if m.get("train_passes") else ""
    if m.get("tta_passes"):
        text += f", TTA x{m['tta_passes']} (without: {m['val_log_loss_no_tta']:.4f})"
    return text


def draw_training(folder: Path, classes: list[str], heading: str, out: Path | None = None) -> None:
    """`loss.png` and `confusion.png` of the model whose history and probabilities are in `folder`.

    Args:
        folder: holds `history.csv` and the probabilities.
        classes: the class names.
        heading: the plots' title.
        out: where the plots go (default: `folder`).
    """

    from pipeline.evaluation.plots import plot_confusion, plot_history
    from pipeline.evaluation.predictions import load_predictions

    out = out or folder
    history = {column: values.tolist() for column, values in read_table(folder / HISTORY_FILE).items()}
    predictions = load_predictions(folder)
    plot_history(history, out / LOSS_PLOT, heading)
    plot_confusion(predictions.valid_labels, np.argmax(predictions.valid_probs, axis=1), classes,
                   out / CONFUSION_PLOT, heading)


def write_model_outputs(config: ConfigReader, unit_folder: Path, record: dict, out: Path, download_dir: Path,
                        title: str) -> dict:
    """Link a trained model's files into `out`, draw its plots there, and write its worst mistakes.

    Args:
        config: a config view that reads `pipeline.evaluation.mistakes.MISTAKES_READS`.
        unit_folder: the stored unit that trained it.
        record: the unit's record (its validation scores).
        out: the stage's folder.
        download_dir: the download stage's output (the images `top_losses.png` draws).
        title: names the model in the plots.

    Returns:
        `write_mistakes`' metrics.
    """
    from pipeline.evaluation.mistakes import write_mistakes
    from pipeline.evaluation.predictions import load_predictions

    for name in TRAINED_FILES:
        link_or_copy(unit_folder / name, out / name)
    draw_training(out, config.competition.classes,
                  f"{title}: val loss {record['val_log_loss']:.4f}, acc {record['val_accuracy']:.4f}")
    return write_mistakes(config, download_dir, load_predictions(out), out, title)

"""One fold's model of a cross-validation: its epochs chosen on another fold, then trained without its own.

For fold f with selection fold g: train the recipe's steps on the folds other than f and g, keeping
each step's best epoch by fold g's loss (that model is kept in `selection/`); then train on every
fold but f for exactly those epochs of the same schedules (nothing selected on any row) and predict
fold f (its "validation" rows) and the test rows. A unit of the cv stage (`train_fold`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.config_reader import ConfigReader
from pipeline.training.recipes import TrainingRun, collecting, say, train_steps

SELECTION_DIR = "selection"  # inside a fold's unit: the model that chose the epochs


@dataclass(frozen=True)
class Fold:
    """Fold f of a cross-validation and fold g, which chooses its epochs.

    number, chooser: f and g (0-based).
    held_out, selection: boolean masks of their rows over the split's rows.
    rows: the ids on each side (`train`, `selection`, `held_out`), for the record.
    """

    number: int
    chooser: int
    held_out: Any
    selection: Any
    rows: dict


def train_fold(config: ConfigReader, inputs: dict[str, Path], steps: tuple, fold: Fold, seed: int, title: str,
               out: Path, backup: Path | None = None) -> dict:
    """Fold f's model into `out` (here or on a Ray worker).

    Args:
        config: a config view that declares the steps' keys.
        inputs: upstream output folders by stage name.
        steps: the recipes (`Recipe.steps`).
        fold: its rows and the fold that chooses its epochs.
        seed: the fold model's seed.
        title: names the model in messages.
        backup: where a resumable recipe (tune) backs up the epochs of both trainings (`selection/`, `final/`).

    Returns:
        Its record: the final model's scores on fold f, `chosen_epochs`, the rows, the selection score.
    """
    warnings: list[str] = []
    warn = collecting(warnings)
    (out / SELECTION_DIR).mkdir()
    chosen = train_steps(config, steps, inputs, out / SELECTION_DIR,
                         TrainingRun(seed, f"{title} selection", backup=backup and backup / SELECTION_DIR, log=say,
                                     warn=warn),
                         sides=(~fold.held_out & ~fold.selection, fold.selection))
    final = train_steps(config, steps, inputs, out,
                        TrainingRun(seed, title, epochs=chosen["best_epochs"], backup=backup and backup / "final",
                                    log=say, warn=warn),
                        sides=(~fold.held_out, fold.held_out))
    return {**final, "fold": fold.number + 1, "selection_fold": fold.chooser + 1,
            "chosen_epochs": chosen["best_epochs"], "rows": fold.rows, "selection_val_log_loss": chosen["val_log_loss"],
            "warnings": warnings}

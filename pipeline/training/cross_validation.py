"""One fold's model of a cross-validation: its epochs chosen on another fold, then trained without its own.

For fold f with selection fold g: train the recipe's steps on the folds other than f and g, keeping
each step's best epoch by fold g's loss (that model is kept in `selection/`); then train on every
fold but f for exactly those epochs of the same schedules (nothing selected on any row) and predict
fold f (its "validation" rows) and the test rows. A unit of the cv stage (`train_fold`).
"""
from __future__ import annotations

from pathlib import Path

from pipeline.core.config_reader import ConfigReader
from pipeline.training.recipes import collecting, say, train_steps

SELECTION_DIR = "selection"  # inside a fold's unit: the model that chose the epochs


def train_fold(config: ConfigReader, inputs: dict[str, Path], steps: tuple, seed: int, f: int, g: int, held_out, selection,
               rows: dict, title: str, out: Path, backup: Path | None = None) -> dict:
    """Fold f's model into `out` (here or on a Ray worker).

    Args:
        config: a config view that declares the steps' keys.
        inputs: upstream output folders by stage name.
        steps: the recipes (`Recipe.steps`).
        seed: the fold model's seed.
        f, g: the held-out fold and the fold that chooses the epochs (0-based).
        held_out, selection: boolean masks of their rows over the split's rows.
        rows: the ids on each side, for the record.
        title: names the model in messages.
        backup: where a resumable recipe (tune) backs up the epochs of both trainings (`selection/`, `final/`).

    Returns:
        Its record: the final model's scores on fold f, `chosen_epochs`, the rows, the selection score.
    """
    warnings: list[str] = []
    (out / SELECTION_DIR).mkdir()
    chosen = train_steps(config, steps, inputs, seed, out / SELECTION_DIR, sides=(~held_out & ~selection, selection),
                         backup=backup and backup / SELECTION_DIR, log=say, warn=collecting(warnings),
                         title=f"{title} selection")
    final = train_steps(config, steps, inputs, seed, out, sides=(~held_out, held_out), stop_after=chosen["best_epochs"],
                        backup=backup and backup / "final", log=say, warn=collecting(warnings), title=title)
    return {**final, "fold": f + 1, "selection_fold": g + 1, "chosen_epochs": chosen["best_epochs"], "rows": rows,
            "selection_val_log_loss": chosen["val_log_loss"], "warnings": warnings}

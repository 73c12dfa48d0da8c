"""One fold's model of a cross-validation: its epochs chosen on another fold, then trained without its own.

For fold f with selection fold g: train the recipe's steps on the folds other than f and g, keeping
each step's best epoch by fold g's loss (that model is kept in `selection/`); then train on every
fold but f for exactly those epochs of the same schedules (nothing selected on any row) and predict
fold f (its "validation" rows) and the test rows. Without a selection fold (`cv.epochs: schedule`)
the model trains every epoch of each step's schedule on every fold but f and keeps the last: no
selection model, half the training, for schedules that end at a low rate (cosine). A unit of the cv and distill stages (`train_fold`);
`cross_validate` runs one per fold and gathers the out-of-fold rows. With `targets` (distill) every
training row learns a probability row (a teacher's out-of-fold probabilities mixed with its label)
instead of its label; the epochs are still chosen, and every fold still scored, on the true labels.
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

    number, chooser: f and g (0-based); g None: every epoch of the schedule, none chosen.
    held_out, selection: boolean masks of their rows over the split's rows (selection all False without g).
    rows: the ids on each side (`train`, `selection`, `held_out`), for the record.
    """

    number: int
    chooser: int | None
    held_out: Any
    selection: Any
    rows: dict


FOLD_STRATEGIES = ("kfold", "group_kfold")


def train_fold(config: ConfigReader, inputs: dict[str, Path], steps: tuple, fold: Fold, seed: int, title: str,
               targets, out: Path, backup: Path | None = None) -> dict:
    """Fold f's model into `out` (here or on a Ray worker).

    Args:
        config: a config view that declares the steps' keys.
        inputs: upstream output folders by stage name.
        steps: the recipes (`Recipe.steps`).
        fold: its rows and the fold that chooses its epochs.
        seed: the fold model's seed.
        title: names the model in messages.
        targets: (split rows, classes) probability rows the training rows learn instead of their labels, or None.
        backup: where a resumable recipe (tune) backs up the epochs of both trainings (`selection/`, `final/`).

    Returns:
        Its record: the final model's scores on fold f, `chosen_epochs`, the rows, the selection score.
    """
    warnings: list[str] = []
    warn = collecting(warnings)
    if fold.chooser is None:
        chosen = {"best_epochs": {step.name: step.scheduled_epochs(config) for step in steps}, "val_log_loss": None}
    else:
        (out / SELECTION_DIR).mkdir()
        chosen = train_steps(config, steps, inputs, out / SELECTION_DIR,
                             TrainingRun(seed, f"{title} selection", backup=backup and backup / SELECTION_DIR, log=say,
                                         warn=warn, targets=_side(targets, ~fold.held_out & ~fold.selection)),
                             sides=(~fold.held_out & ~fold.selection, fold.selection))
    final = train_steps(config, steps, inputs, out,
                        TrainingRun(seed, title, epochs=chosen["best_epochs"], backup=backup and backup / "final",
                                    log=say, warn=warn, targets=_side(targets, ~fold.held_out)),
                        sides=(~fold.held_out, fold.held_out))
    return {**final, "fold": fold.number + 1, "selection_fold": None if fold.chooser is None else fold.chooser + 1,
            "chosen_epochs": chosen["best_epochs"], "rows": fold.rows, "selection_val_log_loss": chosen["val_log_loss"],
            "warnings": warnings}


def _side(targets, rows):
    return None if targets is None else targets[rows]


def cross_validate(ctx, steps: tuple, source: str, seed: int, what: str, targets=None, teacher: str | None = None,
                   choose_epochs: bool = True):
    """One model per fold of the split (each a unit of `ctx`'s stage, `_runs/STAGE-folds/`), each predicting the
    fold it never saw.

    Args:
        ctx: the stage's `StageContext` (its inputs hold split and what the steps need).
        steps: the recipes every fold's model follows.
        source: the recipe's name as the stage's settings give it (part of each fold's key).
        seed: every fold model's seed.
        what: names the models in messages (`cv`, `distill`).
        targets: (split rows, classes) probability rows in the split's order, learnt instead of the labels; None.
        teacher: what the targets came from (a digest), part of each fold's key; None without targets.
        choose_epochs: choose each fold's epochs on the next fold (a selection model first); False: train
            every epoch of the steps' schedules and keep the last.

    Returns:
        (the out-of-fold `Predictions` of every training row with the mean of the fold models' test rows,
        each fold's record for the manifest, the fold models' test probabilities (folds, rows, classes)).

    Raises:
        PipelineError: the split has no folds, or fewer than 3 (2 without choosing epochs).
    """
    import numpy as np

    from pipeline.core.artifacts import SPLIT_FILE
    from pipeline.core.errors import PipelineError
    from pipeline.core.executor import UnitItem
    from pipeline.core.readers import read_table
    from pipeline.data.features import label_indices, read_rows
    from pipeline.evaluation.metrics import evaluate
    from pipeline.evaluation.predictions import Predictions
    from pipeline.training.recipes import check_steps, needs_of

    strategy = ctx.config.get("split.strategy")
    if strategy not in FOLD_STRATEGIES:
        raise PipelineError(f"{what} trains one model per fold, but split.strategy is {strategy!r}: set it to kfold or "
                            "group_kfold (by driver for State Farm)")
    split = read_table(ctx.input("split") / SPLIT_FILE, dtype={"id": str})
    folds = split["fold"].to_numpy()
    n_folds = int(folds.max()) + 1
    if n_folds < 2 + choose_epochs:
        raise PipelineError(f"{what} chooses each fold's epochs on another fold, so it needs at least 3 folds; "
                            f"split.folds is {n_folds}" if choose_epochs else
                            f"{what} needs at least 2 folds; split.folds is {n_folds}")
    check_steps(steps, ctx.config)
    classes = ctx.config.competition.classes
    labels = label_indices(read_rows(ctx.input("precompute"), "train")["label"], classes)
    ids = split["id"].to_numpy()
    items = []
    for f in range(n_folds):
        g = (f + 1) % n_folds if choose_epochs else None
        held_out = folds == f
        selection = folds == g if choose_epochs else np.zeros(len(folds), bool)
        rows = {"train": sorted(ids[~held_out & ~selection]), "selection": sorted(ids[selection]),
                "held_out": sorted(ids[held_out])}
        key = {"source": source, "seed": seed, "rows": rows, **({"teacher": teacher} if teacher else {}),
               **({} if choose_epochs else {"epochs": "schedule"})}
        chosen_on = f"epochs chosen on fold {g + 1}" if choose_epochs else "every epoch of the schedule"
        items.append(UnitItem(f"fold {f + 1}/{n_folds} ({chosen_on})", key,
                              (steps, Fold(f, g, held_out, selection, rows), seed, f"fold {f + 1}/{n_folds}", targets)))
    # a fold's model depends on its rows, not on how the other folds are cut: its key lists its rows instead of split's
    units = ctx.map_units("folds", train_fold, items, f"{what} folds", recipes=steps,
                          upstream=needs_of(steps, ctx.config), keyed_by_item=("split",), resumable=True)
    oof, fold_test, each = gather_folds(units, folds, ids, len(classes))
    fold_rows = [{"fold": f + 1, "reused": unit.reused, "key": unit.key, "rows": int((folds == f).sum()),
                  "chosen_epochs": unit.record["chosen_epochs"], **evaluate(labels[folds == f], p.valid_probs)}
                 for f, (unit, p) in enumerate(zip(units, each))]
    return Predictions(list(ids), labels, oof, each[-1].test_ids, fold_test.mean(axis=0)), fold_rows, fold_test


def gather_folds(units: list, folds, ids, n_classes: int):
    """The fold models' predictions put together: fold f's unit (`units[f]`) predicted the rows of fold f.

    Args:
        units: one stored unit per fold, in fold order, each folder holding predictions.
        folds: each split row's fold.
        ids: the split's row ids.
        n_classes: the probabilities' width.

    Returns:
        (the out-of-fold probabilities of every row in split order, the fold models' test probabilities
        (folds, test rows, classes), each unit's `Predictions`).

    Raises:
        PipelineError: a unit whose held-out rows are not its fold's.
    """
    import numpy as np

    from pipeline.core.artifacts import SPLIT_FILE
    from pipeline.core.errors import PipelineError
    from pipeline.evaluation.predictions import load_predictions

    oof = np.zeros((len(ids), n_classes), np.float32)
    each = []
    for f, unit in enumerate(units):
        held_out = folds == f
        predictions = load_predictions(unit.folder)
        if list(predictions.valid_ids) != list(ids[held_out]):
            raise PipelineError(f"{unit.folder}: its held-out rows are not fold {f + 1}'s rows of {SPLIT_FILE}")
        oof[held_out] = predictions.valid_probs
        each.append(predictions)
    return oof, np.stack([p.test_probs for p in each]), each

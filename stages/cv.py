"""cv: one model per fold of the split, each predicting only the fold it never saw: an out-of-fold score.

One held-out split of a few State Farm drivers is a noisy estimate of the leaderboard; every
training row predicted by a model that never saw it (out-of-fold, OOF) is the estimate top teams
trusted. Needs `split.strategy: kfold` or `group_kfold` (by driver for State Farm), at least 3 folds.

Recipe: for fold f of F, with g = f + 1 (mod F): reuse the fold's model if one with the same rows
on each side, upstream features, recipe settings, code and seed was trained before (folds are
units of the run cache, `work/COMP/_runs/cv-folds/KEY/`), else
  1. choose its epochs without fold f: train `cv.source`'s recipe (finetune's, or finetune's then
     bnretrain's, or a head then its backbone fine-tuned on the images: tune's) on the folds other
     than f and g, keeping the best epoch of each step by fold g's loss;
  2. train on every fold but f for exactly those epochs of the same schedule (nothing selected on
     any row), then predict fold f (with its TTA passes when the recipe uses `tta`) and the test rows
-> the OOF probabilities cover every training row once (written as the `valid` rows, in split
order), the test probabilities are the mean of the F fold models (each fold model's own are kept
too, `fold_test_probs.npy`, for students taught fold by fold in `pseudo`) -> the manifest and `kp status`
report the OOF log loss and accuracy, each fold's, and their mean / min / max; `validation` says
`cvF-oof`, which submit and the ledger carry.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipeline.core.artifacts import FOLD_TEST_FILE, PREDICTION_FILES, SPLIT_FILE, TOP_LOSSES_PLOT
from pipeline.core.errors import PipelineError
from pipeline.core.readers import read_table
from pipeline.core.settings import StrictModel
from pipeline.core.stage import Predicts, Stage, StageContext
from pipeline.evaluation.mistakes import MISTAKES_READS
from pipeline.training.recipes import NAMES, needs_of, steps_of

FOLD_STRATEGIES = ("kfold", "group_kfold")


class Settings(StrictModel):
    """The `cv` section: one model per fold of split.strategy kfold | group_kfold, each predicting the fold it never saw."""

    source: Literal[NAMES] = Field("finetune", description=(
        "the recipe each fold's model follows: finetune | bnretrain | tune (a head by tune.source's recipe, then "
        "its backbone fine-tuned on the fold's images; as ensemble.source)"))
    seed: int = Field(0, ge=0, description="every fold's model trains with this seed")


def run(ctx: StageContext) -> dict:
    import numpy as np

    from pipeline.core.executor import UnitItem
    from pipeline.data.features import label_indices, read_rows
    from pipeline.evaluation.metrics import evaluate
    from pipeline.evaluation.mistakes import write_mistakes
    from pipeline.evaluation.predictions import Predictions, load_predictions, save_fold_test, save_predictions
    from pipeline.training.cross_validation import Fold, train_fold
    from pipeline.training.recipes import check_steps

    s = ctx.settings
    strategy = ctx.config.get("split.strategy")
    if strategy not in FOLD_STRATEGIES:
        raise PipelineError(f"cv trains one model per fold, but split.strategy is {strategy!r}: set it to kfold or "
                            "group_kfold (by driver for State Farm)")
    split = read_table(ctx.input("split") / SPLIT_FILE, dtype={"id": str})
    folds = split["fold"].to_numpy()
    n_folds = int(folds.max()) + 1
    if n_folds < 3:
        raise PipelineError(f"cv chooses each fold's epochs on another fold, so it needs at least 3 folds; "
                            f"split.folds is {n_folds}")
    steps = steps_of(s.source, ctx.config)
    check_steps(steps, ctx.config)
    classes = ctx.config.competition.classes
    labels = label_indices(read_rows(ctx.input("precompute"), "train")["label"], classes)
    ids = split["id"].to_numpy()
    items = []
    for f in range(n_folds):
        g = (f + 1) % n_folds
        held_out, selection = folds == f, folds == g
        rows = {"train": sorted(ids[~held_out & ~selection]), "selection": sorted(ids[selection]),
                "held_out": sorted(ids[held_out])}
        items.append(UnitItem(f"fold {f + 1}/{n_folds} (epochs chosen on fold {g + 1})",
                              {"source": s.source, "seed": s.seed, "rows": rows},
                              (steps, Fold(f, g, held_out, selection, rows), s.seed, f"fold {f + 1}/{n_folds}")))
    # a fold's model depends on its rows, not on how the other folds are cut: its key lists its rows instead of split's
    units = ctx.map_units("folds", train_fold, items, "cv folds", recipes=steps, upstream=needs_of(steps, ctx.config),
                          keyed_by_item=("split",), resumable=True)
    oof = np.zeros((len(ids), len(classes)), np.float32)
    test_probs, fold_rows = [], []
    for f, unit in enumerate(units):
        held_out = folds == f
        predictions = load_predictions(unit.folder)
        if list(predictions.valid_ids) != list(ids[held_out]):
            raise PipelineError(f"{unit.folder}: its held-out rows are not fold {f + 1}'s rows of {SPLIT_FILE}")
        oof[held_out] = predictions.valid_probs
        test_probs.append(predictions.test_probs)
        fold_rows.append({"fold": f + 1, "reused": unit.reused, "key": unit.key, "rows": int(held_out.sum()),
                          "chosen_epochs": unit.record["chosen_epochs"],
                          **evaluate(labels[held_out], predictions.valid_probs)})

    out_of_fold = Predictions(list(ids), labels, oof, predictions.test_ids, np.mean(test_probs, axis=0))
    save_predictions(ctx.out, out_of_fold)
    save_fold_test(ctx.out, np.stack(test_probs))
    losses = [r["val_log_loss"] for r in fold_rows]
    return {
        "source": s.source,
        "validation": f"cv{n_folds}-oof",
        "folds": n_folds,
        "trained": sum(not r["reused"] for r in fold_rows),
        **evaluate(labels, oof),
        "fold_val_log_loss_mean": round(float(np.mean(losses)), 5),
        "fold_val_log_loss_min": round(float(np.min(losses)), 5),
        "fold_val_log_loss_max": round(float(np.max(losses)), 5),
        "fold_runs": fold_rows,
        **write_mistakes(ctx.config, ctx.input("download"), out_of_fold, ctx.out, f"{ctx.comp} cv out of fold"),
    }


def headline(m: dict) -> str:
    return (f"{m['source']} x {m['folds']} folds: OOF log loss {m['val_log_loss']:.4f} (folds {m['fold_val_log_loss_min']:.3f}"
            f"-{m['fold_val_log_loss_max']:.3f}), accuracy {m['val_accuracy']:.4f}")


STAGE = Stage(
    name="cv",
    settings=Settings,
    run=run,
    needs=("download", "precompute", "split"),
    reads=("split.strategy", *MISTAKES_READS),
    outs=(*PREDICTION_FILES, FOLD_TEST_FILE, TOP_LOSSES_PLOT),
    headline=headline,
    extra_needs=lambda config: needs_of(steps_of(config.section("cv").source, config), config),
    recipes=lambda config: steps_of(config.section("cv").source, config),
    predicts=Predicts(models=("folds", "fold_runs"), recipe=lambda config: config.get("cv.source"), out_of_fold=True),
)

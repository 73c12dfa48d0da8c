"""cv: one model per fold of the split, each predicting only the fold it never saw: an out-of-fold score.

One held-out split of a few State Farm drivers is a noisy estimate of the leaderboard; every
training row predicted by a model that never saw it (out-of-fold, OOF) is the estimate top teams
trusted. Needs `split.strategy: kfold` or `group_kfold` (by driver for State Farm), at least 3 folds
(2 with `cv.epochs: schedule`).

Recipe: for fold f of F, with g = f + 1 (mod F): reuse the fold's model if one with the same rows
on each side, upstream features, recipe settings, code and seed was trained before (folds are
units of the run cache, `work/COMP/_runs/cv-folds/KEY/`), else
  1. choose its epochs without fold f: train `cv.source`'s recipe (finetune's, or finetune's then
     bnretrain's, or a head then its backbone fine-tuned on the images: tune's) on the folds other
     than f and g, keeping the best epoch of each step by fold g's loss (`cv.epochs: schedule`: no
     choice, every epoch of each step's schedule);
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

from pipeline.core.artifacts import FOLD_TEST_FILE, PREDICTION_FILES, TOP_LOSSES_PLOT
from pipeline.core.settings import StrictModel
from pipeline.core.stage import Predicts, Stage, StageContext
from pipeline.evaluation.mistakes import MISTAKES_READS
from pipeline.training.recipes import NAMES, needs_of, steps_of


class Settings(StrictModel):
    """The `cv` section: one model per fold of split.strategy kfold | group_kfold, each predicting the fold it never saw."""

    source: Literal[NAMES] = Field("finetune", description=(
        "the recipe each fold's model follows: finetune | bnretrain | tune (a head by tune.source's recipe, then "
        "its backbone fine-tuned on the fold's images; as ensemble.source)"))
    seed: int = Field(0, ge=0, description="every fold's model trains with this seed")
    epochs: Literal["chosen", "schedule"] = Field("chosen", description=(
        "chosen: each fold's epochs chosen on the next fold by a selection model trained first | schedule: every "
        "epoch of the recipe's schedule, the last kept (half the training; for schedules that end at a low rate)"))


def run(ctx: StageContext) -> dict:
    import numpy as np

    from pipeline.evaluation.metrics import evaluate
    from pipeline.evaluation.mistakes import write_mistakes
    from pipeline.evaluation.predictions import save_fold_test, save_predictions
    from pipeline.training.cross_validation import cross_validate

    s = ctx.settings
    out_of_fold, fold_rows, fold_test = cross_validate(ctx, steps_of(s.source, ctx.config), s.source, s.seed, "cv",
                                                      choose_epochs=s.epochs == "chosen")
    save_predictions(ctx.out, out_of_fold)
    save_fold_test(ctx.out, fold_test)
    losses = [r["val_log_loss"] for r in fold_rows]
    return {
        "source": s.source,
        "validation": f"cv{len(fold_rows)}-oof",
        "folds": len(fold_rows),
        "trained": sum(not r["reused"] for r in fold_rows),
        **evaluate(out_of_fold.valid_labels, out_of_fold.valid_probs),
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

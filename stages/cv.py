"""cv: one model per fold of the split, each predicting only the fold it never saw: an out-of-fold score.

One held-out split of a few State Farm drivers is a noisy estimate of the leaderboard; every
training row predicted by a model that never saw it (out-of-fold, OOF) is the estimate top teams
trusted. Needs `split.strategy: kfold` or `group_kfold` (by driver for State Farm), at least 3 folds.

Recipe: for fold f of F, with g = f + 1 (mod F): reuse the fold's model if one with the same rows
on each side, upstream features, recipe settings, code and seed was trained before (folds are
units of the run cache, `work/COMP/_runs/cv-folds/KEY/`), else
  1. choose its epochs without fold f: train `cv.source`'s recipe (finetune's, or finetune's then
     bnretrain's) on the folds other than f and g, keeping the best epoch by fold g's loss;
  2. train on every fold but f for exactly those epochs of the same schedule (nothing selected on
     any row), then predict fold f (with its TTA passes when the recipe uses `tta`) and the test rows
-> the OOF probabilities cover every training row once (written as the `valid` rows, in split
order), the test probabilities are the mean of the F fold models (each fold model's own are kept
too, `fold_test_probs.npy`, for students taught fold by fold in `pseudo`) -> the manifest and `kp status`
report the OOF log loss and accuracy, each fold's, and their mean / min / max; `validation` says
`cvF-oof`, which submit and the ledger carry.
"""
from __future__ import annotations

import functools
import json
from typing import Literal

from pydantic import Field

from pipeline.core.artifacts import FOLD_TEST_FILE, MEMBER_FILE, PREDICTION_FILES, SPLIT_FILE, TOP_LOSSES_PLOT
from pipeline.core.cache import fingerprint
from pipeline.core.errors import PipelineError
from pipeline.core.executor import Unit, say
from pipeline.core.stage import Stage, StageContext, StrictModel
from stages.finetune import PREDICTING_NEEDS, RECIPES, TRAINING_READS, recipe_sections, uses_passes

FOLD_STRATEGIES = ("kfold", "group_kfold")
SELECTION_DIR = "selection"  # inside a fold's unit: the model that chose the epochs


class Settings(StrictModel):
    source: Literal[RECIPES]
    seed: int = Field(ge=0)


def fold_key(ctx: StageContext, ids_by_side: dict) -> str:
    """A fold's model depends on its rows (not on how the other folds are cut), the features, the
    recipe settings, the code and the seed."""
    inputs = ctx.fingerprint_inputs
    unused = {"split.strategy"} | ({"bnretrain"} if ctx.settings.source == "finetune" else set())
    config = {key: value for key, value in inputs["config"].items() if key not in unused}
    upstream = {name: value for name, value in inputs["upstream"].items() if name != "split"}
    return fingerprint({"upstream": upstream, "config": config, "code": inputs["code"], "rows": ids_by_side})


def run(ctx: StageContext) -> dict:
    import numpy as np
    import pandas as pd

    from pipeline.data.features import label_indices, read_rows
    from pipeline.evaluation.metrics import evaluate
    from pipeline.evaluation.mistakes import write_mistakes
    from pipeline.evaluation.predictions import Predictions, load_predictions, save_fold_test, save_predictions

    s = ctx.settings
    strategy = ctx.config.get("split.strategy")
    if strategy not in FOLD_STRATEGIES:
        raise PipelineError(f"cv trains one model per fold, but split.strategy is {strategy!r}: set it to kfold or "
                            "group_kfold (by driver for State Farm)")
    split = pd.read_csv(ctx.input("split") / SPLIT_FILE, dtype={"id": str})
    folds = split["fold"].to_numpy()
    n_folds = int(folds.max()) + 1
    if n_folds < 3:
        raise PipelineError(f"cv chooses each fold's epochs on another fold, so it needs at least 3 folds; "
                            f"split.folds is {n_folds}")
    if s.source == "bnretrain":
        from stages.bnretrain import check_dense_head

        check_dense_head(ctx.config)
    classes = ctx.config.competition.classes
    labels = label_indices(read_rows(ctx.input("precompute"), "train")["label"], classes)
    ids = split["id"].to_numpy()
    plans = []
    for f in range(n_folds):
        g = (f + 1) % n_folds
        held_out, selection = folds == f, folds == g
        rows = {"train": sorted(ids[~held_out & ~selection]), "selection": sorted(ids[selection]),
                "held_out": sorted(ids[held_out])}
        plans.append((f, g, held_out, selection, rows, fold_key(ctx, rows)))
    units = [Unit(key, f"fold {f + 1}/{n_folds} (epochs chosen on fold {g + 1})",
                  functools.partial(train_fold, ctx.config, ctx.inputs, f, g, held_out, selection, rows,
                                    f"{ctx.comp} fold {f + 1}"))
             for f, g, held_out, selection, rows, key in plans]
    trained = set(ctx.compute_units("folds", units, "cv folds"))
    store = ctx.units("folds")
    oof = None
    test_probs, fold_rows = [], []
    for f, g, held_out, selection, rows, key in plans:
        reused = key not in trained
        record = json.loads((store.path(key) / MEMBER_FILE).read_text())
        predictions = load_predictions(store.path(key))
        if list(predictions.valid_ids) != list(ids[held_out]):
            raise PipelineError(f"{store.path(key)}: its held-out rows are not fold {f + 1}'s rows of {SPLIT_FILE}")
        if oof is None:
            oof = np.zeros((len(ids), predictions.valid_probs.shape[1]), np.float32)
        oof[held_out] = predictions.valid_probs
        test_probs.append(predictions.test_probs)
        fold_rows.append({"fold": f + 1, "reused": reused, "key": key, "rows": int(held_out.sum()),
                          "chosen_epochs": record["chosen_epochs"], **evaluate(labels[held_out], predictions.valid_probs)})

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


def train_fold(config, inputs: dict, f: int, g: int, held_out, selection, rows: dict, title: str, out) -> None:
    """Fold f's model into `out` (here or on a Ray worker): its epochs chosen on fold g (a model trained
    on the other folds, kept in `out/selection/`), then trained on every fold but f for exactly those
    epochs and predicting fold f; its record (epochs, rows, scores) in `member.json`."""
    from pipeline.training.recipe import load_recipe_data, train_recipe

    s, sections = config.section("cv"), recipe_sections(config, config.section("cv").source)
    (out / SELECTION_DIR).mkdir()
    chosen = train_recipe(config, s.source, load_recipe_data(config, inputs, sections, (~held_out & ~selection, selection)),
                          s.seed, out / SELECTION_DIR, say, say, title=f"{title} selection")
    epochs = ({"finetune": chosen["best_epoch"]} if s.source == "finetune" else
              {"finetune": chosen["finetune_best_epoch"], "bnretrain": chosen["best_epoch"]})
    final = train_recipe(config, s.source, load_recipe_data(config, inputs, sections, (~held_out, held_out)),
                         s.seed, out, say, say, title=title, stop_after=epochs)
    record = {**final, "fold": f + 1, "selection_fold": g + 1, "chosen_epochs": epochs, "rows": rows,
              "selection_val_log_loss": chosen["val_log_loss"]}
    (out / MEMBER_FILE).write_text(json.dumps(record, indent=2) + "\n")


def headline(m: dict) -> str:
    return (f"{m['source']} x {m['folds']} folds: OOF log loss {m['val_log_loss']:.4f} (folds {m['fold_val_log_loss_min']:.3f}"
            f"-{m['fold_val_log_loss_max']:.3f}), accuracy {m['val_accuracy']:.4f}")


STAGE = Stage(
    name="cv",
    settings=Settings,
    run=run,
    needs=PREDICTING_NEEDS,
    reads=("finetune", "bnretrain", "split.strategy", *TRAINING_READS),
    outs=(*PREDICTION_FILES, FOLD_TEST_FILE, TOP_LOSSES_PLOT),
    headline=headline,
    extra_needs=lambda config: ("augment",) if any(
        map(uses_passes, recipe_sections(config, config.section("cv").source).values())) else (),
)

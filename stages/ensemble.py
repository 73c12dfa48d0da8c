"""ensemble: train N copies of the model, identical but for their seed, and average them.

Recipe: for member i in 0..n-1, seed = `ensemble.seed` + i: reuse the member if one with the same
upstream data, model, training settings, code and seed was trained before (members are units of
the run cache, `work/COMP/_runs/ensemble-members/KEY/`, so raising n from 5 to 8 trains only 3),
else train it with the recipe `ensemble.source` names: finetune's, or finetune's followed by
bnretrain's (each with its own `augmented` / `tta` settings) -> average the members' probabilities
on the validation and test rows -> report each member's validation accuracy and log loss, the
average's, and the gain of the average over the mean member (manifest, `kp status`, `members.png`).
"""
from __future__ import annotations

import json
from typing import Literal

from pydantic import Field

from pipeline.core.artifacts import MEMBERS_PLOT, MEMBER_FILE, PREDICTION_FILES, TOP_LOSSES_PLOT
from pipeline.core.cache import fingerprint
from pipeline.core.stage import Stage, StageContext, StrictModel
from stages.finetune import PREDICTING_NEEDS, RECIPES, TRAINING_READS, recipe_sections, uses_passes


class Settings(StrictModel):
    n: int = Field(ge=1)
    seed: int
    source: Literal[RECIPES]


def member_key(ctx: StageContext, seed: int) -> str:
    """Everything a member depends on, except how many members there are (and, for finetune
    members, the bnretrain settings they never use)."""
    inputs = ctx.fingerprint_inputs
    unused = {"ensemble"} | ({"bnretrain"} if ctx.settings.source == "finetune" else set())
    config = {key: value for key, value in inputs["config"].items() if key not in unused}
    return fingerprint({"upstream": inputs["upstream"], "config": config, "code": inputs["code"],
                        "source": ctx.settings.source, "member_seed": seed})


def run(ctx: StageContext) -> dict:
    import numpy as np

    from pipeline.evaluation.metrics import evaluate
    from pipeline.evaluation.mistakes import write_mistakes
    from pipeline.evaluation.plots import plot_members
    from pipeline.evaluation.predictions import Predictions, load_predictions, save_predictions
    from pipeline.training.recipe import load_recipe_data, train_recipe

    data = load_recipe_data(ctx.config, ctx.inputs, recipe_sections(ctx.config, ctx.settings.source))
    if ctx.settings.source == "bnretrain":
        from stages.bnretrain import check_dense_head

        check_dense_head(ctx.config)
    store = ctx.units("members")
    members, predictions = [], []
    for i in range(ctx.settings.n):
        seed = ctx.settings.seed + i
        key = member_key(ctx, seed)
        reused = store.has(key)
        if reused:
            metrics = json.loads((store.path(key) / MEMBER_FILE).read_text())
            store.touch(key)
            ctx.log(f"member {i + 1}/{ctx.settings.n} (seed {seed}): reused from {store.path(key)}")
        else:
            ctx.log(f"member {i + 1}/{ctx.settings.n} (seed {seed}): training")
            with store.write(key) as tmp:
                metrics = train_recipe(ctx.config, ctx.settings.source, data, seed, tmp, ctx.log, ctx.warn,
                                       title=f"{ctx.comp} member {i + 1}")
                (tmp / MEMBER_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
        members.append({"member": i + 1, "seed": seed, "reused": reused, "key": key,
                        "val_log_loss": metrics["val_log_loss"], "val_accuracy": metrics["val_accuracy"]})
        predictions.append(load_predictions(store.path(key)))

    valid = np.mean([p.valid_probs for p in predictions], axis=0)
    test = np.mean([p.test_probs for p in predictions], axis=0)
    rows = data["finetune"]
    averaged = Predictions(rows.valid_ids, rows.y_valid, valid, rows.test_ids, test)
    save_predictions(ctx.out, averaged)
    mean_loss = float(np.mean([m["val_log_loss"] for m in members]))
    mean_accuracy = float(np.mean([m["val_accuracy"] for m in members]))
    result = {
        "n": len(members),
        "source": ctx.settings.source,
        "trained": sum(not m["reused"] for m in members),
        **evaluate(rows.y_valid, valid),
        "mean_member_val_log_loss": round(mean_loss, 5),
        "mean_member_val_accuracy": round(mean_accuracy, 5),
        "members": members,
    }
    result["log_loss_gain"] = round(mean_loss - result["val_log_loss"], 5)
    result["accuracy_gain"] = round(result["val_accuracy"] - mean_accuracy, 5)
    plot_members(members, result, ctx.out / MEMBERS_PLOT, title=f"{ctx.comp}: {len(members)}-member ensemble")
    return {**result, **write_mistakes(ctx.config, ctx.input("download"), averaged, ctx.out, f"{ctx.comp} ensemble")}


def headline(m: dict) -> str:
    return (f"{m.get('source', 'finetune')} x {m['n']}: val log loss {m['val_log_loss']:.4f} "
            f"(mean member {m['mean_member_val_log_loss']:.4f}), accuracy {m['val_accuracy']:.4f} "
            f"(mean member {m['mean_member_val_accuracy']:.4f})")


STAGE = Stage(
    name="ensemble",
    settings=Settings,
    run=run,
    needs=PREDICTING_NEEDS,
    reads=("finetune", "bnretrain", *TRAINING_READS),
    outs=(*PREDICTION_FILES, MEMBERS_PLOT, TOP_LOSSES_PLOT),
    headline=headline,
    extra_needs=lambda config: ("augment",) if any(
        map(uses_passes, recipe_sections(config, config.section("ensemble").source).values())) else (),
)

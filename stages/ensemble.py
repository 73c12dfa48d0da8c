"""ensemble: train N copies of the model, identical but for their seed, and average them.

Recipe: for member i in 0..n-1, seed = `ensemble.seed` + i: reuse the member if one with the same
upstream data, model, training settings, code and seed was trained before (members are units of
the run cache, `work/COMP/_runs/ensemble-members/KEY/`, so raising n from 5 to 8 trains only 3),
else train it from nothing with the recipe `ensemble.source` names
(`pipeline.training.recipes`): finetune's, or finetune's followed by bnretrain's (each with its own
`augmented` / `tta` settings), or tune's (a head by `tune.source`'s recipe, then its backbone
fine-tuned end to end on the images; a killed member resumes from its last epoch) -> average the members' probabilities
on the validation and test rows -> report each member's validation accuracy and log loss, the
average's, and the gain of the average over the mean member (manifest, `kp status`, `members.png`).
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipeline.core.artifacts import MEMBERS_PLOT, PREDICTION_FILES, TOP_LOSSES_PLOT
from pipeline.core.settings import StrictModel
from pipeline.core.stage import Predicts, Stage, StageContext
from pipeline.evaluation.mistakes import MISTAKES_READS
from pipeline.training.recipes import NAMES, needs_of, steps_of


class Settings(StrictModel):
    """The `ensemble` section: N copies of the model, identical but for their seed, averaged."""

    n: int = Field(5, ge=1, description="members; each is cached, so raising n trains only the new ones")
    seed: int = Field(1000, description="member i trains with seed + i")
    source: Literal[NAMES] = Field("finetune", description=(
        "the recipe members follow: finetune | bnretrain (finetune's, then bnretrain's on its head)"))


def run(ctx: StageContext) -> dict:
    import numpy as np

    from pipeline.core.executor import UnitItem
    from pipeline.evaluation.metrics import evaluate
    from pipeline.evaluation.mistakes import write_mistakes
    from pipeline.evaluation.plots import plot_members
    from pipeline.evaluation.predictions import Predictions, load_predictions, save_predictions
    from pipeline.training.recipes import TrainingRun, check_steps, load_steps, train_unit

    s = ctx.settings
    steps = steps_of(s.source, ctx.config)
    check_steps(steps, ctx.config)
    data = None if ctx.on_ray else load_steps(ctx.config, steps, ctx.inputs)  # Ray workers load their own
    items = [UnitItem(f"member {i + 1}/{s.n} (seed {s.seed + i})", {"seed": s.seed + i},
                      (steps, data, None, TrainingRun(s.seed + i, f"member {i + 1}/{s.n} (seed {s.seed + i})")))
             for i in range(s.n)]
    units = ctx.map_units("members", train_unit, items, "ensemble members", recipes=steps,
                          upstream=needs_of(steps, ctx.config), resumable=True)
    members = [{"member": i + 1, "seed": s.seed + i, "reused": unit.reused, "key": unit.key,
                "val_log_loss": unit.record["val_log_loss"], "val_accuracy": unit.record["val_accuracy"]}
               for i, unit in enumerate(units)]
    predictions = [load_predictions(unit.folder) for unit in units]
    valid = np.mean([p.valid_probs for p in predictions], axis=0)
    test = np.mean([p.test_probs for p in predictions], axis=0)
    first = predictions[0]
    averaged = Predictions(first.valid_ids, first.valid_labels, valid, first.test_ids, test)
    save_predictions(ctx.out, averaged)
    mean_loss = float(np.mean([m["val_log_loss"] for m in members]))
    mean_accuracy = float(np.mean([m["val_accuracy"] for m in members]))
    result = {
        "n": len(members),
        "source": s.source,
        "trained": sum(not m["reused"] for m in members),
        **evaluate(first.valid_labels, valid),
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
    needs=("download", "precompute", "split"),
    reads=MISTAKES_READS,
    outs=(*PREDICTION_FILES, MEMBERS_PLOT, TOP_LOSSES_PLOT),
    headline=headline,
    extra_needs=lambda config: needs_of(steps_of(config.section("ensemble").source, config), config),
    recipes=lambda config: steps_of(config.section("ensemble").source, config),
    predicts=Predicts(models=("members", "members"), recipe=lambda config: config.get("ensemble.source")),
)

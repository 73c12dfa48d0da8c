"""ensemble: train N copies of the model, identical but for their seed, and average them.

Recipe: for member i in 0..n-1, seed = `ensemble.seed` + i: reuse the member if one with the same
upstream data, model, training settings, code and seed was trained before (members are units of
the run cache, `work/COMP/_runs/ensemble-members/KEY/`, so raising n from 5 to 8 trains only 3),
else train it with the recipe `ensemble.source` names: finetune's, or finetune's followed by
bnretrain's (each with its own `augmented` / `tta` settings), or tune's (a head by `tune.source`'s
recipe, then its backbone fine-tuned end to end on the images; a killed member resumes from its
last epoch, see the tune stage) -> average the members' probabilities
on the validation and test rows -> report each member's validation accuracy and log loss, the
average's, and the gain of the average over the mean member (manifest, `kp status`, `members.png`).
"""
from __future__ import annotations

import functools
import json
import shutil
from typing import Literal

from pydantic import Field

from pipeline.core.artifacts import MEMBERS_PLOT, MEMBER_FILE, PREDICTION_FILES, TOP_LOSSES_PLOT
from pipeline.core.cache import fingerprint
from pipeline.core.executor import Unit, say
from pipeline.core.stage import Stage, StageContext, StrictModel
from stages.finetune import PREDICTING_NEEDS, RECIPES, TRAINING_READS, recipe_sections, uses_passes
from stages.tune import RECIPE_READS, backup_dir


MEMBER_RECIPES = (*RECIPES, "tune")  # tune: a head by tune.source's recipe, then fine-tuned end to end
TUNE_READS = ("tune", *RECIPE_READS)  # what tune members read besides the head's recipe


class Settings(StrictModel):
    n: int = Field(ge=1)
    seed: int
    source: Literal[MEMBER_RECIPES]


def head_recipe(config) -> str:
    """The recipe a member's head follows: `ensemble.source`, or for tune members `tune.source`."""
    source = config.section("ensemble").source
    return config.get("tune.source") if source == "tune" else source


def member_key(ctx: StageContext, seed: int) -> str:
    """Everything a member depends on, except how many members there are (and the settings of the
    recipes it does not follow: bnretrain's for finetune heads, tune's for members that are not tuned)."""
    inputs = ctx.fingerprint_inputs
    unused = ({"ensemble"} | ({"bnretrain"} if head_recipe(ctx.config) == "finetune" else set())
              | (set() if ctx.settings.source == "tune" else set(TUNE_READS) - set(TRAINING_READS)))
    config = {key: value for key, value in inputs["config"].items() if key not in unused}
    return fingerprint({"upstream": inputs["upstream"], "config": config, "code": inputs["code"],
                        "source": ctx.settings.source, "member_seed": seed})


def run(ctx: StageContext) -> dict:
    import numpy as np

    from pipeline.evaluation.metrics import evaluate
    from pipeline.evaluation.mistakes import write_mistakes
    from pipeline.evaluation.plots import plot_members
    from pipeline.evaluation.predictions import Predictions, load_predictions, save_predictions
    from pipeline.training.recipe import load_recipe_data

    data = load_recipe_data(ctx.config, ctx.inputs, recipe_sections(ctx.config, head_recipe(ctx.config)))
    if head_recipe(ctx.config) == "bnretrain":
        from stages.bnretrain import check_dense_head

        check_dense_head(ctx.config)
    seeds = [ctx.settings.seed + i for i in range(ctx.settings.n)]
    keys = [member_key(ctx, seed) for seed in seeds]
    preloaded = None if ctx.on_ray else data  # Ray workers load their own
    units = [Unit(key, f"member {i + 1}/{ctx.settings.n} (seed {seed})",
                  functools.partial(train_member, ctx.config, ctx.inputs, seed, key, ctx.work_dir,
                                    f"{ctx.comp} member {i + 1}", preloaded))
             for i, (seed, key) in enumerate(zip(seeds, keys))]
    trained = set(ctx.compute_units("members", units, "ensemble members"))
    store = ctx.units("members")
    members, predictions = [], []
    for i, (seed, key) in enumerate(zip(seeds, keys)):
        metrics = json.loads((store.path(key) / MEMBER_FILE).read_text())
        members.append({"member": i + 1, "seed": seed, "reused": key not in trained, "key": key,
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


def train_member(config, inputs: dict, seed: int, key: str, work_dir, title: str, data, out) -> None:
    """One member into `out` (here or on a Ray worker): `ensemble.source`'s recipe with `seed`, its
    metrics in `member.json`. `data`: the recipe's rows, or None to load them here (a worker)."""
    from pipeline.training.recipe import load_recipe_data, train_recipe

    if data is None:
        data = load_recipe_data(config, inputs, recipe_sections(config, head_recipe(config)))
    if config.section("ensemble").source == "tune":
        from pipeline.data.image_rows import load_split_images
        from pipeline.training.tune import train_tuned_member

        images = load_split_images(inputs["download"], inputs["split"], config.competition.classes)
        backup = backup_dir(work_dir, "ensemble", key)
        metrics = train_tuned_member(config, data, images, seed, out, backup, say, say, title)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        metrics = train_recipe(config, config.section("ensemble").source, data, seed, out, say, say, title=title)
    (out / MEMBER_FILE).write_text(json.dumps(metrics, indent=2) + "\n")


def headline(m: dict) -> str:
    return (f"{m.get('source', 'finetune')} x {m['n']}: val log loss {m['val_log_loss']:.4f} "
            f"(mean member {m['mean_member_val_log_loss']:.4f}), accuracy {m['val_accuracy']:.4f} "
            f"(mean member {m['mean_member_val_accuracy']:.4f})")


STAGE = Stage(
    name="ensemble",
    settings=Settings,
    run=run,
    needs=PREDICTING_NEEDS,
    reads=("finetune", "bnretrain", *TRAINING_READS, *TUNE_READS),
    outs=(*PREDICTION_FILES, MEMBERS_PLOT, TOP_LOSSES_PLOT),
    headline=headline,
    extra_needs=lambda config: ("augment",) if any(
        map(uses_passes, recipe_sections(config, head_recipe(config)).values())) else (),
)

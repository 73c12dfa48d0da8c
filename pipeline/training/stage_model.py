"""The one model a finetune, bnretrain or tune stage trains: a unit of the run cache, drawn in the stage's folder.

The model is trained by `pipeline.training.recipes.fit_step` as a unit (`StageContext.map_units`),
keyed by the recipe's settings, the upstream stages it reads and the recipe's code: rerunning the
stage for any other reason (a plot's or a headline's edit) reuses it and only redraws.
"""
from __future__ import annotations

from pipeline.core.stage import StageContext


def train_stage_model(ctx: StageContext, step, start: str | None, seed: int) -> dict:
    """Train (or reuse) the stage's model by `step` from the upstream stage `start`'s model (None: from
    nothing), then link its files into the stage's folder and draw them.

    Args:
        ctx: the running stage.
        step: the `Recipe` to run.
        start: the upstream stage whose trained model it starts from, or None.
        seed: the model's seed.

    Returns:
        The unit's record, `reused`, and the worst mistakes (`write_model_outputs`).
    """
    from pipeline.core.executor import UnitItem
    from pipeline.evaluation.model_outputs import write_model_outputs
    from pipeline.training.recipes import fit_step

    step.check(ctx.config)
    upstream = tuple(dict.fromkeys([*step.needs_for(ctx.config), *([start] if start else [])]))
    item = UnitItem(f"{ctx.stage.name} model", {"seed": seed, "start": start}, (step, start, seed, ctx.stage.name))
    [unit] = ctx.map_units("model", fit_step, [item], ctx.stage.name, recipes=(step,), upstream=upstream,
                           resumable=True)
    return {**unit.record, "reused": unit.reused,
            **write_model_outputs(ctx.config, unit.folder, unit.record, ctx.out, ctx.input("download"),
                                  f"{ctx.comp} {ctx.stage.name}")}

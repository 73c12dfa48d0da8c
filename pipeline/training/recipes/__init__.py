"""The recipes by name, and the unit functions that run them.

Every way of training a model is one `Recipe` class in its own module here (`head`: a dense head
on precompute's features; `scratch`: a from-scratch model on pixels, the head recipe's stand-in for
one; `batchnorm`: a trained head with batchnorm inserted, retrained; `tuned`: a trained head back
on its backbone, fine-tuned end to end), registered by one line in `MODULES`.
Stages, ensemble members, cv folds, pseudo students and `kp lr-find` find recipes through `recipe`,
so no stage imports another stage and no stage compares recipe names. The modules are imported by
name only when a recipe is asked for: a stage's code is its own module plus the modules of the
recipes it runs (`Stage.recipes`), so editing one recipe makes stale only the stages that run it.
"""
from __future__ import annotations

import importlib
from dataclasses import replace
from pathlib import Path

from pipeline.core.config_reader import ConfigReader
from pipeline.core.errors import PipelineError
from pipeline.training.recipes.base import Recipe, TrainingRun, load_steps, train_steps

MODULES = {
    "finetune": "pipeline.training.recipes.head",
    "bnretrain": "pipeline.training.recipes.batchnorm",
    "tune": "pipeline.training.recipes.tuned",
    "scratch": "pipeline.training.recipes.scratch",  # finetune's recipe for a model on pixels (HeadRecipe.steps)
}
NAMES = ("finetune", "bnretrain", "tune")  # what a config may name (ensemble.source, ...)
HEAD_RECIPES = ("finetune", "bnretrain")  # recipes that train on cached rows (what tune and pseudo students start from)


def recipe(name: str) -> Recipe:
    """The recipe called `name` (its module's `RECIPE`)."""
    if name not in MODULES:
        raise PipelineError(f"unknown recipe {name!r}; expected one of {', '.join(NAMES)}")
    return importlib.import_module(MODULES[name]).RECIPE


def steps_of(name: str, config: ConfigReader) -> tuple[Recipe, ...]:
    """The recipes a model trained from nothing by `name` follows, in order (`Recipe.steps`)."""
    return recipe(name).steps(config)


def needs_of(steps: tuple[Recipe, ...], config: ConfigReader) -> tuple[str, ...]:
    """The upstream stages `steps` read, in a stable order."""
    return tuple(dict.fromkeys(name for step in steps for name in step.needs_for(config)))


def check_steps(steps: tuple[Recipe, ...], config: ConfigReader) -> None:
    """Each step's own check: one clear error for a config that cannot run them."""
    for step in steps:
        step.check(config)


def say(message: str) -> None:
    """A unit's log line, wherever it runs (`pipeline.core.executor.say`)."""
    from pipeline.core.executor import say as unit_say

    unit_say(message)


def collecting(warnings: list[str]):
    """A `warn` for a unit: prints the line and keeps it in `warnings` (the unit's record carries them)."""
    def warn(message: str) -> None:
        warnings.append(message)
        say(f"WARNING: {message}")
    return warn


def fit_step(config: ConfigReader, inputs: dict[str, Path], step: Recipe, start: str | None, seed: int, title: str,
             out: Path, backup: Path | None = None) -> dict:
    """A unit: one step of `step` into `out`, starting from the model of the upstream stage `start`
    (None: from nothing), on the split's rows (the finetune, bnretrain and tune stages' model).

    Returns:
        Its record, with the warnings it raised (`warnings`) for the stage's manifest.
    """
    warnings: list[str] = []
    data = step.load(config, inputs)
    run = TrainingRun(seed, title, backup=backup, log=say, warn=collecting(warnings), verbose=2)
    record = step.fit(config, data, inputs[start] if start else None, out, run)
    return {**record, "warnings": warnings}


def train_unit(config: ConfigReader, inputs: dict[str, Path], steps: tuple[Recipe, ...], data, sides, run: TrainingRun,
               out: Path, backup: Path | None = None) -> dict:
    """A unit: a model trained from nothing by `steps` into `out` (`train_steps`): an ensemble member, a
    student. `data`: the steps' rows when the driver loaded them, else None (a Ray worker loads its own);
    `sides`: (train, valid) row masks instead of the split's sides; `run`: its seed, title, epochs and
    teaching (its log and warn are the unit's)."""
    warnings: list[str] = []
    run = replace(run, backup=backup, log=say, warn=collecting(warnings))
    record = train_steps(config, steps, inputs, out, run, data=data, sides=sides)
    taught = {"taught": run.teaching.digest()} if run.teaching is not None else {}
    return {**record, **taught, "warnings": warnings}


__all__ = ["HEAD_RECIPES", "MODULES", "NAMES", "Recipe", "TrainingRun", "check_steps", "collecting", "fit_step",
           "load_steps", "needs_of", "recipe", "say", "steps_of", "train_steps", "train_unit"]

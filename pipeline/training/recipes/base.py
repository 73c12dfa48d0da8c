"""What a recipe is: one way of training a model, declared next to the code that runs it.

A `Recipe` names its config section and every other key its code reads (`keys`: what a stage or
unit that runs it hashes), the upstream stages whose outputs it reads (`needs_for`), the recipe
whose trained model it starts from (`previous`: bnretrain starts from finetune's head, tune from
`tune.source`'s), the rows it trains on (`load`) and one training step (`fit`: from the previous
step's model folder, or from nothing). `train_steps` chains the steps of a model trained from
nothing (an ensemble member, a fold model, a student); a stage that trains one step on an upstream
stage's model calls `fit` with that stage's folder. Recipes write models, histories, probabilities
and records; they draw nothing (the stages draw, so a plot's edit retrains nothing).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from pipeline.core.artifacts import MEMBER_HEAD_DIR
from pipeline.core.config_reader import ConfigReader


def printed(message: str) -> None:
    """Print a line: `TrainingRun`'s default log and warn (a module function, so a run pickles for Ray)."""
    print(message)


@dataclass(frozen=True)
class TrainingRun:
    """How one model is trained, beside its recipes' settings and rows: what `Recipe.fit` and
    `train_steps` are asked to do.

    seed: weight initialisation, shuffling, dropout and augmentation draws (every step's).
    title: names the model in messages.
    epochs: epochs per recipe name to train exactly, keeping the last and never looking at the
        validation rows (epochs chosen elsewhere); None: each step keeps its best epoch by validation loss.
    teaching: pseudo-labels every step trains on too (`teachable` recipes only).
    targets: (training rows, classes) probability rows the last step's training rows learn instead of
        their labels (a distilled student; `teachable` recipes only), or None.
    backup: a folder outside the model's where a resumable recipe backs up its epochs (the last step's).
    log, warn: print progress / a warning.
    verbose: 0: train silently; else one progress display of each step's epochs, titled `title`.
    """

    seed: int
    title: str = ""
    epochs: dict[str, int] | None = None
    teaching: Any = None
    targets: Any = None
    backup: Path | None = None
    log: Callable[[str], None] = printed
    warn: Callable[[str], None] = printed
    verbose: int = 2

    def stop_after(self, recipe_name: str) -> int | None:
        """The epochs recipe `recipe_name` trains exactly, or None: keep its best epoch."""
        return (self.epochs or {}).get(recipe_name)


class Recipe:
    """One way of training a model. Subclasses set the class attributes and implement `load` and `fit`."""

    name: str = ""  # how configs name it (`ensemble.source: bnretrain`)
    section: str = ""  # its settings' config section
    reads: tuple[str, ...] = ()  # other config keys its code reads
    needs: tuple[str, ...] = ()  # upstream stages whose outputs it reads
    teachable: bool = True  # can train on pseudo-labelled rows (`pipeline.training.pseudo.Teaching`)
    takes: str = "features"  # what its model is fed: precompute's feature rows | images (a whole network) | pixels

    @property
    def module(self) -> str:
        """The module whose code (and what it imports) is this recipe's: part of every key that runs it."""
        return type(self).__module__

    @property
    def keys(self) -> tuple[str, ...]:
        """The config keys its code reads: its section, then `reads`."""
        return (self.section, *self.reads)

    def settings(self, config: ConfigReader):
        """Its config section, typed (the pydantic model the owning stage declares)."""
        return config.section(self.section)

    def resolved(self, config: ConfigReader) -> "Recipe":
        """The recipe that really trains under `config`: this one, or one it hands over to (the head
        recipe to the scratch recipe for a model on pixels)."""
        return self

    def previous(self, config: ConfigReader) -> "Recipe | None":
        """The recipe whose trained model this one starts from; None: it starts from nothing."""
        return None

    def steps(self, config: ConfigReader) -> tuple["Recipe", ...]:
        """Every recipe a model trained from nothing by this one follows, in order, this one last."""
        before = self.previous(config)
        return (*(before.steps(config) if before else ()), self.resolved(config))

    def uses_passes(self, config: ConfigReader) -> bool:
        """Whether it reads augment's passes (so the stage running it needs `augment`)."""
        return False

    def needs_for(self, config: ConfigReader) -> tuple[str, ...]:
        """The upstream stages it reads under `config`."""
        return self.needs + (("augment",) if self.uses_passes(config) else ())

    def check(self, config: ConfigReader) -> None:
        """Raise one clear `PipelineError` when the config cannot use this recipe."""

    def data_key(self, config: ConfigReader) -> tuple:
        """Recipes whose `load` would return the same rows share one load (`load_steps`)."""
        return (self.name,)

    def load(self, config: ConfigReader, inputs: dict[str, Path], sides=None) -> Any:
        """The rows it trains on and predicts.

        Args:
            config: a config view that declares `keys`.
            inputs: upstream output folders by stage name (`needs_for`).
            sides: (train, valid) row masks over the split's rows instead of the split's sides.
        """
        raise NotImplementedError

    def fit(self, config: ConfigReader, data, start: Path | None, out: Path, run: TrainingRun) -> dict:
        """One training step into `out`: `model.keras`, `history.csv`, the probabilities; no plot.

        Args:
            config: a config view that declares `keys`.
            data: what `load` returned.
            start: the folder of the model it starts from (`previous`'s), or None.
            out: where its files go.
            run: its seed, title, epochs (`run.stop_after(self.name)`), teaching, backup, log and warn.

        Returns:
            Its record: validation scores, best epoch (1-based), epochs, timing, `arch`.
        """
        raise NotImplementedError

    def arch_after(self, arch: str) -> str:
        """How a model of `arch` is described once this step trained it."""
        return arch

    def scheduled_epochs(self, config: ConfigReader) -> int:
        """How many epochs its learning-rate schedule runs (all its phases)."""
        return sum(phase.epochs for phase in self.settings(config).phases)


def load_steps(config: ConfigReader, steps: tuple[Recipe, ...], inputs: dict[str, Path], sides=None) -> dict[str, Any]:
    """Each step's rows by recipe name, loaded once for steps that train on the same rows."""
    loaded, data = {}, {}
    for step in steps:
        key = step.data_key(config)
        if key not in loaded:
            loaded[key] = step.load(config, inputs, sides)
        data[step.name] = loaded[key]
    return data


def train_steps(config: ConfigReader, steps: tuple[Recipe, ...], inputs: dict[str, Path], out: Path, run: TrainingRun,
                *, data=None, sides=None) -> dict:
    """A model trained from nothing by `steps` (a recipe's `steps(config)`) into `out`; each earlier
    step's model is kept in the next one's `head/` folder (bnretrain's finetune head in `out/head/`).

    Args:
        config: a config view that declares every step's keys.
        steps: the recipes in order.
        inputs: upstream output folders by stage name.
        out: where the last step's files go.
        run: how the model is trained (its backup is the last step's).
        data: each step's rows by recipe name (`load_steps`); None: loaded here.
        sides: (train, valid) row masks instead of the split's sides.

    Returns:
        The last step's record, with `best_epochs` (1-based, by recipe name), the earlier steps'
        `NAME_val_log_loss` / `NAME_val_accuracy`, and `arch` as the steps describe it.
    """
    from pipeline.core.errors import PipelineError

    *before, last = steps
    if (run.teaching is not None or run.targets is not None) and not last.teachable:
        raise PipelineError(f"the {last.name} recipe cannot train on a teacher's probabilities: pseudo-labels and "
                            "distilled students follow finetune's or bnretrain's recipe")
    data = data if data is not None else load_steps(config, steps, inputs, sides)
    start, earlier = None, {"best_epochs": {}}
    if before:
        start = out / MEMBER_HEAD_DIR
        start.mkdir()
        earlier = train_steps(config, tuple(before), inputs, start, replace(run, backup=None), data=data, sides=sides)
    record = last.fit(config, data[last.name], start, out, run)
    result = {**record, "best_epochs": {**earlier["best_epochs"], last.name: record["best_epoch"]}}
    if before:
        result.update({"arch": last.arch_after(earlier["arch"]),
                       f"{before[-1].name}_val_log_loss": earlier["val_log_loss"],
                       f"{before[-1].name}_val_accuracy": earlier["val_accuracy"]})
    return result

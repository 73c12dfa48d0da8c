"""What a stage is: its declaration (`Stage`, the `Variant`s it reads), the config as it may see it, and what it is
handed at run time.

A stage module in `stages/` defines a `Settings` model (its config section), a `run(ctx)` function
(the recipe) and a module-level `STAGE = Stage(...)` that ties them together with the stage's
upstream stages, the config keys it reads and the outputs it writes. The cache fingerprints exactly
those declarations, so they are enforced rather than remembered: a stage sees the config only
through a `ConfigView` that raises on any key it did not declare, and the runner checks that a
finished run wrote every declared output.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pipeline.core.config_reader import ConfigReader
from pipeline.core.settings import StrictModel


class UndeclaredConfigRead(RuntimeError):
    """A stage read a config key it does not declare: a bug in its `STAGE`, which would let a
    change of that key go unnoticed by the cache."""


def _covers(declared: tuple[str, ...], dotted: str) -> bool:
    return any(dotted == d or dotted.startswith(d + ".") for d in declared)


class _SectionView:
    """A config section of which only some keys are declared: other attributes raise."""

    def __init__(self, model, name: str, view: "ConfigView"):
        self._model, self._name, self._view = model, name, view

    def __getattr__(self, attribute: str):
        self._view.check(f"{self._name}.{attribute}")
        return getattr(self._model, attribute)


class ConfigView:
    """The config as one stage may see it: its own section and its declared `reads`, nothing else.

    One of the two classes behind `pipeline.core.config_reader.ConfigReader` (`get`, `section`,
    `competition`, `path`, `root`, `comp`, `work_dir`, `submissions_dir`); anything outside the declaration raises
    `UndeclaredConfigRead`, so a test run of every stage proves its declaration complete. A unit of
    a stage sees a narrower view: the keys its own key hashes (`StageContext.map_units`).
    """

    def __init__(self, config: ConfigReader, declared: tuple[str, ...], reader: str, declaration: str):
        """`reader` names who reads (`stage 'cv'`), `declaration` where the declaration lives, for the
        error (`STAGE.reads in stages.cv`)."""
        self._config, self.declared = config, tuple(declared)
        self.reader, self.declaration = reader, declaration
        self.comp, self.root = config.comp, config.root

    def check(self, dotted: str) -> None:
        if not _covers(self.declared, dotted):
            raise UndeclaredConfigRead(
                f"{self.reader} read config key {dotted!r} without declaring it: add it to {self.declaration} "
                f"(declared: {', '.join(self.declared)})"
            )

    def narrowed(self, declared: tuple[str, ...], reader: str, declaration: str) -> "ConfigView":
        """The same config, readable only at `declared` (a unit's view: what its key hashes)."""
        return ConfigView(self._config, declared, reader, declaration)

    def get(self, dotted: str) -> Any:
        self.check(dotted)
        return self._config.get(dotted)

    def section(self, name: str) -> Any:
        if _covers(self.declared, name):
            return self._config.section(name)
        if any(d.startswith(name + ".") for d in self.declared):
            return _SectionView(self._config.section(name), name, self)
        self.check(name)

    @property
    def competition(self):
        return self.section("competition")

    @property
    def compute(self):
        """The `compute` section, readable by every stage undeclared: it is in no fingerprint (where a unit
        runs, and on which device, changes what it computes by rounding at most)."""
        return self._config.compute

    @property
    def kaggle(self):
        """The `kaggle` section (timeouts and retries of calls to Kaggle's API), readable by every stage
        undeclared: it is in no fingerprint (how patient a download is does not change its bytes)."""
        return self._config.kaggle

    def path(self, value) -> Path:
        return self._config.path(value)

    @property
    def work_dir(self) -> Path:
        """`work/COMP/`: where the stages' links are, readable undeclared (a folder, not a setting)."""
        return self._config.work_dir

    @property
    def submissions_dir(self) -> Path:
        self.check("paths.submissions")
        return self._config.submissions_dir

    def predicts(self, stage: str) -> Predicts | None:
        """Stage `stage`'s role as a predicting stage (a declaration in code, not a setting: readable undeclared)."""
        return self._config.predicts(stage)


@dataclass(frozen=True)
class Predicts:
    """A predicting stage's role: its output is a predictions folder (`pipeline.evaluation.predictions`)
    that smooth, blend, pseudo and submit read, `kp runs` lists and `kp package` ships (every one). Code asks a
    stage's role (`ConfigReader.predicts`) instead of comparing its name.

    models: (the unit kind whose stored units are its models, the metrics list naming them by `key`),
        e.g. ensemble's ("members", "members"); None: its model is in its own folder, or it has none.
    recipe: the recipe its models follow under a config (`ensemble.source`); None: it trains none itself.
    source: the predicting stage whose models make its predictions under a config (smooth's
        `smooth.source`; a blend's cv, whose fold models its cross-validated sources are); None: its own.
    smooths: it smooths its source's test rows over their neighbours (a kernel smooths them again).
    out_of_fold: its models predict every training row out of fold (a sweep's default objective).
    """

    models: tuple[str, str] | None = None
    recipe: Callable[[Any], str] | None = None
    source: Callable[[Any], str] | None = None
    smooths: bool = False
    out_of_fold: bool = False


@dataclass(frozen=True)
class Variant:
    """A variant a stage reads: this competition under a few changed settings, run in its own folder
    (`work/COMP/_variants/NAME/`) with the competition's run cache.

    name: its folder, and the key of its output folder in the reading stage's `ctx.inputs`.
    overrides: dotted key -> value, applied as `--set` would.
    target: the stage of the variant whose output the reading stage reads.
    where: what asked for it, for errors (`blend.sources[1]`).
    """

    name: str
    overrides: dict[str, Any]
    target: str
    where: str


@dataclass(frozen=True)
class Stage:
    """A stage's declaration.

    name: the command (`kp NAME`) and the work folder (`work/COMP/NAME/`).
    run: the recipe; takes a `StageContext`, writes under `ctx.out`, returns its metrics (a dict
        of JSON values), which land in the manifest and in `kp status --json`.
    settings: the pydantic model of its config section.
    section: the config section it owns (default: its name).
    needs: upstream stages whose outputs it reads.
    reads: dotted config keys outside its own section that change its output (also those a shared
        recipe reads on its behalf); reading any other key raises.
    outs: the files (and `folders/`) every run writes: checked when a run finishes, and by `kp
        status`, which reports a run whose outputs went missing or changed size as stale.
    headline: turns its metrics into the short text `kp status` shows.
    source_stamp: extra fingerprint inputs read from outside the config, as
        `source_stamp(config, stamp)` where `stamp(path)` is the configured file stamp (size and
        mtime, or sha256), so that replacing an input file makes the stage stale.
    extra_needs: upstream stages chosen by the config (submit reads the stage `submit.source` names).
    predicts: its role when its output is a predictions folder (`Predicts`); None: it predicts nothing.
    reads_predictions: the settings of its section that name a predicting stage it reads, as
        `reads_predictions(settings)` -> {dotted key: stage name}; the engine checks each one names a
        predicting stage (from the registry) that does not read this stage itself.
    variants: the variants it reads, as `variants(config)` -> a list of `Variant`: the engine folds
        each variant's fingerprint into this stage's, brings each up to date before the stage runs,
        and hands its target's output folder to the stage as `ctx.inputs[variant.name]`.
    recipes: the training recipes (`pipeline.training.recipes`) the stage runs under a config, as
        `recipes(config)`: their config keys (`Recipe.keys`) join the stage's and their modules
        (`Recipe.module`) its code, so a stage is stale when a recipe it uses changes, and only then.
    restore: called with a `StageContext` (whose `out` is the stored run) when a stored run becomes
        current again without rerunning, for a stage that also writes outside its folder.
    submits: it writes the submission file `--upload` sends (submit).
    check: checks of its settings against what its upstream runs already know, as
        `check(settings, known)` where `known` maps each up-to-date upstream stage to its metrics
        (split: the folds against the download's counts); raises a PipelineError naming the key.
        `kp status` and every run call it before anything runs, and the stage calls it itself.
    """

    name: str
    run: Callable[["StageContext"], dict[str, Any]]
    settings: type[StrictModel]
    section: str = ""
    needs: tuple[str, ...] = ()
    reads: tuple[str, ...] = ()
    outs: tuple[str, ...] = ()
    headline: Callable[[dict[str, Any]], str] = lambda metrics: ""
    source_stamp: Callable[[Any, Callable[[Path], dict]], dict[str, Any]] | None = None
    extra_needs: Callable[[Any], tuple[str, ...]] | None = None
    variants: Callable[[Any], list[Variant]] | None = None
    predicts: Predicts | None = None
    reads_predictions: Callable[[Any], dict[str, str]] | None = None
    recipes: Callable[[Any], tuple[Any, ...]] | None = None
    restore: Callable[["StageContext"], None] | None = None
    submits: bool = False
    check: Callable[[Any, dict[str, dict]], None] | None = None

    def __post_init__(self):
        if not self.section:
            object.__setattr__(self, "section", self.name)

    def recipes_for(self, config: ConfigReader) -> tuple[Any, ...]:
        """The recipes this stage runs under `config` (none for a stage that trains nothing)."""
        return tuple(self.recipes(config)) if self.recipes else ()

    def keys_for(self, config: ConfigReader) -> tuple[str, ...]:
        """Every config key whose value goes into the fingerprint: its section, `reads`, then its recipes' keys."""
        keys = [self.section, *self.reads]
        for recipe in self.recipes_for(config):
            keys += [key for key in recipe.keys if key not in keys]
        return tuple(keys)

    def code_modules(self, config: ConfigReader) -> tuple[str, ...]:
        """The modules whose code (and what they import) computes this stage's output: its own and its recipes'."""
        return (self.run.__module__, *(recipe.module for recipe in self.recipes_for(config)))

    def view(self, config: ConfigReader) -> ConfigView:
        """The config as this stage may read it."""
        if isinstance(config, ConfigView):
            return config
        return ConfigView(config, self.keys_for(config), f"stage {self.name!r}", f"STAGE.reads in {self.run.__module__}")

    def needs_for(self, config: ConfigReader) -> tuple[str, ...]:
        """Upstream stages under this config: `needs`, then whatever `extra_needs` adds."""
        extra = self.extra_needs(self.view(config)) if self.extra_needs else ()
        return self.needs + tuple(name for name in extra if name not in self.needs)


@dataclass
class StageContext:
    """What a running stage gets: its settings, its view of the config, where to read and write.

    out: a fresh temporary folder; everything the stage writes goes here. It becomes the stored run
        `work/COMP/_runs/STAGE/FINGERPRINT/` (and `work/COMP/STAGE` points at it) only once `run`
        returns, so a crash never leaves an accepted artifact.
    inputs: the current output folder of each upstream stage, by name, and of each variant it reads
        (`Stage.variants`), by the variant's name.
    cache_dir: a per-competition folder that survives reruns (downloaded archives live here).
    config_fingerprint: this stage's fingerprint (submissions carry it).
    fingerprint_inputs: what that fingerprint hashes (config values, upstream fingerprints, code).
    """

    comp: str
    stage: Stage
    config: ConfigView
    settings: Any
    out: Path
    inputs: dict[str, Path]
    cache_dir: Path
    work_dir: Path
    config_fingerprint: str = ""
    fingerprint_inputs: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    units_used: dict[str, list[str]] = field(default_factory=dict)

    def log(self, message: str) -> None:
        """A line of the stage's progress, beside any bar (`pipeline.core.console.say`)."""
        from pipeline.core.console import say

        say(f"[{self.comp}] {message}")

    def warn(self, message: str) -> None:
        """Print a warning and keep it for the manifest (shown again by `kp status --json`)."""
        from pipeline.core.console import say

        self.warnings.append(message)
        say(f"[{self.comp}] WARNING: {message}", warning=True)

    def input(self, stage: str) -> Path:
        return self.inputs[stage]

    def units(self, kind: str):
        """The run store of this stage's cached units of `kind` (`work/COMP/_runs/STAGE-KIND/`),
        e.g. ensemble members: each unit is keyed by its own fingerprint and written atomically."""
        from pipeline.core.runs import unit_store, unit_store_name

        used = self.units_used.setdefault(unit_store_name(self.stage.name, kind), [])
        return unit_store(self.work_dir, self.stage.name, kind, used)

    @property
    def on_ray(self) -> bool:
        """Whether this run's units go to Ray workers (`compute.backend: ray`), which load their own inputs."""
        return self.config.compute.backend == "ray"

    def map_units(self, kind: str, function: Callable[..., dict], items: list, desc: str, recipes=(),
                  reads: tuple[str, ...] = (), upstream: tuple[str, ...] | None = None,
                  keyed_by_item: tuple[str, ...] = (), resumable: bool = False) -> list:
        """Compute (or reuse) one unit of `kind` per item and return them stored, in order: the fan-out
        and gather every stage with units shares (here, or as Ray tasks as `compute` says).

        Args: those of `plan_units`, and `desc`: the progress bar's text.

        Returns:
            One `pipeline.core.executor.UnitResult` per item.
        """
        units = self.plan_units(kind, function, items, recipes, reads, upstream, keyed_by_item, resumable)
        return self.gather_units(kind, units, set(self.compute_units(kind, units, desc)))

    def plan_units(self, kind: str, function: Callable[..., dict], items: list, recipes=(),
                   reads: tuple[str, ...] = (), upstream: tuple[str, ...] | None = None,
                   keyed_by_item: tuple[str, ...] = (), resumable: bool = False) -> list:
        """The units of `kind`, one per item, keyed but not computed (`map_units` computes them; a
        stage that keeps something built from several units, e.g. precompute's stitched arrays, keys
        it by theirs and computes them only when it is missing).

        Each unit's key is derived here from exactly what the unit is handed: the config keys its
        recipes and `reads` declare (the unit sees only those: reading another raises), what the
        `upstream` stages it is given wrote for it to read (their manifests' `digest`, which leaves
        their plots out), the code its function and recipes reach (no drawing code: a plot's edit
        never reruns a unit), and its item's own `key`.

        Args:
            kind: the units' store, `work/COMP/_runs/STAGE-KIND/`.
            function: a module-level function called as `function(config, inputs, *item.args, out)`
                (plus `backup=` when `resumable`); it writes its files into `out` and returns its
                record (`unit.json`; its `warnings`, a list of lines, go to the stage's manifest).
            items: `pipeline.core.executor.UnitItem`s.
            recipes: the `Recipe`s the function runs (their keys and modules).
            reads: other config keys it reads.
            upstream: the upstream stages it reads (default: all of the stage's).
            keyed_by_item: those of `upstream` whose digest stays out of the key because each
                item's `key` holds what the unit takes from them (cv's folds list their rows, so a
                fold is reused when another fold's rows change).
            resumable: hand each unit a backup folder outside its temporary one
                (`work/COMP/_cache/STAGE-KIND-backup/KEY/`), kept until the unit is stored.

        Returns:
            One `pipeline.core.executor.Unit` per item.
        """
        import functools

        from pipeline.core.artifacts import BACKUP_FOLDER
        from pipeline.core.cache import fingerprint
        from pipeline.core.code_version import code_hashes
        from pipeline.core.executor import Unit
        from pipeline.core.runs import unit_store_name

        declared = tuple(dict.fromkeys([*(key for recipe in recipes for key in recipe.keys), *reads]))
        store_name = unit_store_name(self.stage.name, kind)
        view = self.config.narrowed(declared, f"a unit of {store_name}",
                                    "its recipes' keys (`Recipe.reads`) or the `reads` of map_units")
        names = tuple(self.inputs) if upstream is None else tuple(upstream)
        shared = {"kind": kind, "function": f"{function.__module__}.{function.__qualname__}",
                  "code": code_hashes(function.__module__, *(recipe.module for recipe in recipes)),
                  "config": {key: self.config.get(key) for key in declared},
                  "upstream": {name: self._upstream_digest(name) for name in names if name not in keyed_by_item},
                  "stamp": self.fingerprint_inputs.get("stamp", {})}  # the stage's input files (a weights file)
        inputs = {name: self.inputs[name] for name in names}
        units = []
        for item in items:
            key = fingerprint({**shared, "item": item.key})
            backup = (self.cache_dir / BACKUP_FOLDER.format(stage=store_name) / key
                      if resumable else None)
            extra = {"backup": backup} if resumable else {}
            units.append(Unit(key, item.label, functools.partial(function, view, inputs, *item.args, **extra), backup))
        return units

    def gather_units(self, kind: str, units: list, computed: set[str]) -> list:
        """The stored `units` of `kind` as `pipeline.core.executor.UnitResult`s (their records read,
        their warnings moved into the stage's manifest); `computed`: the keys this run computed."""
        from pipeline.core.executor import UnitResult, read_record

        store, results = self.units(kind), []
        for unit in units:
            record = read_record(store.path(unit.key))
            for message in record.pop("warnings", []):  # a unit's warnings belong in the stage's manifest
                self.warn(f"{unit.label}: {message}")
            results.append(UnitResult(unit.key, store.path(unit.key), record, unit.key not in computed))
        return results

    def _upstream_digest(self, name: str) -> str:
        """What upstream stage `name` wrote for others (its manifest's `digest`), or its fingerprint
        for a run that recorded none."""
        from pipeline.core.cache import upstream_digests

        return upstream_digests({name: self.inputs[name]}).get(name) or self.fingerprint_inputs["upstream"][name]

    def compute_units(self, kind: str, units: list, desc: str) -> list[str]:
        """Compute the units of `kind` that are not stored yet (`pipeline.core.executor.compute_units`:
        here or as Ray tasks, as `compute` says), with one progress bar over all of them.

        Returns:
            The keys computed now.
        """
        from pipeline.core.executor import compute_units

        with self.progress(len(units), desc, unit=kind) as bar:
            return compute_units(self.config.compute, self.units(kind), units, self.log, bar)

    def progress(self, total: int, desc: str, unit: str = "img"):
        """A progress display on stderr: a bar redrawn in place on a terminal, plain lines in a log
        (`pipeline.core.console.progress`)."""
        from pipeline.core.console import progress

        return progress(total, f"[{self.comp}] {desc}", unit)

"""`kp sweep`: a grid of settings or an Optuna search, each trial an ordinary run on the run cache.

A trial is the competition's config with its overrides (as `--set` gives them), run for the objective
stage in its own variant folder (`pipeline.experiments.trials`), so it reuses every upstream result it shares with
the trials before it (a sweep over head settings never recomputes features), and a trial that ran
before is restored from the run cache instead of retrained: a killed sweep, rerun, computes only what
was missing. The objective is a predicting stage's validation score, out of fold for cv
(`val_log_loss`, or `val_accuracy` when the competition's metric is accuracy); no test row and no
hidden label is read. A cv trial whose first folds are clearly worse than the best trial's stops
early (`pipeline.experiments.trials.Pruning`). Trials run one at a time, or as Ray tasks with `compute.backend:
ray`. Each ended trial is a line of `work/COMP/sweeps/NAME/trials.jsonl` with the command that reruns
it alone; a search's Optuna study is `study.db` beside it.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import re
import shlex
from pathlib import Path
from typing import Any, TYPE_CHECKING

import yaml
from pydantic import BaseModel, ConfigDict, model_validator

from pipeline.core.artifacts import STUDY_FILE, SWEEP_FILE, SWEEP_PLOT, SWEEPS_FOLDER, TRIALS_FILE
from pipeline.core.errors import PipelineError
from pipeline.core.readers import read_text
from pipeline.experiments.run_table import score_key
from pipeline.experiments.trials import Pruning, TrialSpec, best_folds, run_trials

if TYPE_CHECKING:
    from pipeline.engine.config import ResolvedConfig


def split_values(raw: str) -> list[str]:
    """`v1,v2,...` split at the commas outside brackets, braces and quotes (`[16, 16],[32]` is two values)."""
    values, depth, quote, current = [], 0, "", ""
    for char in raw:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            values.append(current.strip())
            current = ""
            continue
        current += char
    values.append(current.strip())
    if any(value == "" for value in values):
        raise PipelineError(f"--grid ...={raw}: an empty value (two commas in a row, or one at an end)")
    return values


def grid_axes(grid: list[str]) -> list[tuple[str, list[str]]]:
    """The `--grid key=v1,v2` options as (key, raw values), in the order given."""
    axes = []
    for option in grid:
        key, sep, raw = option.partition("=")
        if not sep or not key.strip():
            raise PipelineError(f"--grid {option}: expected dotted.key=value1,value2,...")
        if any(key.strip() == other for other, _ in axes):
            raise PipelineError(f"--grid {option}: {key.strip()!r} is given twice")
        axes.append((key.strip(), split_values(raw)))
    return axes


def grid_trials(grid: list[str], max_trials: int | None = None) -> list[dict[str, str]]:
    """Every combination of `--grid key=v1,v2` options, as {key: raw value} in the order given.

    Args:
        grid: the `--grid` options.
        max_trials: refuse a grid of more combinations than this (`sweep.max_trials`), before building them.

    Returns:
        The trials, the last key varying fastest.
    """
    axes = grid_axes(grid)
    count = math.prod(len(values) for _, values in axes)
    if max_trials is not None and count > max_trials:
        raise PipelineError(f"--grid: {' x '.join(str(len(v)) for _, v in axes)} = {count:,} combinations, more than "
                            f"sweep.max_trials={max_trials:,}; narrow the grid, search it (--search SPACE.yaml "
                            f"--trials N), or raise sweep.max_trials if you mean it")
    return [dict(zip([k for k, _ in axes], combination)) for combination in itertools.product(*[v for _, v in axes])]


def objective_stage(config: ResolvedConfig, asked: str | None) -> str:
    """The stage whose validation score a sweep compares: `asked`, else what is submitted (`submit.source`,
    when it is a listed predicting stage), else the first listed stage whose models predict every training
    row out of fold (`Predicts.out_of_fold`: cv), else the last predicting stage in run order."""
    from pipeline.engine.registry import predicting_stages

    listed = [name for name in config.stage_names if config.predicts(name) is not None]
    if asked is not None:
        if asked not in listed:
            raise PipelineError(f"--objective {asked}: not a predicting stage of {config.comp!r} (its: {listed})")
        return asked
    if not listed:
        raise PipelineError(f"{config.comp!r} lists no predicting stage ({', '.join(predicting_stages())}) to sweep")
    submitted = config.get("submit.source")
    if submitted in listed:
        return submitted
    out_of_fold = [name for name in listed if config.predicts(name).out_of_fold]
    return out_of_fold[0] if out_of_fold else listed[-1]


def command_line(comp: str, extra_files, sets, stage: str) -> str:
    """The `kp` command that reruns one trial alone."""
    parts = ["kp", stage, "--comp", comp]
    for path in extra_files:
        parts += ["--config", str(path)]
    for assignment in sets:
        parts += ["--set", assignment]
    return shlex.join(parts)


def _sweep_folder(comp, extra_files, sets, objective, name, asked: dict) -> tuple[Any, str, Path, dict]:
    """(the base config, the objective stage, the sweep's folder, what its `sweep.json` records: the base
    config's command-line parts, `asked` (the grid or space), the objective); `_holding` creates the folder."""
    from pipeline.engine.config import load_config

    if name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise PipelineError(f"--name {name!r}: a sweep's name is a folder name: letters, digits, _ . - only")
    base = load_config(comp, extra_files=list(extra_files), sets=list(sets))
    stage = objective_stage(base, objective)
    digest = hashlib.sha256(json.dumps(asked, sort_keys=True).encode()).hexdigest()[:8]
    described = {"comp": comp, "config": [str(p) for p in extra_files], "set": list(sets), **asked, "objective": stage}
    return base, stage, base.work_dir / SWEEPS_FOLDER / (name or f"{stage}-{digest}"), described


def _trial_sets(sets, overrides: dict[str, str]) -> list[str]:
    """A trial's `--set` assignments: the sweep's own, then the trial's overrides."""
    return [*sets, *(f"{key}={value}" for key, value in overrides.items())]


def _check_overrides(comp, extra_files, sets, trials: list[dict[str, str]]) -> None:
    """Validate every value of every key before the first trial runs, each once, in the first trial's
    company (its other settings): a misspelt key or a value out of range fails at once, naming the key,
    rather than after hours of trials, and a grid of thousands costs a check per value, not per trial."""
    from pipeline.engine.config import load_config

    if not trials:
        return
    first, checked = trials[0], set()
    for overrides in trials:
        for key, value in overrides.items():
            if (key, value) not in checked:
                checked.add((key, value))
                load_config(comp, extra_files=list(extra_files), shallow=True,
                            sets=_trial_sets(sets, {**first, key: value}))


def _spec(base, extra_files, sets, folder: Path, stage: str, number: int, overrides: dict[str, str]) -> TrialSpec:
    return TrialSpec(base.comp, base.root, tuple(str(p) for p in extra_files), tuple(sets), folder.name, number, stage,
                     overrides, command_line(base.comp, extra_files, _trial_sets(sets, overrides), stage))


@contextlib.contextmanager
def _holding(base, folder: Path, described: dict, say):
    """The competition's lock for the whole sweep (no other kp run tidies the shared run cache under a
    running trial, and no other process runs this sweep's trials), with what killed runs left behind
    removed first, as `kp STAGE` does (a trial's variant folder leaves the shared stores to this);
    then the sweep's folder with `sweep.json`, what was asked."""
    from pipeline.core.cache import competition_lock, sweep_partial, write_text_atomic

    with competition_lock(base.work_dir, wait=base.get("cache.wait")):  # claims work/COMP first: kp writes only in folders it made
        for leftover in sweep_partial(base.work_dir):
            say(f"removed {leftover.relative_to(base.work_dir)} left by an interrupted run")
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(folder / SWEEP_FILE, json.dumps(described, indent=2) + "\n")
        yield


def _write_trials(folder: Path, trials: list[dict]) -> None:
    from pipeline.core.cache import write_text_atomic

    write_text_atomic(folder / TRIALS_FILE, "".join(json.dumps(t) + "\n" for t in trials))


def run_sweep(comp: str, extra_files, sets, grid: list[str], objective: str | None, name: str | None,
              pruning: Pruning | None = None, say=print) -> tuple[Path, list[dict]]:
    """Run every trial of a grid (each restored from the run cache when it ran before).

    Args:
        comp, extra_files, sets: the base config, as for any `kp` command.
        grid: the `--grid key=v1,v2` options.
        objective: the stage to score (None: `objective_stage`'s choice).
        name: the sweep's folder name (None: the objective and a digest of the grid).
        pruning: when to stop a cv trial early (None: every trial runs to the end).
        say: prints a line.

    Returns:
        (the sweep's folder, its trials as `run_trial` records them, in grid order).
    """
    base, stage, folder, described = _sweep_folder(comp, extra_files, sets, objective, name, {"grid": sorted(grid)})
    trials = grid_trials(grid, base.get("sweep.max_trials"))
    _check_overrides(comp, extra_files, sets, trials)
    combinations = iter(enumerate(trials, start=1))
    records: dict[int, dict] = {}

    def next_trial():
        number, overrides = next(combinations, (None, None))
        return None if number is None else _spec(base, extra_files, sets, folder, stage, number, overrides)

    def finish(spec, record):
        records[spec.number] = record
        _write_trials(folder, [records[n] for n in sorted(records)])

    with _holding(base, folder, described, say):
        run_trials(base, next_trial, finish, lambda: best_folds(score_key(base), records.values()), pruning, say)
    return folder, [records[n] for n in sorted(records)]


class Axis(BaseModel):
    """One setting of a search space: a range (`low`, `high`; `log` scale; `step` for integers) or `choices`."""

    model_config = ConfigDict(extra="forbid")

    low: int | float | None = None  # ints (and an int step) give integer trials
    high: int | float | None = None
    log: bool = False
    step: int | float | None = None
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _range_or_choices(self):
        if (self.choices is None) == (self.low is None or self.high is None):
            raise ValueError("give either low and high (a range) or choices (a list of values)")
        if self.choices is not None and not self.choices:
            raise ValueError("choices is empty")
        if self.low is not None and self.high is not None and not self.low < self.high:
            raise ValueError(f"low {self.low} must be below high {self.high}")
        if self.log and self.low is not None and self.low <= 0:
            raise ValueError(f"log: true needs low above 0 (a log scale has no {self.low})")
        if self.step is not None and self.low is not None:
            if self.step <= 0 or self.step > self.high - self.low:
                raise ValueError(f"step {self.step} must be above 0 and at most high - low ({self.high - self.low})")
            if self.log:
                raise ValueError("give either step or log: true (Optuna takes no step on a log scale)")
        return self

    @property
    def integer(self) -> bool:
        """A range of whole numbers (int `low`, `high` and `step`): Optuna's int suggestion."""
        return all(isinstance(v, int) for v in (self.low, self.high)) and isinstance(self.step or 1, int)

    def points(self) -> list | None:
        """Every value this axis can take, as Optuna's trial params hold it (a choice as its YAML text);
        None for a continuous range."""
        if self.choices is not None:
            return [_yaml_text(c) for c in self.choices]
        if self.integer:
            return list(range(self.low, self.high + 1, self.step or 1))
        if self.step is not None:
            count = int(math.floor((self.high - self.low) / self.step + 1e-9)) + 1
            return [round(self.low + i * self.step, 12) for i in range(count)]
        return None


def read_space(path: Path) -> dict[str, Axis]:
    """A search space file: {dotted key: Axis}; a fault names the file and the key."""
    from pydantic import ValidationError

    from pipeline.core.readers import read_text

    try:
        raw = yaml.safe_load(read_text(path))
    except yaml.YAMLError as exc:
        raise PipelineError(f"{path}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(raw, dict) or not raw:
        raise PipelineError(f"{path}: expected a mapping of dotted config keys to {{low, high}} or {{choices}}")
    space = {}
    for key, axis in raw.items():
        try:
            space[str(key)] = Axis.model_validate(axis)
        except ValidationError as exc:
            raise PipelineError(f"{path}: {key}: {exc.errors()[0]['msg']}") from None
    return space


def _yaml_text(value: Any) -> str:
    """A value as the one-line YAML text a `--set` takes."""
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...").strip()


def _extremes(axis: Axis) -> list[str]:
    """The values at an axis's ends (each choice, or low and high), as `--set` text: what is checked up front."""
    return [_yaml_text(v) for v in (axis.choices if axis.choices is not None else [axis.low, axis.high])]


def suggest(trial, key: str, axis: Axis) -> str:
    """Optuna's choice for one setting, as the raw YAML value a `--set` takes."""
    if axis.choices is not None:  # Optuna's categorical takes plain scalars: the choices go as their YAML text
        return trial.suggest_categorical(key, axis.points())
    if axis.integer:
        return str(trial.suggest_int(key, axis.low, axis.high, step=axis.step or 1, log=axis.log))
    return repr(trial.suggest_float(key, axis.low, axis.high, step=axis.step, log=axis.log))


def run_search(comp: str, extra_files, sets, space_file: Path, n_trials: int, objective: str | None,
               name: str | None, seed: int = 0, pruning: Pruning | None = None,
               say=print) -> tuple[Path, list[dict]]:
    """An Optuna search (TPE sampler) of `n_trials` trials over a space file, stored with the competition.

    The study lives in `work/COMP/sweeps/NAME/study.db` (Optuna's RDB storage), so rerunning with a
    larger `n_trials` adds trials to the same study, and a killed search keeps its finished ones (the
    trial it was running is marked failed and run again under a new number). With `pruning`, the study's
    pruner (`pipeline.experiments.pruning.FoldPruner`) decides when a trial run here stops: the trial
    reports each fold's score as an intermediate value as it comes. A stopped trial is Optuna's PRUNED,
    with each fold's score as its intermediate values, and counts towards `n_trials`.

    Returns:
        (the sweep's folder, its finished and stopped trials as `run_trial` records them).
    """
    import optuna
    from optuna.trial import TrialState

    from pipeline.evaluation.metrics import score_named
    from pipeline.experiments.pruning import FoldPruner, study_judge

    space = read_space(space_file)
    _check_overrides(comp, extra_files, sets, [{key: value for key, value in zip(space, corner)} for corner in
                                               itertools.product(*(_extremes(axis) for axis in space.values()))][:64])
    asked = {"search": {key: axis.model_dump(exclude_none=True) for key, axis in space.items()}, "seed": seed}
    base, stage, folder, described = _sweep_folder(comp, extra_files, sets, objective, name, asked)
    per_axis = [axis.points() for axis in space.values()]
    size = None if any(p is None for p in per_axis) else math.prod(len(p) for p in per_axis)
    max_trials = base.get("sweep.max_trials")
    if n_trials > max_trials and (size is None or size > max_trials):
        raise PipelineError(f"--trials {n_trials:,}: more than sweep.max_trials={max_trials:,}; raise it if you mean it")
    score_name = score_key(base)
    direction = "maximize" if score_named(score_name).higher_is_better else "minimize"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    _check_study(folder)
    with _holding(base, folder, described, say):
        pruner = FoldPruner(score_name, int(base.get("split.folds")), pruning) if pruning else None
        study = optuna.create_study(study_name=folder.name, storage=f"sqlite:///{folder / STUDY_FILE}",
                                    load_if_exists=True, direction=direction, pruner=pruner,
                                    sampler=optuna.samplers.TPESampler(seed=seed, constant_liar=True))
        for stale in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):  # a killed search's
            study.tell(stale.number, state=TrialState.FAIL)

        def ended():
            return [t.user_attrs["record"] for t in study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))]

        running: dict[int, Any] = {}
        judges: dict[int, Any] = {}
        remaining = n_trials - len(ended())
        if size is not None and n_trials >= size:  # the whole space: each combination once, then stop
            done = {tuple(sorted(t.params.items())) for t in study.get_trials(
                deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))}
            missing = [dict(zip(space, point)) for point in itertools.product(*per_axis)
                       if tuple(sorted(zip(space, point))) not in done]
            for params in missing:
                study.enqueue_trial(params, skip_if_exists=True)
            remaining = len(missing)
            say(f"the space holds {size:,} combinations ({size - len(missing):,} ran before): running each once "
                f"{'and stopping there, short of' if n_trials > size else 'for'} --trials {n_trials:,}")

        def next_trial():
            nonlocal remaining
            if remaining <= 0:
                return None
            remaining -= 1
            trial = study.ask()
            overrides = {key: suggest(trial, key, axis) for key, axis in space.items()}
            running[trial.number + 1] = trial
            if pruner is not None:
                judges[trial.number + 1] = study_judge(trial, pruner)
            return _spec(base, extra_files, sets, folder, stage, trial.number + 1, overrides)

        def finish(spec, record):
            trial = running.pop(spec.number)
            reported = getattr(judges.pop(spec.number, None), "reported", set())
            trial.set_user_attr("record", record)
            for fold, value in record["fold_scores"].items():
                if int(fold) not in reported:  # a trial run here reported its folds as they came
                    trial.report(value, int(fold))
            if record.get("pruned"):
                study.tell(trial, state=TrialState.PRUNED)
            else:
                study.tell(trial, record[score_name])
            _write_trials(folder, ended())

        if remaining <= 0:
            say(f"{len(ended())} trials already ended (>= --trials {n_trials}, or every combination of the space): "
                "nothing to run")
        run_trials(base, next_trial, finish, lambda: best_folds(score_name, ended()), pruning, say,
                   judge_of=lambda spec: judges.get(spec.number))
        done = ended()
        _write_trials(folder, done)
    return folder, done


def read_trials(folder: Path) -> list[dict]:
    """A sweep's ended trials (`trials.jsonl`; none when it has none yet).

    Raises:
        PipelineError: a line that is not a JSON object, named by its line, with what to do.
    """
    path = folder / TRIALS_FILE
    if not path.is_file():
        return []
    trials = []
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            record, why = None, f"not JSON ({exc.msg})"
        else:
            why = "not a trial's record (a JSON object)"
        if not isinstance(record, dict) or "overrides" not in record:
            raise PipelineError(f"{path}: line {number}: {why}; restore the file, or delete that line (the trial's "
                                "run stays in the run cache, and rerunning the sweep restores it)")
        trials.append(record)
    return trials


def sweeps(work_dir: Path, problems: list[str] | None = None) -> dict[str, list[dict]]:
    """{sweep name: its ended trials (finished or stopped early)} for every sweep of a competition, by name.

    Args:
        work_dir: the competition's work folder.
        problems: where a damaged sweep's one-line message goes, that sweep left out (None: it raises).
    """
    found = {}
    for path in sorted((work_dir / SWEEPS_FOLDER).glob(f"*/{TRIALS_FILE}")):
        try:
            found[path.parent.name] = read_trials(path.parent)
        except PipelineError as exc:
            if problems is None:
                raise
            problems.append(str(exc))
    return found


def _check_study(folder: Path) -> None:
    """A search's stored study is readable and holds every trial its `trials.jsonl` lists, before Optuna
    opens it: a damaged `study.db` would end in a database traceback, and an emptied one would start a new
    study and then rewrite `trials.jsonl` without the earlier trials.

    Raises:
        PipelineError: the file named, what is wrong, and what to do.
    """
    import sqlite3

    path, listed = folder / STUDY_FILE, read_trials(folder)
    afresh = (f"move {STUDY_FILE} and {TRIALS_FILE} out of {folder} (or give another --name) to start this search "
              f"afresh; {TRIALS_FILE} keeps the finished trials' records")
    if not path.exists():
        if listed:
            raise PipelineError(f"{path}: missing, while {TRIALS_FILE} lists {len(listed)} trials of this search; "
                                f"{afresh}")
        return
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            ended = db.execute("SELECT count(*) FROM trials JOIN studies ON trials.study_id = studies.study_id "
                               "WHERE studies.study_name = ? AND trials.state IN ('COMPLETE', 'PRUNED')",
                               (folder.name,)).fetchone()[0]
    except sqlite3.DatabaseError as exc:
        raise PipelineError(f"{path}: not a readable Optuna study ({exc}); {afresh}") from None
    if ended < len(listed):
        raise PipelineError(f"{path}: holds {ended} ended trials of study {folder.name!r}, while {TRIALS_FILE} lists "
                            f"{len(listed)}: the study was emptied or replaced; {afresh}")


def score_name_of(trials: list[dict]) -> str:
    """The score a sweep's trials carry: `val_log_loss` or `val_accuracy`."""
    from pipeline.evaluation.metrics import ACCURACY, LOG_LOSS

    return next(key for key in (LOG_LOSS.name, ACCURACY.name) if trials and key in trials[0])


def finished(trials: list[dict]) -> list[dict]:
    """The trials that ran to the end (not stopped early by pruning)."""
    return [t for t in trials if not t.get("pruned")]


def draw_sweep(work_dir: Path, name: str, trials: list[dict]) -> Path:
    """`work/COMP/sweeps/NAME/sweep.png`: the score against each setting the sweep varied, from its
    finished `trials` (as `sweeps` reads them)."""
    from pipeline.evaluation.plots import plot_sweep

    ended, trials = trials, finished(trials)
    if not trials:
        raise PipelineError(f"no finished trials of a sweep named {name!r} in {work_dir / SWEEPS_FOLDER}")
    path = work_dir / SWEEPS_FOLDER / name / SWEEP_PLOT
    stopped = f", {len(ended) - len(trials)} stopped early" if len(ended) > len(trials) else ""
    plot_sweep(trials, score_name_of(trials), path,
               f"sweep {name}: {len(trials)} trials of {trials[0]['objective']}{stopped}")
    return path

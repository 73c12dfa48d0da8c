"""`kp sweep`: a grid of settings, each trial an ordinary run on the run cache; `kp runs`: every stored
result of the predicting stages side by side.

A trial is the competition's config with its overrides (as `--set` gives them). It runs the objective
stage and what that needs, as `kp STAGE` does, so it reuses every upstream result it shares with the
trials before it (a sweep over head settings never recomputes features), and a trial that ran before
is restored from the run cache instead of retrained: a killed sweep, rerun, computes only what was
missing. The objective is a predicting stage's validation score, out of fold for cv
(`val_log_loss`, or `val_accuracy` when the competition's metric is accuracy); no test row and no
hidden label is read. Each finished trial is a line of `work/COMP/sweeps/NAME/trials.jsonl` with the
command that reruns it alone. `kp runs` reads the manifests in `work/COMP/_runs/STAGE/`, so hand-run
variants, blend sources and sweep trials all appear, each with the settings that differ from the
config it is compared with.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import shlex
import time
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, model_validator

from pipeline.core.artifacts import STUDY_FILE, SWEEP_FILE, SWEEP_PLOT, SWEEPS_FOLDER, TRIALS_FILE
from pipeline.core.errors import PipelineError
from pipeline.evaluation.sources import PREDICTING_STAGES


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


def grid_trials(grid: list[str]) -> list[dict[str, str]]:
    """Every combination of `--grid key=v1,v2` options, as {key: raw value} in the order given.

    Args:
        grid: the `--grid` options.

    Returns:
        The trials, the last key varying fastest.
    """
    axes = []
    for option in grid:
        key, sep, raw = option.partition("=")
        if not sep or not key.strip():
            raise PipelineError(f"--grid {option}: expected dotted.key=value1,value2,...")
        if any(key.strip() == other for other, _ in axes):
            raise PipelineError(f"--grid {option}: {key.strip()!r} is given twice")
        axes.append((key.strip(), split_values(raw)))
    return [dict(zip([k for k, _ in axes], combination)) for combination in itertools.product(*[v for _, v in axes])]


def objective_stage(config, asked: str | None) -> str:
    """The stage whose validation score a sweep compares: `asked`, else cv when listed, else the last
    predicting stage the competition lists."""
    listed = [name for name in config.stage_names if name in PREDICTING_STAGES]
    if asked is not None:
        if asked not in listed:
            raise PipelineError(f"--objective {asked}: not a predicting stage of {config.comp!r} (its: {listed})")
        return asked
    if not listed:
        raise PipelineError(f"{config.comp!r} lists no predicting stage ({', '.join(PREDICTING_STAGES)}) to sweep")
    return "cv" if "cv" in listed else listed[-1]


def score_key(config) -> str:
    """The validation score runs are compared on: `val_accuracy` when the competition's metric is
    accuracy (higher is better), else `val_log_loss` (lower is better)."""
    return "val_accuracy" if config.competition.metric == "accuracy" else "val_log_loss"


def score_of(config, metrics: dict) -> tuple[str, float]:
    """(the score's name, its value) a run's metrics hold for the competition's metric."""
    name = score_key(config)
    if name not in metrics:
        raise PipelineError(f"the run's metrics hold no {name}")
    return name, float(metrics[name])


def ranked(config, rows: list[dict]) -> list[dict]:
    """`rows` best first by the competition's metric (ties keep their order; rows without the score last)."""
    name = score_key(config)
    sign = -1 if name == "val_accuracy" else 1
    return sorted(rows, key=lambda row: (row[name] is None, sign * (row[name] or 0)))


def command_line(comp: str, extra_files, sets, stage: str) -> str:
    """The `kp` command that reruns one trial alone."""
    parts = ["kp", stage, "--comp", comp]
    for path in extra_files:
        parts += ["--config", str(path)]
    for assignment in sets:
        parts += ["--set", assignment]
    return shlex.join(parts)


def run_trial(comp: str, extra_files, sets, overrides: dict[str, str], stage: str, number: int, say=print) -> dict:
    """One trial: the base config with `overrides` (raw YAML values by dotted key), `stage` brought up to
    date as `kp STAGE` does (restored or skipped where it can be).

    Returns:
        Its record: number, overrides, command, objective, score, fingerprint, seconds, the stages that ran
        (rather than being restored or skipped), validation kind, the folds' spread.
    """
    from pipeline import runner
    from pipeline.config import load_config
    from pipeline.core.cache import Manifest
    from pipeline.core.runs import last_action

    trial_sets = [*sets, *(f"{key}={value}" for key, value in overrides.items())]
    command = command_line(comp, extra_files, trial_sets, stage)
    say(f"trial {number}: {command}")
    config = load_config(comp, extra_files=list(extra_files), sets=trial_sets)
    began, clock = time.time(), time.perf_counter()
    statuses = runner.run(config, [stage])
    fingerprint = {s.name: s.fingerprint for s in statuses}[stage]
    manifest = Manifest.read(config.work_dir / stage)
    score_name, score = score_of(config, manifest.metrics)
    ran = [name for name in runner.plan(config, [stage])  # computed now, not skipped or restored
           if last_action(config.work_dir, name).get("action") == "ran"
           and last_action(config.work_dir, name).get("time", 0) >= began]
    say(f"trial {number}: {score_name} {score:.5f}" + (f" (ran {', '.join(ran)})" if ran else
                                                        " (nothing ran: every result was stored)"))
    return {"trial": number, "overrides": overrides, "command": command, "objective": stage,
            score_name: score, "fingerprint": fingerprint, "seconds": round(time.perf_counter() - clock, 1),
            "ran": ran, "validation": manifest.metrics.get("validation", "holdout"),
            **{k: manifest.metrics[k] for k in ("fold_val_log_loss_min", "fold_val_log_loss_max") if k in manifest.metrics}}


def _sweep_folder(comp, extra_files, sets, objective, name, asked: dict) -> tuple[Any, str, Path]:
    """(the base config, the objective stage, the sweep's folder with its `sweep.json` written)."""
    from pipeline.config import load_config
    from pipeline.core.cache import write_text_atomic

    base = load_config(comp, extra_files=list(extra_files), sets=list(sets))
    stage = objective_stage(base, objective)
    digest = hashlib.sha256(json.dumps(asked, sort_keys=True).encode()).hexdigest()[:8]
    folder = base.work_dir / SWEEPS_FOLDER / (name or f"{stage}-{digest}")
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / SWEEP_FILE, json.dumps({"comp": comp, "config": [str(p) for p in extra_files],
                                                       "set": list(sets), **asked, "objective": stage},
                                                      indent=2) + "\n")
    return base, stage, folder


def _write_trials(folder: Path, trials: list[dict]) -> None:
    from pipeline.core.cache import write_text_atomic

    write_text_atomic(folder / TRIALS_FILE, "".join(json.dumps(t) + "\n" for t in trials))


def run_sweep(comp: str, extra_files, sets, grid: list[str], objective: str | None, name: str | None,
              say=print) -> tuple[Path, list[dict]]:
    """Run every trial of a grid (each restored from the run cache when it ran before).

    Args:
        comp, extra_files, sets: the base config, as for any `kp` command.
        grid: the `--grid key=v1,v2` options.
        objective: the stage to score (None: `objective_stage`'s choice).
        name: the sweep's folder name (None: the objective and a digest of the grid).
        say: prints a line.

    Returns:
        (the sweep's folder, its trials as `run_trial` records them).
    """
    trials = grid_trials(grid)
    _, stage, folder = _sweep_folder(comp, extra_files, sets, objective, name, {"grid": sorted(grid)})
    done: list[dict] = []
    for number, overrides in enumerate(trials, start=1):
        done.append(run_trial(comp, extra_files, sets, overrides, stage, number, say))
        _write_trials(folder, done)
    return folder, done


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
        return self


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


def suggest(trial, key: str, axis: Axis) -> str:
    """Optuna's choice for one setting, as the raw YAML value a `--set` takes."""
    if axis.choices is not None:  # Optuna's categorical takes plain scalars: the choices go as their YAML text
        return trial.suggest_categorical(key, [yaml.safe_dump(c, default_flow_style=True).strip().removesuffix("\n...")
                                               for c in axis.choices])
    if all(isinstance(v, int) for v in (axis.low, axis.high)) and isinstance(axis.step or 1, int):
        return str(trial.suggest_int(key, axis.low, axis.high, step=axis.step or 1, log=axis.log))
    return repr(trial.suggest_float(key, axis.low, axis.high, step=axis.step, log=axis.log))


def run_search(comp: str, extra_files, sets, space_file: Path, n_trials: int, objective: str | None,
               name: str | None, seed: int = 0, say=print) -> tuple[Path, list[dict]]:
    """An Optuna search (TPE sampler) of `n_trials` trials over a space file, stored with the competition.

    The study lives in `work/COMP/sweeps/NAME/study.db` (Optuna's RDB storage), so rerunning with a
    larger `n_trials` adds trials to the same study, and a killed search keeps its finished ones.

    Returns:
        (the sweep's folder, its finished trials as `run_trial` records them).
    """
    import optuna

    space = read_space(space_file)
    asked = {"search": {key: axis.model_dump(exclude_none=True) for key, axis in space.items()}, "seed": seed}
    base, stage, folder = _sweep_folder(comp, extra_files, sets, objective, name, asked)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=folder.name, storage=f"sqlite:///{folder / STUDY_FILE}",
                                load_if_exists=True, sampler=optuna.samplers.TPESampler(seed=seed),
                                direction="maximize" if base.competition.metric == "accuracy" else "minimize")

    def finished():
        return [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]

    def evaluate(trial) -> float:
        overrides = {key: suggest(trial, key, axis) for key, axis in space.items()}
        record = run_trial(comp, extra_files, sets, overrides, stage, trial.number + 1, say)
        trial.set_user_attr("record", record)
        return record[score_name_of([record])]

    def keep(study, trial) -> None:
        _write_trials(folder, [t.user_attrs["record"] for t in finished()])

    remaining = n_trials - len(finished())
    if remaining > 0:
        study.optimize(evaluate, n_trials=remaining, callbacks=[keep])
    else:
        say(f"{len(finished())} trials already finished (>= --trials {n_trials}): nothing to run")
    done = [t.user_attrs["record"] for t in finished()]
    _write_trials(folder, done)
    return folder, done


def sweeps(work_dir: Path) -> dict[str, list[dict]]:
    """{sweep name: its finished trials} for every sweep of a competition, by name."""
    found = {}
    for folder in sorted((work_dir / SWEEPS_FOLDER).glob(f"*/{TRIALS_FILE}")):
        lines = folder.read_text().splitlines()
        found[folder.parent.name] = [json.loads(line) for line in lines if line.strip()]
    return found


def score_name_of(trials: list[dict]) -> str:
    """The score a sweep's trials carry: `val_log_loss` or `val_accuracy`."""
    return next(key for key in ("val_log_loss", "val_accuracy") if trials and key in trials[0])


def draw_sweep(work_dir: Path, name: str, trials: list[dict]) -> Path:
    """`work/COMP/sweeps/NAME/sweep.png`: the score against each setting the sweep varied, from its
    finished `trials` (as `sweeps` reads them)."""
    from pipeline.evaluation.plots import plot_sweep

    if not trials:
        raise PipelineError(f"no finished trials of a sweep named {name!r} in {work_dir / SWEEPS_FOLDER}")
    path = work_dir / SWEEPS_FOLDER / name / SWEEP_PLOT
    plot_sweep(trials, score_name_of(trials), path, f"sweep {name}: {len(trials)} trials of {trials[0]['objective']}")
    return path


def flatten(value: Any, prefix: str) -> dict[str, Any]:
    """A nested config value as {dotted key: leaf}."""
    if isinstance(value, dict) and value:
        flat = {}
        for key, item in value.items():
            flat.update(flatten(item, f"{prefix}.{key}"))
        return flat
    return {prefix: value}


def differences(config, used: dict[str, Any]) -> dict[str, Any]:
    """The settings a run used (a manifest's `inputs.config`) that differ from `config`'s, as dotted keys."""
    changed = {}
    for key, value in used.items():
        try:
            now = flatten(config.get(key), key)
        except KeyError:
            now = {}
        for dotted, leaf in flatten(value, key).items():
            if dotted not in now or now[dotted] != leaf:
                changed[dotted] = leaf
    return changed


def settings_used(work_dir: Path, manifest) -> dict[str, Any]:
    """The config values a stored run and the upstream runs it read used (its manifest's `inputs.config`, then
    its upstream stages', found by their fingerprints in the run cache): what made the result."""
    from pipeline.core.cache import Manifest
    from pipeline.core.runs import stage_store

    used, seen, waiting = {}, set(), [manifest]
    while waiting:
        current = waiting.pop()
        for key, value in current.inputs.get("config", {}).items():
            used.setdefault(key, value)
        for stage, key in current.inputs.get("upstream", {}).items():
            if (stage, key) not in seen:
                seen.add((stage, key))
                upstream = Manifest.read(stage_store(work_dir, stage).path(key))
                if upstream is not None:
                    waiting.append(upstream)
    return used


def stored_runs(config, stages: tuple[str, ...] | None = None) -> list[dict]:
    """Every stored result of the predicting stages (`work/COMP/_runs/STAGE/`), newest first.

    Args:
        config: the config the runs are compared with (their `differs` column).
        stages: only these stages (None: every predicting stage).

    Returns:
        One row each: stage, fingerprint, finished, duration, score, validation kind, fold spread,
        whether it is the stage's current result, and the settings that differ from `config`'s.
    """
    from pipeline.core.cache import Manifest
    from pipeline.core.runs import current_key, stage_store

    rows = []
    for stage in stages or PREDICTING_STAGES:
        current = current_key(config.work_dir, stage)
        for entry in stage_store(config.work_dir, stage).entries():
            manifest = Manifest.read(entry.path)
            if manifest is None or "val_log_loss" not in manifest.metrics:
                continue
            m = manifest.metrics
            rows.append({"stage": stage, "fingerprint": entry.key, "finished": manifest.finished,
                         "duration_s": manifest.duration_s, "val_log_loss": m["val_log_loss"],
                         "val_accuracy": m.get("val_accuracy"), "validation": m.get("validation", "holdout"),
                         "fold_min": m.get("fold_val_log_loss_min"), "fold_max": m.get("fold_val_log_loss_max"),
                         "current": entry.key == current,
                         "differs": differences(config, settings_used(config.work_dir, manifest))})
    return sorted(rows, key=lambda row: row["finished"], reverse=True)


def best_overlay(config, rows: list[dict]) -> tuple[dict, str]:
    """The best row by the competition's metric, and its differing settings as overlay YAML (for `--config`)."""
    if not rows:
        raise PipelineError(f"no stored runs to choose from in {config.work_dir}")
    name = score_key(config)
    best = ranked(config, rows)[0]
    nested: dict = {}
    for dotted, value in best["differs"].items():
        node = nested
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    header = (f"# the best stored {best['stage']} run ({best['fingerprint']}, {best['validation']} {name} "
              f"{best[name]:.5f}, {best['finished']}): its settings that differ from this config\n")
    return best, header + (yaml.safe_dump(nested, sort_keys=False) if nested else "{}\n")

"""The trials of a sweep: each the competition's config with its overrides, run for the objective stage in
its own variant folder, one at a time here or several at once as Ray tasks, and stopped early when its
first cv folds are clearly worse than the best trial's.

A trial runs in `work/COMP/_variants/sweep-NAME-N/`, whose `_runs` and `_cache` are the competition's:
everything it shares with earlier trials or hand-run variants (features, augmented copies, folds,
whole runs) is restored from the run cache, and what it computes is stored there for the next one.
The competition's own `work/COMP/STAGE` links are left as they were, so a sweep never moves what
`kp status` and `kp submit` see. With `compute.backend: ray` the driver brings each trial's upstream
stages up to date itself (one at a time, so a feature set two trials share is computed once) and sends
the objective stage to a Ray task; inside a task the trial's units run in that worker. Where a trial
runs changes nothing it computes: the scores are the same bit for bit.

Pruning (`Pruning`): a cv trial reports each fold's score as the fold is found stored or finishes; once
`after` folds are in, it stops when it is worse than the best finished trial on each of those folds
and worse on their mean by more than `margin` (relative; on the error rate for accuracy). Its
finished folds stay in the run cache, so raising the budget later resumes rather than repeats them.
Optuna's own WilcoxonPruner asks for significance, which three folds cannot give at its p < 0.1
(0.125 at best), so the rule here is the paired, every-fold-worse test a competitor applies by eye.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pipeline.core.errors import PipelineError, RunStopped
from pipeline.experiments.run_table import score_key

VARIANT_PREFIX = "sweep-"  # a trial's variant folder: sweep-NAME-N


@dataclass(frozen=True)
class Pruning:
    """When a cv trial stops early: after at least `after` folds, each worse than the best finished
    trial's same fold, and their mean worse than that trial's mean on them by more than `margin`."""

    after: int = 2
    margin: float = 0.05


@dataclass(frozen=True)
class TrialSpec:
    """What a trial is, in plain values (a Ray task rebuilds the config from them).

    comp, root, extra_files, sets: the sweep's base config, as `load_config` takes it.
    sweep: the sweep's name; number: the trial's (1-based); stage: the objective.
    overrides: dotted key -> raw YAML value, as `--set` takes them.
    command: the `kp` command that reruns the trial alone.
    """

    comp: str
    root: Path
    extra_files: tuple[str, ...]
    sets: tuple[str, ...]
    sweep: str
    number: int
    stage: str
    overrides: dict[str, str] = field(default_factory=dict)
    command: str = ""

    def config(self, local_units: bool = False):
        """The trial's variant config (`work/COMP/_variants/sweep-NAME-N/`); `local_units`: its units run in
        this process whatever `compute` says (a trial that is itself a Ray task)."""
        from pipeline.engine.config import load_config, parse_assignment

        base = load_config(self.comp, self.root, list(self.extra_files), list(self.sets), shallow=True)
        overrides = dict(parse_assignment(f"{key}={raw}") for key, raw in self.overrides.items())
        if local_units:
            overrides["compute.backend"] = "local"
        return base.variant_of(f"{VARIANT_PREFIX}{self.sweep}-{self.number}", overrides, self.stage,
                               f"trial {self.number} of sweep {self.sweep}")


def fold_loss(score_name: str, value: float) -> float:
    """A fold's score as a loss (lower is better): log loss itself, or the error rate for accuracy."""
    from pipeline.evaluation.metrics import score_named

    return score_named(score_name).loss(value)


def prune_reason(score_name: str, folds: dict[int, float], best: dict[int, float], total: int,
                 pruning: Pruning | None) -> str | None:
    """Why a trial with these fold scores so far should stop, or None to go on.

    Args:
        score_name: `val_log_loss` or `val_accuracy`.
        folds: the trial's scores by fold number so far.
        best: the best finished trial's scores by fold number ({} when there is none yet).
        total: the number of folds (a trial with all of them in is finished, never stopped).
        pruning: the rule (None: never stop).
    """
    shared = sorted(set(folds) & set(best))
    if pruning is None or len(shared) < pruning.after or len(folds) >= total:
        return None
    mine = [fold_loss(score_name, folds[f]) for f in shared]
    theirs = [fold_loss(score_name, best[f]) for f in shared]
    mean_mine, mean_theirs = sum(mine) / len(mine), sum(theirs) / len(theirs)
    if not all(m > t for m, t in zip(mine, theirs)) or mean_mine <= mean_theirs * (1 + pruning.margin):
        return None
    worse = f"{100 * (mean_mine / mean_theirs - 1):.0f}%" if mean_theirs > 0 else "any margin"
    return (f"stopped after {len(folds)} of {total} folds: on folds {', '.join(map(str, shared))} its "
            f"{score_name} is {sum(folds[f] for f in shared) / len(shared):.4f} against the best trial's "
            f"{sum(best[f] for f in shared) / len(shared):.4f}, worse on each fold and by {worse} "
            f"(pruning: after {pruning.after} folds, margin {pruning.margin:g})")


def best_folds(score_name: str, records) -> dict[int, float]:
    """The fold scores of the best finished (not stopped) trial among `records`, by fold number."""
    finished = [r for r in records if r.get(score_name) is not None and r.get("fold_scores")]
    if not finished:
        return {}
    best = min(finished, key=lambda r: fold_loss(score_name, r[score_name]))
    return {int(fold): value for fold, value in best["fold_scores"].items()}


def run_trial(spec: TrialSpec, best: dict[int, float], pruning: Pruning | None, say=print,
              local_units: bool = False, judge: Callable[[dict[int, float]], str | None] | None = None) -> dict:
    """One trial: its objective stage brought up to date in its variant folder, as `kp STAGE` would.

    Args:
        spec: the trial.
        best: the best finished trial's fold scores (`best_folds`), for pruning.
        pruning: when to stop a cv trial early (None: never).
        say: prints a line.
        local_units: run the trial's units in this process (it is a Ray task itself).
        judge: `judge(fold scores so far)` -> why to stop the trial, or None (an Optuna search's study
            through `pipeline.experiments.pruning.study_judge`); None: `prune_reason` against `best`.

    Returns:
        Its record: trial, overrides, command, objective, the score (None when stopped early), `pruned`
        (why, when it was), `fold_scores`, fingerprint, seconds, the stages that ran (rather than being
        restored or skipped), validation kind, the folds' spread.
    """
    from pipeline.core.cache import Manifest
    from pipeline.core.executor import watching_units
    from pipeline.core.runs import unit_store_name
    from pipeline.engine import runner
    from pipeline.engine.status import expected_fingerprints

    config = spec.config(local_units)
    score_name = score_key(config)
    total = int(config.get("split.folds"))
    folds: dict[int, float] = {}

    models = config.predicts(spec.stage).models  # (kind, metrics list) of a stage whose models are units
    folds_store = unit_store_name(spec.stage, models[0]) if models else None

    def watch(store_name: str, unit, record: dict) -> None:
        if store_name != folds_store or "fold" not in record:
            return
        folds[int(record["fold"])] = float(record[score_name])
        reason = judge(folds) if judge is not None else prune_reason(score_name, folds, best, total, pruning)
        if reason is not None:
            raise RunStopped(reason)

    clock, actions, pruned = time.perf_counter(), {}, None
    try:
        with watching_units(watch):
            runner.run(config, [spec.stage], actions=actions)
    except RunStopped as stop:
        pruned, actions[spec.stage] = str(stop), "stopped"  # it trained the folds it reported
    record: dict[str, Any] = {"trial": spec.number, "overrides": spec.overrides, "command": spec.command,
                              "objective": spec.stage, score_name: None,
                              "fingerprint": expected_fingerprints(config)[spec.stage],
                              "seconds": round(time.perf_counter() - clock, 1),
                              "ran": [name for name, action in actions.items() if action in ("ran", "stopped")]}
    if pruned is not None:
        record.update({"pruned": pruned, "fold_scores": {str(f): v for f, v in sorted(folds.items())}})
    else:
        metrics = Manifest.read(config.work_dir / spec.stage).metrics
        if score_name not in metrics:
            raise PipelineError(f"{config.work_dir / spec.stage}: the run's metrics hold no {score_name}")
        record.update({score_name: float(metrics[score_name]), "validation": metrics.get("validation", "holdout"),
                       "fold_scores": {str(r["fold"]): r[score_name] for r in metrics.get("fold_runs", [])},
                       **{k: metrics[k] for k in ("fold_val_log_loss_min", "fold_val_log_loss_max") if k in metrics}})
    say(outcome(record, score_name))
    return record


def outcome(record: dict, score_name: str) -> str:
    """A trial's line once it ended: stopped early and why, or its score and what ran."""
    if record.get("pruned"):
        return f"trial {record['trial']}: pruned, {record['pruned']}"
    ran = record["ran"]
    return f"trial {record['trial']}: {score_name} {record[score_name]:.5f}" + (
        f" (ran {', '.join(ran)})" if ran else " (nothing ran: every result was stored)")


def _trial_task(spec: TrialSpec, best: dict[int, float], pruning: Pruning | None) -> dict:
    """On a Ray worker: one trial, its units in this worker (its log lines go to the worker's log)."""
    from pipeline.core.executor import say

    return run_trial(spec, best, pruning, say=say, local_units=True)


def run_trials(base, next_trial: Callable[[], TrialSpec | None], finish: Callable[[TrialSpec, dict], None],
               best: Callable[[], dict[int, float]], pruning: Pruning | None, say=print,
               judge_of: Callable[[TrialSpec], Callable] | None = None) -> None:
    """Run trials until `next_trial` has no more: one at a time, or as Ray tasks when `base.compute` says ray.

    Args:
        base: the sweep's base config (its `compute` section decides where trials run).
        next_trial: the next trial to start, or None when there is none; asked only when a trial can start.
        finish: called in this process with each trial and its record, as each finishes.
        best: the best finished trial's fold scores now (`best_folds`), handed to each trial as it starts.
        pruning: when to stop a cv trial early (None: never).
        say: prints a line.
        judge_of: each trial's judge when it runs here (`run_trial`'s `judge`: an Optuna search's study);
            a trial on Ray applies `prune_reason` to `best` itself.
    """
    from pipeline.engine import runner

    if base.compute.backend != "ray":
        while (spec := next_trial()) is not None:
            say(f"trial {spec.number}: {spec.command}")
            finish(spec, run_trial(spec, best(), pruning, say, judge=judge_of(spec) if judge_of else None))
        return
    from pipeline.core.executor import connect, failure_reason

    ray = connect(base.compute)
    task = ray.remote(_trial_task).options(num_cpus=base.compute.cpus_per_task, num_gpus=base.compute.gpus_per_task,
                                           max_retries=base.compute.retries)
    slots = max(1, int(ray.cluster_resources().get("CPU", 1) // base.compute.cpus_per_task))
    pending, failures, exhausted = {}, [], False
    while True:
        while not exhausted and len(pending) < slots:
            spec = next_trial()
            if spec is None:
                exhausted = True
                break
            say(f"trial {spec.number}: {spec.command}")
            variant, actions = spec.config(), {}
            runner.run(variant, [s for s in variant.stage_names if s != spec.stage], actions=actions)
            prepared = [name for name, action in actions.items() if action == "ran"]
            pending[task.remote(spec, best(), pruning)] = (spec, prepared)
            say(f"trial {spec.number}: sent to Ray ({len(pending)} of {slots} slots busy)")
        if not pending:
            break
        done, _ = ray.wait(list(pending), num_returns=1)
        spec, prepared = pending.pop(done[0])
        try:
            record = ray.get(done[0])
        except Exception as exc:  # the trial's own error, or its worker's death after Ray's retries
            failures.append(f"trial {spec.number} ({spec.command}): {failure_reason(exc)}")
            say(f"trial {spec.number}: failed on Ray")
            continue
        record = {**record, "ran": [*prepared, *record["ran"]]}
        say(outcome(record, score_key(base)))
        finish(spec, record)
    if failures:
        raise PipelineError(f"{len(failures)} trials failed on Ray (the finished ones are kept; a rerun runs only "
                            "the missing ones): " + "; ".join(failures))

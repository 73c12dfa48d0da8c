"""The sweep's pruning rule as Optuna's pruner (`FoldPruner`), so that an Optuna search's study decides
when a trial stops: the trial reports each fold's score as an intermediate value and asks the study.

The rule itself is `pipeline.experiments.trials.prune_reason` (a grid sweep, and a trial run as a Ray
task, which has no study at hand, apply it directly to the best finished trial's fold scores). Imports Optuna.
"""
from __future__ import annotations

import optuna
from optuna.trial import TrialState

from pipeline.evaluation.metrics import score_named
from pipeline.experiments.trials import Pruning, prune_reason


class FoldPruner(optuna.pruners.BasePruner):
    """Prune a trial whose reported folds are each worse than the best completed trial's same folds, and
    their mean worse by more than the margin (`Pruning`), once it has reported `Pruning.after` of them.

    Args:
        score_name: the score the folds report (`val_log_loss` or `val_accuracy`).
        total: the number of folds (a trial with all of them in is never pruned).
        pruning: the rule's settings.
    """

    def __init__(self, score_name: str, total: int, pruning: Pruning):
        self.score_name, self.total, self.pruning = score_name, total, pruning
        self.last_reason: str | None = None  # why `prune` last said yes, for the trial's record

    def reason(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> str | None:
        """Why `trial` should stop now, or None."""
        folds = {int(step): value for step, value in trial.intermediate_values.items()}
        completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        score = score_named(self.score_name)
        best = min(completed, key=lambda t: score.loss(t.value)) if completed else None
        best_folds = {int(step): value for step, value in best.intermediate_values.items()} if best else {}
        return prune_reason(self.score_name, folds, best_folds, self.total, self.pruning)

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        self.last_reason = self.reason(study, trial)
        return self.last_reason is not None


def study_judge(trial: optuna.trial.Trial, pruner: FoldPruner):
    """A trial's judge (`run_trial`'s `judge`) that its study drives: each new fold's score is reported to
    `trial`, and the study's pruner (`pruner`) says whether to stop.

    Returns:
        judge(folds) -> the reason to stop, or None; `judge.reported`: the folds reported so far.
    """
    reported: set[int] = set()

    def judge(folds: dict[int, float]) -> str | None:
        for fold in sorted(set(folds) - reported):
            trial.report(folds[fold], fold)
            reported.add(fold)
        return pruner.last_reason if trial.should_prune() else None

    judge.reported = reported
    return judge

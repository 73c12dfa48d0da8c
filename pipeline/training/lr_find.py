"""The learning-rate range test (fastai's `lr_find`, after Leslie Smith): which rate to train a model at.

From a copy of the model (the original's weights are never touched), trained by one Keras `fit`
whose callback (as fastai's `LRFinder`) sets an exponentially rising learning rate from `start` to
`end` over at most `steps` batches; each batch's own loss (not Keras' running mean over the epoch)
is smoothed with a bias-corrected exponential moving average, and the test stops once the smoothed
loss passes `diverge` times its minimum.
Suggested: the rate where the smoothed loss falls fastest (steepest descent in log-rate) and the
rate at the minimum divided by 10 (fastai's two classic readings). Imports Keras.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.core.config_reader import ConfigReader


@dataclass(frozen=True)
class Ramp:
    """How the range test raises the rate and when it stops.

    start, end: the first and the largest rate tried; the rate grows by (end / start) ** (1 / steps).
    steps: batches at most (passes over the rows repeat, reshuffled).
    beta: smoothing of the loss (0.98 as fastai).
    diverge: stop when the smoothed loss exceeds this times its minimum (or is not finite).
    """

    start: float = 1e-7
    end: float = 10.0
    steps: int = 200
    beta: float = 0.98
    diverge: float = 4.0


@dataclass
class RangeTest:
    """What the range test saw: one entry per batch trained."""

    rates: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    diverged: bool = False

    def suggestions(self, skip_start: int = 10, skip_end: int = 5) -> dict[str, float]:
        """`steepest`: the middle rate of the smoothed loss's steepest fall, measured per log-rate over
        a window of a tenth of the batches (a single-batch slope is noise); `minimum_over_10`: the
        rate of the lowest smoothed loss / 10. The first `skip_start` batches (the average is still
        forming) and the last `skip_end` (the blow-up) are left out, as fastai does."""
        end = len(self.rates) - skip_end if len(self.rates) - skip_end > skip_start + 3 else len(self.rates)
        rates = np.asarray(self.rates[skip_start:end])
        smoothed = np.asarray(self.smoothed[skip_start:end])
        if len(rates) < 4:
            raise ValueError(f"the range test ran only {len(self.rates)} batches; give it more steps or rows")
        lowest = int(np.argmin(smoothed))
        window = max(2, len(rates) // 10)
        logs = np.log(rates)
        upto = max(1, lowest - window + 1)  # windows that end by the minimum: the fall, not the blow-up after it
        slopes = [(smoothed[i + window] - smoothed[i]) / (logs[i + window] - logs[i]) for i in range(upto)]
        steepest = int(np.argmin(slopes))
        return {"steepest": float(np.exp((logs[steepest] + logs[steepest + window]) / 2)),
                "minimum_over_10": float(rates[lowest] / 10)}


def range_test(model, x: np.ndarray | None, y: np.ndarray | None, optimizer: str = "adam", ramp: Ramp = Ramp(),
               batch_size: int = 64, seed: int = 0, loss: str = "sparse_categorical_crossentropy",
               batches=None, rate_factors: dict[str, float] | None = None) -> RangeTest:
    """Run the range test on a copy of `model` (its weights and optimizer state stay as they are).

    Args:
        model: a built Keras model.
        x, y: training rows and their labels (class indices), shuffled here with `seed`; None with `batches`.
        batches: an iterator of (x, y) batches to take instead (images streamed from disk).
        rate_factors: discriminative rates (`pipeline.training.fit.make_optimizer`): the tested rate
            times each named variable's factor.
        optimizer: adam | sgd | rmsprop (`pipeline.training.fit.make_optimizer`).
        ramp: the rates tried, the batches at most, the smoothing and when to stop (`Ramp`).
        batch_size: rows per batch.
        seed: the batch order.

    Returns:
        A `RangeTest`.
    """
    import keras

    from pipeline.training.fit import make_optimizer

    trial = keras.models.clone_model(model)
    trial.set_weights(model.get_weights())
    # one step per call, so every batch's own loss reaches the callback (steps_per_execution=1)
    trial.compile(optimizer=make_optimizer(optimizer, ramp.start, rate_factors=rate_factors), loss=loss)
    if batches is None:
        batches = _shuffled_batches(x, y, batch_size, seed)
    recorder = _RangeRecorder(ramp)

    class RangeTestCallback(keras.callbacks.Callback):
        """The range test as a callback on one `fit`, as fastai's `LRFinder` is."""

        def on_train_batch_begin(self, batch, logs=None):
            self.model.optimizer.learning_rate.assign(recorder.rate(batch))

        def on_train_batch_end(self, batch, logs=None):
            if recorder.record(batch, float(logs["loss"])):
                self.model.stop_training = True

    trial.fit(_forever(batches), epochs=1, steps_per_epoch=ramp.steps, callbacks=[RangeTestCallback()], shuffle=False,
              verbose=0)
    return recorder.result


def _forever(batches):
    """A generator over `batches` (an iterator of (x, y) batches) that Keras' fit can take."""
    for x, y in batches:
        yield np.asarray(x), np.asarray(y)


class _RangeRecorder:
    """What the range test's callback does: the rate of each batch on the exponential ramp, and each
    batch's own loss (Keras logs the epoch's running mean; batch k's loss is k * mean_k - (k - 1) *
    mean_(k-1)), smoothed; `record` says when the smoothed loss has diverged."""

    def __init__(self, ramp: Ramp):
        self.start, self.factor = ramp.start, (ramp.end / ramp.start) ** (1 / max(1, ramp.steps - 1))
        self.beta, self.diverge = ramp.beta, ramp.diverge
        self.result, self.average, self.best, self.mean = RangeTest(), 0.0, math.inf, 0.0

    def rate(self, batch: int) -> float:
        return self.start * self.factor ** batch

    def record(self, batch: int, running_mean: float) -> bool:
        loss_value = (batch + 1) * running_mean - batch * self.mean
        self.mean = running_mean
        self.average = self.beta * self.average + (1 - self.beta) * loss_value
        smoothed = self.average / (1 - self.beta ** (batch + 1))
        self.result.rates.append(self.rate(batch))
        self.result.losses.append(loss_value)
        self.result.smoothed.append(smoothed)
        self.best = min(self.best, smoothed)
        self.result.diverged = not math.isfinite(smoothed) or smoothed > self.diverge * self.best
        return self.result.diverged


def _shuffled_batches(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int):
    """(x, y) batches of the rows, reshuffled with `seed` at every pass, forever."""
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(x))
        for first in range(0, len(x), batch_size):
            rows = order[first:first + batch_size]
            yield x[rows], y[rows]


def plot_range_test(test: RangeTest, suggestions: dict[str, float], path, title: str = "") -> None:
    """Loss against learning rate (log scale), raw and smoothed, with the suggested rates marked."""
    from pipeline.evaluation.plots import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(test.rates, test.losses, color="0.75", linewidth=0.8, label="batch loss")
    ax.plot(test.rates, test.smoothed, color="C0", label="smoothed")
    for (name, rate), colour in zip(suggestions.items(), ("C1", "C2")):
        ax.axvline(rate, color=colour, linestyle="--", label=f"{name}: {rate:.2g}")
    finite = [v for v in test.smoothed if math.isfinite(v)]
    if finite:
        ax.set_ylim(min(finite) * 0.9, min(max(finite), 4 * min(finite)) * 1.05)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title(title or "learning-rate range test")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def find_for_stage(config: ConfigReader, stage: str, inputs: dict, out: Path, steps: int = 200, apply: bool = False,
                   say=print) -> dict:
    """The range test on the real training rows of `stage` (finetune: a fresh model as finetune builds
    it; bnretrain: finetune's trained head with batchnorm inserted, as bnretrain starts; tune: the
    source's head on the backbone with its top blocks unfrozen, on the training images streamed and
    augmented as tune streams them, the backbone at its `backbone_lr_mult` of the tested rate);
    nothing its upstream stages wrote changes. Writes `lr_find.png` and `lr_find.json` into `out`;
    with `apply` also `overlay.yaml`: the stage's phases rescaled so the first phase's rate is the
    `minimum_over_10` suggestion, the others keeping their ratio to it (tune: its `lr`), for `--config`.

    Args:
        config: the stage's config view.
        stage: finetune | bnretrain | tune.
        inputs: its upstream output folders by stage name (up to date).
        out: where the files go (`work/COMP/lr_find/STAGE/`).
        steps: batches at most.
        apply: write the overlay.
        say: prints progress.

    Returns:
        The record: suggestions, current rate, batches run, whether it diverged, the files written.
    """
    import json

    import keras
    import yaml

    from pipeline.core.artifacts import LR_FIND_OVERLAY, LR_FIND_PLOT, LR_FIND_RECORD
    from pipeline.core.cache import write_text_atomic
    from pipeline.core.ownership import check_replaceable, owned_text
    from pipeline.training.recipes import recipe
    from pipeline.training.record import set_determinism

    s = config.section(stage)
    if apply:  # before the range test: a file someone edited there is not replaced after minutes of work
        check_replaceable(out / LR_FIND_OVERLAY, "move or rename it (kp lr-find --apply writes a fresh one there)")
    set_determinism(False)
    keras.utils.set_random_seed(s.seed)
    step = recipe(stage).resolved(config)  # the recipe the stage trains with under this config
    model, x, y, batches, factors, rows = step.range_test_setup(config, inputs, steps, warn=say)
    say(f"range test for {stage}: {rows:,} training rows, {s.optimizer}, batch {s.batch_size}, "
        f"at most {steps} batches")
    test = range_test(model, x, y, optimizer=s.optimizer, ramp=Ramp(steps=steps), batch_size=s.batch_size,
                      batches=batches, rate_factors=factors)
    suggestions = test.suggestions()
    out.mkdir(parents=True, exist_ok=True)
    stepped = hasattr(s, "phases")  # a list of phases (finetune, bnretrain), or one peak rate (tune)
    current = s.phases[0].lr if stepped else s.lr
    if stepped:
        scale = suggestions["minimum_over_10"] / current
        phases = [{"epochs": p.epochs, "lr": float(f"{p.lr * scale:.3g}")} for p in s.phases]
        setting, what = {"phases": phases}, "the first phase's rate"
    else:
        phases, setting, what = None, {"lr": float(f"{suggestions['minimum_over_10']:.3g}")}, f"{stage}'s peak rate"
    if apply:
        write_text_atomic(out / LR_FIND_OVERLAY, owned_text(
            f"# kp lr-find --comp {config.comp} --stage {stage}: {what} set to the range test's\n"
            f"# minimum / 10 ({suggestions['minimum_over_10']:.3g}; steepest fall at {suggestions['steepest']:.3g})"
            + (", the others keep their ratio" if phases else "") + f".\n# Use: --config {out / LR_FIND_OVERLAY}\n"
            + yaml.safe_dump({stage: setting}, default_flow_style=None, sort_keys=False), "kp lr-find --apply"))
    plot_range_test(test, suggestions, out / LR_FIND_PLOT, f"{config.comp} {stage}: learning-rate range test")
    record = {"stage": stage, "optimizer": s.optimizer, "batch_size": s.batch_size, "current_lr": current,
              "suggestions": suggestions, "suggested_phases": phases, "batches": len(test.rates),
              "diverged": test.diverged, "rates": test.rates, "losses": test.losses, "smoothed": test.smoothed,
              "plot": str(out / LR_FIND_PLOT), "overlay": str(out / LR_FIND_OVERLAY) if apply else None}
    write_text_atomic(out / LR_FIND_RECORD, json.dumps(record, indent=1) + "\n")
    return record

"""Training a Keras model from the config: optimizer, learning-rate schedule, best-epoch weights.

The course changed the learning rate with `model.optimizer.lr = x` after the first fit, which
silently did nothing in its Keras. Here Keras' own mechanisms own the rate: `phases` is a
`LearningRateScheduler` that assigns the optimizer's learning-rate variable at each epoch, and
`cosine` is a `keras.optimizers.schedules.CosineDecay` (with optional linear warmup) evaluated by
the optimizer at every step. Either way `history.csv`'s `learning_rate` column is read back from
the optimizer, so it is what the updates really used. Every epoch and the best one by validation
loss are kept one way, `pipeline.training.epochs.EpochKeeper`: in memory, or for a run that must
survive being killed (`FitOptions.backup_dir`) on disk around Keras' `BackupAndRestore`.
Discriminative learning rates (the tune stage: backbone layers slower than the head) are an
optimizer whose update of each variable uses the schedule's rate times that variable's factor,
so the one schedule drives every group. A head on cached arrays runs `STEPS_PER_EXECUTION` steps
per call of its compiled train function (the same updates, bit for bit; far less Python per step).
Imports Keras.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core.artifacts import HISTORY_FILE
from pipeline.core.runs import curves_dir

OPTIMIZERS = ("adam", "sgd", "rmsprop")
SCHEDULES = ("phases", "cosine")
# Steps per compiled call when training on arrays: State Farm's 128-unit head trains an epoch 1.44x
# faster at 32 than at 1 on these CPUs, with identical predictions (bench/finetune_modes.py --vary
# steps); batch-end callbacks then run every 32 steps (lr-find, which needs every step, compiles its own).
STEPS_PER_EXECUTION = 32


@dataclass(frozen=True)
class Phase:
    epochs: int
    lr: float


def epoch_learning_rates(phases: list[Phase]) -> list[float]:
    """The learning rate of each epoch under a list of phases: [(2, 1e-3), (1, 1e-4)] -> [1e-3, 1e-3, 1e-4]."""
    return [phase.lr for phase in phases for _ in range(phase.epochs)]


def one_hot(labels: np.ndarray, classes: int) -> np.ndarray:
    """Class indices as float32 probability rows."""
    return np.eye(classes, dtype=np.float32)[labels]


def make_optimizer(name: str, learning_rate, momentum: float = 0.9, rate_factors: dict[str, float] | None = None,
                   ema: float | None = None, ema_every: int | None = None, accumulate: int | None = None):
    """A Keras optimizer.

    Args:
        name: adam | sgd | rmsprop.
        learning_rate: a float or a `keras.optimizers.schedules` schedule.
        momentum: sgd only.
        rate_factors: variable path -> factor of the learning rate for that variable (discriminative
            rates); variables not named use the rate itself. None: a plain Keras optimizer.
        ema: Keras' own moving average of the weights (`use_ema`) with this momentum; None: off.
        ema_every: steps between two writes of the average into the model's weights.
        accumulate: Keras' `gradient_accumulation_steps` (None: update every step).
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; expected one of {OPTIMIZERS}")
    arguments = {"learning_rate": learning_rate, **({"momentum": momentum} if name == "sgd" else {})}
    if ema is not None:
        arguments.update(use_ema=True, ema_momentum=ema, ema_overwrite_frequency=ema_every)
    if accumulate is not None:
        arguments.update(gradient_accumulation_steps=accumulate)
    if rate_factors is None:
        return _optimizer_class(name)(**arguments)
    return discriminative(name)(rate_factors=rate_factors, **arguments)


def _optimizer_class(name: str):
    import keras

    return {"adam": keras.optimizers.Adam, "sgd": keras.optimizers.SGD, "rmsprop": keras.optimizers.RMSprop}[name]


@functools.cache
def discriminative(name: str):
    """The optimizer class `name` with a learning-rate factor per variable (registered with Keras, so a
    saved model that was compiled with it loads again)."""
    import keras

    base = _optimizer_class(name)

    @keras.saving.register_keras_serializable(package="kp", name=f"Discriminative{base.__name__}")
    class Discriminative(base):
        def __init__(self, rate_factors: dict[str, float], **kwargs):
            super().__init__(**kwargs)
            self.rate_factors = {str(path): float(factor) for path, factor in rate_factors.items()}

        def build(self, var_list):
            paths = [v.path for v in var_list]
            unknown = set(self.rate_factors) - set(paths)
            if unknown or len(set(paths)) != len(paths):
                raise ValueError(f"learning-rate factors name {len(unknown)} variables the model does not train "
                                 f"(e.g. {sorted(unknown)[:3]}), or two trained variables share a path")
            super().build(var_list)
            self._factors = [self.rate_factors.get(path, 1.0) for path in paths]

        def update_step(self, gradient, variable, learning_rate):
            factor = self._factors[self._get_variable_index(variable)]
            return super().update_step(gradient, variable, learning_rate if factor == 1.0 else learning_rate * factor)

        def get_config(self):
            return {**super().get_config(), "rate_factors": self.rate_factors}

    return Discriminative


@functools.cache
def smoothed_sparse_crossentropy():
    """Cross-entropy against class indices with label smoothing (Keras has it only for one-hot targets):
    the targets become (1 - s) one-hot + s / classes, exactly as `CategoricalCrossentropy(label_smoothing=s)`
    would use them. Registered with Keras, so a saved model compiled with it loads again."""
    import keras

    @keras.saving.register_keras_serializable(package="kp", name="SmoothedSparseCrossentropy")
    class SmoothedSparseCrossentropy(keras.losses.Loss):
        def __init__(self, label_smoothing: float = 0.0, name: str = "smoothed_sparse_crossentropy", **kwargs):
            super().__init__(name=name, **kwargs)
            self.label_smoothing = float(label_smoothing)

        def call(self, y_true, y_pred):
            ops = keras.ops
            targets = ops.one_hot(ops.cast(ops.reshape(y_true, (-1,)), "int32"), ops.shape(y_pred)[-1])
            return keras.losses.categorical_crossentropy(targets, y_pred, label_smoothing=self.label_smoothing)

        def get_config(self):
            return {**super().get_config(), "label_smoothing": self.label_smoothing}

    return SmoothedSparseCrossentropy


def current_learning_rate(optimizer) -> float:
    """The value the optimizer's next update will use, read from the optimizer itself."""
    import keras

    return float(keras.ops.convert_to_numpy(optimizer.learning_rate))


def cosine_schedule(peak: float, epochs: int, steps_per_epoch: int, warmup_epochs: int = 0):
    """Linear warmup from 0 to `peak` over `warmup_epochs`, then cosine decay to 0 by the last step."""
    import keras

    warmup = warmup_epochs * steps_per_epoch
    decay = max(1, (epochs - warmup_epochs) * steps_per_epoch)
    if warmup:
        return keras.optimizers.schedules.CosineDecay(0.0, decay, warmup_target=peak, warmup_steps=warmup)
    return keras.optimizers.schedules.CosineDecay(peak, decay)


def _steps_per_execution(arrays: bool) -> int:
    """`STEPS_PER_EXECUTION` for arrays, 1 for streamed images (a step there costs far more than the
    call) and under a distribution strategy (Keras 3.15's multi-step function fails under
    MirroredStrategy: "You must feed a value for placeholder tensor", measured here)."""
    import tensorflow as tf

    return STEPS_PER_EXECUTION if arrays and not tf.distribute.has_strategy() else 1


@dataclass(frozen=True)
class FitOptions:
    """How `fit` trains: the schedule, the optimizer, the batches, and what it keeps and writes.

    phases: `phases` schedule: each phase's rate for its epochs; `cosine`: exactly one phase, its
        epochs and peak rate.
    schedule: phases | cosine.
    optimizer, momentum: see `make_optimizer`.
    batch_size: rows per step of array rows (streamed batches come batched).
    out_dir: where history.csv goes.
    verbose: 0: train silently; else one progress display of the epochs (`epoch_display`), titled `title`.
    title: names the training on the terminal (`member 2/5 (seed 1001)`).
    warmup_epochs: `cosine` only: epochs of linear warmup inside the phase.
    callbacks: more Keras callbacks, run after the schedule's.
    stop_after: train only the first this many epochs of the schedule (the schedule itself is
        unchanged) and keep the last one: an epoch count chosen elsewhere, without these rows.
    soft_targets: `train` yields probability rows (pseudo-labels, mixup) instead of class indices:
        categorical cross-entropy, and `valid`'s class indices are compared as one-hot rows.
    rate_factors: discriminative learning rates, see `make_optimizer`.
    steps_per_epoch: batches per epoch of a `train` whose length tf.data cannot tell.
    backup_dir: make the run resumable: every finished epoch is backed up there (weights,
        optimizer state, history, the best epoch's weights), and a run that finds a backup
        continues after its last epoch (`train` must then start at that epoch, see
        `pipeline.training.epochs.resumed_epoch`). The backup stays until the caller removes it.
    label_smoothing: train against targets smoothed by this much ((1 - s) one-hot + s / classes);
        the best epoch is then chosen on the validation rows' plain log loss (`val_log_loss`), not
        on the smoothed loss.
    ema: keep Keras' moving average of the weights with this momentum, written into the model at
        the end of every epoch (so the validation loss and the kept epoch are the average's); None: off.
    accumulate: update the weights every this many steps with the mean of their gradients (Keras'
        `gradient_accumulation_steps`: a larger batch than memory holds); None: every step.
    curves: also write TensorBoard event files (loss, accuracy, learning rate per epoch) to
        `pipeline.core.runs.curves_dir(out_dir)`, outside the run cache's entry.
    """

    phases: list[Phase]
    schedule: str
    optimizer: str
    momentum: float
    batch_size: int
    out_dir: Path
    verbose: int = 2
    title: str = ""
    warmup_epochs: int = 0
    callbacks: tuple = ()
    stop_after: int | None = None
    soft_targets: bool = False
    rate_factors: dict[str, float] | None = None
    steps_per_epoch: int | None = None
    backup_dir: Path | None = None
    label_smoothing: float = 0.0
    ema: float | None = None
    accumulate: int | None = None
    curves: bool = False


def fit(model, train, valid, options: FitOptions):
    """Compile and train `model`; keeps the best epoch by validation loss; writes history.csv.

    Args:
        train: (x, y) arrays, shuffled each epoch, a keras PyDataset of batches (augmentation), or a
            tf.data Dataset of (x, y) batches (with `options.steps_per_epoch` when its length is unknown).
        valid: (x, y) arrays or a tf.data Dataset of batches; None with `options.stop_after` (nothing
            is selected on any rows).
        options: how it trains (`FitOptions`).

    Returns:
        (history dict, best epoch index, best validation loss; with `stop_after` the last epoch and None).
    """
    import keras
    import tensorflow as tf

    from pipeline.training.epochs import EpochKeeper

    o = options
    arrays = isinstance(train, tuple)
    steps = o.steps_per_epoch or (math.ceil(len(train[0]) / o.batch_size) if arrays else len(train))
    rates = epoch_learning_rates(o.phases)
    epochs = len(rates)
    if o.schedule == "cosine":
        if len(o.phases) != 1:
            raise ValueError(f"schedule cosine takes exactly one phase (its epochs and peak lr), got {len(o.phases)}")
        learning_rate = cosine_schedule(o.phases[0].lr, epochs, steps, o.warmup_epochs)
        scheduling = keras.callbacks.LambdaCallback(
            on_epoch_end=lambda epoch, logs: logs.__setitem__("learning_rate", current_learning_rate(model.optimizer)))
    else:
        learning_rate = rates[0]
        scheduling = keras.callbacks.LearningRateScheduler(lambda epoch: rates[min(epoch, epochs - 1)])
    if o.soft_targets:
        loss = keras.losses.CategoricalCrossentropy(label_smoothing=o.label_smoothing) if o.label_smoothing \
            else "categorical_crossentropy"
        log_loss = keras.metrics.CategoricalCrossentropy
        if isinstance(valid, tuple):
            valid = (valid[0], one_hot(valid[1], model.output_shape[-1]))
        elif valid is not None:  # a tf.data Dataset of (images, class indices) batches
            classes = model.output_shape[-1]
            valid = valid.map(lambda images, labels: (images, tf.one_hot(labels, classes)))
    else:
        loss = smoothed_sparse_crossentropy()(o.label_smoothing) if o.label_smoothing \
            else "sparse_categorical_crossentropy"
        log_loss = keras.metrics.SparseCategoricalCrossentropy
    # with smoothed targets the loss is not the log loss: the best epoch is chosen on the plain one
    metrics = ["accuracy", log_loss(name="log_loss")] if o.label_smoothing else ["accuracy"]
    monitor = "val_log_loss" if o.label_smoothing else "val_loss"
    model.compile(optimizer=make_optimizer(o.optimizer, learning_rate, o.momentum, o.rate_factors, o.ema, steps,
                                           o.accumulate),
                  loss=loss, metrics=metrics, steps_per_execution=_steps_per_execution(arrays))
    callbacks = [scheduling, *o.callbacks]
    log_dir = curves_dir(o.out_dir) if o.curves else None
    if log_dir is not None:
        from pipeline.training.curves import epoch_curves

        callbacks.append(epoch_curves(log_dir))
    run_epochs = epochs if o.stop_after is None else min(o.stop_after, epochs)
    valid = valid if o.stop_after is None else None
    keeper = EpochKeeper(o.backup_dir, select_best=o.stop_after is None, monitor=monitor)
    callbacks.append(keeper)
    if o.verbose:  # kp's own display of the epochs (Keras' lines would land on the progress bars)
        from pipeline.training.epoch_display import epoch_display

        callbacks.append(epoch_display(o.title, run_epochs))
    if arrays:
        model.fit(train[0], train[1], validation_data=valid, batch_size=o.batch_size, epochs=run_epochs,
                  shuffle=True, callbacks=callbacks, verbose=0)
    else:
        # a keras PyDataset's batch order is shuffled by fit; a tf.data stream comes shuffled (and Keras warns
        # that it ignores shuffle=True there)
        model.fit(train, validation_data=valid, epochs=run_epochs, steps_per_epoch=o.steps_per_epoch,
                  callbacks=callbacks, verbose=0, shuffle=not isinstance(train, tf.data.Dataset))
    keeper.write_history(o.out_dir / HISTORY_FILE)
    best_epoch = run_epochs - 1 if keeper.best_epoch is None else keeper.best_epoch
    return keeper.history, best_epoch, keeper.best

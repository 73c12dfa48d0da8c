"""Training a Keras model from the config: optimizer, learning-rate schedule, best-epoch weights.

The course changed the learning rate with `model.optimizer.lr = x` after the first fit, which
silently did nothing in its Keras. Here Keras' own mechanisms own the rate: `phases` is a
`LearningRateScheduler` that assigns the optimizer's learning-rate variable at each epoch, and
`cosine` is a `keras.optimizers.schedules.CosineDecay` (with optional linear warmup) evaluated by
the optimizer at every step. Either way `history.csv`'s `learning_rate` column is read back from
the optimizer, so it is what the updates really used. The best epoch by validation loss is kept
by `EarlyStopping(restore_best_weights=True)` with a patience that never stops training early.
Imports Keras.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core.artifacts import HISTORY_FILE

OPTIMIZERS = ("adam", "sgd", "rmsprop")
SCHEDULES = ("phases", "cosine")


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


def make_optimizer(name: str, learning_rate, momentum: float = 0.9):
    """A Keras optimizer; `learning_rate` is a float or a `keras.optimizers.schedules` schedule."""
    import keras

    if name == "adam":
        return keras.optimizers.Adam(learning_rate=learning_rate)
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate=learning_rate, momentum=momentum)
    if name == "rmsprop":
        return keras.optimizers.RMSprop(learning_rate=learning_rate)
    raise ValueError(f"unknown optimizer {name!r}; expected one of {OPTIMIZERS}")


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


def fit(model, train, valid: tuple | None, *, phases: list[Phase], schedule: str, optimizer: str,
        momentum: float, batch_size: int, out_dir: Path, verbose: int = 2, warmup_epochs: int = 0,
        extra_callbacks=(), stop_after: int | None = None, soft_targets: bool = False):
    """Compile and train `model`; keeps the best epoch by validation loss; writes history.csv.

    Args:
        train: (x, y) arrays, shuffled each epoch, or a keras PyDataset of batches (augmentation).
        valid: (x, y) arrays; None with `stop_after` (nothing is selected on any rows).
        phases: `phases` schedule: each phase's rate for its epochs; `cosine`: exactly one phase,
            its epochs and peak rate.
        warmup_epochs: `cosine` only: epochs of linear warmup inside the phase.
        stop_after: train only the first this many epochs of the schedule (the schedule itself is
            unchanged) and keep the last one: an epoch count chosen elsewhere, without these rows.
        soft_targets: `train` yields probability rows (pseudo-labels) instead of class indices:
            categorical cross-entropy, and `valid`'s class indices are compared as one-hot rows.

    Returns:
        (history dict, best epoch index, best validation loss; with `stop_after` the last epoch and None).
    """
    import keras

    arrays = isinstance(train, tuple)
    steps = math.ceil(len(train[0]) / batch_size) if arrays else len(train)
    rates = epoch_learning_rates(phases)
    epochs = len(rates)
    if schedule == "cosine":
        if len(phases) != 1:
            raise ValueError(f"schedule cosine takes exactly one phase (its epochs and peak lr), got {len(phases)}")
        learning_rate = cosine_schedule(phases[0].lr, epochs, steps, warmup_epochs)
        scheduling = keras.callbacks.LambdaCallback(
            on_epoch_end=lambda epoch, logs: logs.__setitem__("learning_rate", current_learning_rate(model.optimizer)))
    else:
        learning_rate = rates[0]
        scheduling = keras.callbacks.LearningRateScheduler(lambda epoch: rates[min(epoch, epochs - 1)])
    loss = "sparse_categorical_crossentropy"
    if soft_targets:
        loss = "categorical_crossentropy"
        if valid is not None:
            valid = (valid[0], one_hot(valid[1], model.output_shape[-1]))
    model.compile(optimizer=make_optimizer(optimizer, learning_rate, momentum), loss=loss, metrics=["accuracy"])
    logger = keras.callbacks.CSVLogger(str(out_dir / HISTORY_FILE))
    if stop_after is not None:
        best, callbacks, valid, run_epochs = None, [scheduling, *extra_callbacks, logger], None, min(stop_after, epochs)
    else:
        best = keras.callbacks.EarlyStopping(monitor="val_loss", patience=epochs + 1, restore_best_weights=True)
        callbacks, run_epochs = [scheduling, best, *extra_callbacks, logger], epochs
    if arrays:
        history = model.fit(train[0], train[1], validation_data=valid, batch_size=batch_size, epochs=run_epochs,
                            shuffle=True, callbacks=callbacks, verbose=verbose)
    else:
        history = model.fit(train, validation_data=valid, epochs=run_epochs, callbacks=callbacks, verbose=verbose)
    if best is None:
        return history.history, run_epochs - 1, None
    return history.history, best.best_epoch, best.best

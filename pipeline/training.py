"""Training a Keras model from the config: optimizer, learning-rate schedule, best-epoch weights.

The course changed the learning rate with `model.optimizer.lr = x` after the first fit, which
silently did nothing in its Keras. Here one callback owns the schedule and assigns the optimizer's
own learning-rate variable (per epoch for `phases`, per batch for `cosine`), then logs the value it
reads back from the optimizer, so `history.csv`'s `lr` column is what the updates really used.
Imports Keras.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Phase:
    epochs: int
    lr: float


def epoch_learning_rates(phases: list[Phase]) -> list[float]:
    """The learning rate of each epoch under a list of phases: [(2, 1e-3), (1, 1e-4)] -> [1e-3, 1e-3, 1e-4]."""
    return [phase.lr for phase in phases for _ in range(phase.epochs)]


def make_optimizer(name: str, lr: float, momentum: float = 0.9):
    import keras

    if name == "adam":
        return keras.optimizers.Adam(learning_rate=lr)
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate=lr, momentum=momentum)
    if name == "rmsprop":
        return keras.optimizers.RMSprop(learning_rate=lr)
    raise ValueError(f"unknown optimizer {name!r}")


def current_learning_rate(optimizer) -> float:
    """The value the optimizer's next update will use, read from its own variable."""
    import keras

    return float(keras.ops.convert_to_numpy(optimizer.learning_rate))


def _callback_base():
    import keras

    return keras.callbacks.Callback


def schedule_callback(phases: list[Phase], schedule: str, steps_per_epoch: int):
    """A callback that sets the optimizer's learning rate by `schedule` ('phases' or 'cosine')."""
    rates = epoch_learning_rates(phases)
    total_steps = max(1, len(rates) * steps_per_epoch)

    class LearningRateSchedule(_callback_base()):
        def __init__(self):
            super().__init__()
            self.epoch = 0

        def _set(self, value: float) -> None:
            self.model.optimizer.learning_rate.assign(value)

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch
            if schedule == "phases":
                self._set(rates[min(epoch, len(rates) - 1)])

        def on_train_batch_begin(self, batch, logs=None):
            if schedule == "cosine":
                step = self.epoch * steps_per_epoch + batch
                self._set(rates[0] * 0.5 * (1 + math.cos(math.pi * step / total_steps)))

        def on_epoch_end(self, epoch, logs=None):
            if logs is not None:
                logs["lr"] = current_learning_rate(self.model.optimizer)

    return LearningRateSchedule()


def best_weights_callback(monitor: str = "val_loss"):
    """Keeps the weights of the epoch with the lowest `monitor` and restores them when training ends."""

    class KeepBestWeights(_callback_base()):
        def __init__(self):
            super().__init__()
            self.best, self.best_epoch, self.weights = math.inf, -1, None

        def on_epoch_end(self, epoch, logs=None):
            value = (logs or {}).get(monitor)
            if value is not None and value < self.best:
                self.best, self.best_epoch, self.weights = value, epoch, self.model.get_weights()

        def on_train_end(self, logs=None):
            if self.weights is not None:
                self.model.set_weights(self.weights)

    return KeepBestWeights()


def fit(model, train, valid: tuple, *, phases: list[Phase], schedule: str, optimizer: str,
        momentum: float, batch_size: int, out_dir: Path, verbose: int = 2, extra_callbacks=()):
    """Compile and train `model`; keeps the best epoch by validation loss; writes history.csv.

    `train` is (x, y) arrays, shuffled each epoch, or a keras PyDataset of batches (augmentation).
    Returns (history dict, best epoch index, best validation loss).
    """
    import keras

    model.compile(optimizer=make_optimizer(optimizer, phases[0].lr, momentum),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    arrays = isinstance(train, tuple)
    steps = math.ceil(len(train[0]) / batch_size) if arrays else len(train)
    best = best_weights_callback()
    callbacks = [schedule_callback(phases, schedule, steps), best, *extra_callbacks,
                 keras.callbacks.CSVLogger(str(out_dir / "history.csv"))]
    epochs = len(epoch_learning_rates(phases))
    if arrays:
        history = model.fit(train[0], train[1], validation_data=valid, batch_size=batch_size, epochs=epochs,
                            shuffle=True, callbacks=callbacks, verbose=verbose)
    else:
        history = model.fit(train, validation_data=valid, epochs=epochs, callbacks=callbacks, verbose=verbose)
    return history.history, best.best_epoch, best.best

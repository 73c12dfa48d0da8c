"""The one way a `fit` keeps its epochs: every epoch's logs, the best one by validation loss and its weights,
and, given a backup folder, all of it on disk so that a killed run resumes (`EpochKeeper`).

Without a backup folder the best epoch's weights are kept in memory (as Keras' `EarlyStopping(
restore_best_weights=True)` keeps them) and put back at the end. With one, it is Keras'
`BackupAndRestore` plus the history and best epoch that callback forgets. `BackupAndRestore` saves
the weights, the optimizer's state and the epoch reached after every epoch, and a new `fit` that
finds them continues from there. What it does not keep is everything other
callbacks hold in memory: the history of the epochs before the kill, and which epoch was best by
validation loss (and its weights; `EarlyStopping(restore_best_weights=True)` forgets both); nor the
state of the model's random seed generators (dropout's), so the resumed epochs would draw other
dropout masks than an uninterrupted run.
`EpochKeeper` wraps it and keeps those in the same folder, in an order that stays consistent
whichever instant the process dies at:

1. a new best epoch's weights go to `best-EPOCH.weights.h5` (a new file);
2. the journal (every epoch's logs and the seed generators' state after it) is rewritten atomically;
3. `BackupAndRestore` saves the epoch;
4. best-weights files of earlier bests are deleted.

On resume the journal is cut back to the epochs the backup holds, so an epoch the backup lost is
trained again and recorded once; the seed generators get the state of the last kept epoch; the
best epoch is recomputed from the journal, and its weights file is still there (step 4 only
deletes a file once a later best is backed up). So with deterministic ops a resumed run ends with
the very weights an uninterrupted one would (tests/test_tune.py). Imports Keras.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import keras

from pipeline.core.artifacts import BACKUP_JOURNAL, BACKUP_METADATA, best_weights_file
from pipeline.core.cache import write_text_atomic


def resumed_epoch(backup_dir: Path) -> int:
    """The epoch a run backed up in `backup_dir` continues at (0: no backup, a fresh start)."""
    path = Path(backup_dir) / BACKUP_METADATA
    return int(json.loads(path.read_text())["epoch"]) if path.is_file() else 0


class EpochKeeper(keras.callbacks.Callback):
    """Every epoch's logs and the best epoch's weights, in memory or (resumable) in a backup folder.

    Args:
        backup_dir: the run's backup folder (created when the first epoch ends), where
            `BackupAndRestore` and the journal live; None: nothing on disk, no resuming.
        select_best: keep the weights of the epoch with the lowest `monitor` and put them back at
            the end; False: keep the last epoch's.
        monitor: the validation log entry that chooses the best epoch (`val_loss`).

    After `fit`: `history` (dict of lists over every epoch, resumed ones included), `best_epoch`
    (0-based, None without `select_best`), `best` (its validation loss), `resumed_at`.
    """

    def __init__(self, backup_dir: Path | None = None, select_best: bool = True, monitor: str = "val_loss"):
        super().__init__()
        self.dir = None if backup_dir is None else Path(backup_dir)
        self.select_best = select_best
        self.monitor = monitor
        self.backup = None if self.dir is None else keras.callbacks.BackupAndRestore(str(self.dir),
                                                                                     delete_checkpoint=False)
        self.best_weights: list | None = None  # in memory, without a backup folder
        self.rows: list[dict] = []
        self.best_epoch: int | None = None
        self.best: float | None = None
        self.resumed_at = 0

    def set_model(self, model):
        super().set_model(model)
        if self.backup is not None:
            self.backup.set_model(model)

    def on_train_begin(self, logs=None):
        if self.backup is None:
            self.rows, self.best_epoch, self.best, self.best_weights = [], None, None, None
            return
        self.backup.on_train_begin(logs)
        self.resumed_at = resumed_epoch(self.dir)
        journal = self.dir / BACKUP_JOURNAL
        rows = json.loads(journal.read_text()) if journal.is_file() else []
        self.rows = [row for row in rows if row["epoch"] < self.resumed_at]
        if len(self.rows) != self.resumed_at:
            raise RuntimeError(f"{journal}: {len(self.rows)} epochs recorded, but the backup is at epoch "
                               f"{self.resumed_at}; delete {self.dir} to start this training again")
        self.best_epoch, self.best = None, None
        for row in self.rows:
            self._consider(row)
        if self.rows:
            for state, value in zip(self._seed_states(), self.rows[-1]["seed_states"], strict=True):
                state.assign(value)

    def _seed_states(self) -> list:
        """The model's random seed generators' state variables (dropout's), in the model's order."""
        return [v for v in self.model.variables if v.name == "seed_generator_state"]

    def _consider(self, row: dict) -> bool:
        """Whether `row` is a new best epoch (and remember it)."""
        loss = row["logs"].get(self.monitor)
        if not self.select_best or loss is None or not math.isfinite(loss) or (self.best is not None
                                                                               and loss >= self.best):
            return False
        self.best_epoch, self.best = row["epoch"], loss
        return True

    def on_epoch_end(self, epoch, logs=None):
        row = {"epoch": epoch, "logs": {key: float(value) for key, value in (logs or {}).items()}}
        if self.backup is None:
            self.rows.append(row)
            if self._consider(row):
                self.best_weights = self.model.get_weights()
            return
        row["seed_states"] = [[int(x) for x in keras.ops.convert_to_numpy(v)] for v in self._seed_states()]
        self.rows.append(row)
        self.dir.mkdir(parents=True, exist_ok=True)
        if self._consider(row):
            self.model.save_weights(self.dir / best_weights_file(epoch))
        write_text_atomic(self.dir / BACKUP_JOURNAL, json.dumps(self.rows) + "\n")
        self.backup.on_epoch_end(epoch, logs)
        for old in self.dir.glob(best_weights_file("*")):
            if self.best_epoch is None or old.name != best_weights_file(self.best_epoch):
                old.unlink()

    def on_train_end(self, logs=None):
        if self.best_weights is not None:
            self.model.set_weights(self.best_weights)
        elif self.best_epoch is not None:
            self.model.load_weights(self.dir / best_weights_file(self.best_epoch))

    @property
    def history(self) -> dict[str, list[float]]:
        keys = sorted({key for row in self.rows for key in row["logs"]})
        return {key: [row["logs"].get(key, math.nan) for row in self.rows] for key in keys}

    def write_history(self, path: Path) -> None:
        """Every epoch's logs as CSV, the columns of Keras' `CSVLogger` (epoch, then the logs by name)."""
        history = self.history
        lines = [",".join(["epoch", *history])]
        lines += [",".join([str(row["epoch"]), *(repr(row["logs"].get(key, math.nan)) for key in history)])
                  for row in self.rows]
        write_text_atomic(path, "\n".join(lines) + "\n")

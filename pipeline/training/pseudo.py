"""Pseudo-labels: unlabeled rows with a teacher's soft probabilities, mixed into every training batch.

The course's "pseudo-labelling + knowledge distillation": a student trains on the labelled rows
plus unlabeled rows whose targets are the teacher's probabilities (soft labels, so the student also
learns how unsure the teacher was). `mixed_batches` is the course's MixIterator: every step takes a
full batch of labelled rows, exactly as training without pseudo-labels would, and adds pseudo rows
so that they are `weight` of the step's rows (the course used 1/4 to 1/3); an epoch is one pass
over the labelled rows in as many steps as without them, so an epoch count chosen for the teacher's
recipe means the same for the student (State Farm's heads are best after one or two epochs: a
pass of 33% more steps at the same rate overfits). The pseudo rows cycle through their own
shuffled order. Both kinds of rows arrive as probability vectors (labelled rows one-hot), trained
with categorical cross-entropy.

The course used its validation set as the unlabeled data and then scored on it: the student had
been trained towards the teacher's answers on exactly the reported rows. `check_unlabeled` refuses
any unlabeled row that is a labelled or a reported row. Imports Keras (only `mixed_batches`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.core.errors import PipelineError


@dataclass
class PseudoLabels:
    """Unlabeled rows and the teacher's probabilities for them, row for row."""

    x: np.ndarray  # (n, ...) features of the unlabeled rows (their augmented passes appended)
    probs: np.ndarray  # (n, classes) the teacher's probabilities


@dataclass
class Teaching:
    """What a student is taught: the teacher's probabilities on the test rows, which of them to use.

    probs: (n_test, classes), row for row with the student's `SplitFeatures.test_ids`.
    keep: the test rows taught (`confident_rows`).
    weight: the share of pseudo rows in each batch.
    """

    probs: np.ndarray
    keep: np.ndarray
    weight: float

    def digest(self) -> str:
        """A short sha256 of what is taught (which rows, which probabilities): a student's provenance."""
        import hashlib

        taught = np.ascontiguousarray(self.probs[self.keep], dtype=np.float32)
        return hashlib.sha256(np.packbits(self.keep).tobytes() + taught.tobytes()).hexdigest()[:16]

    def rows(self, data) -> PseudoLabels:
        """The kept test rows of `data` (a `SplitFeatures`) with their soft labels; when the student
        trains on augmented passes and has the test rows' passes (`augmented` with `tta`), those
        passes too, each with its clean row's label."""
        views = [data.x_test, *(data.test_passes if data.train_passes else [])]
        x = np.concatenate([np.asarray(view[self.keep], dtype=np.float32) for view in views])
        return PseudoLabels(x, np.tile(self.probs[self.keep], (len(views), 1)))


def confident_rows(probs: np.ndarray, threshold: float | None) -> np.ndarray:
    """A boolean mask of the rows whose largest probability reaches `threshold` (all rows for None)."""
    if threshold is None:
        return np.ones(len(probs), bool)
    return probs.max(axis=1) >= threshold


def check_unlabeled(unlabeled_ids, labelled_ids, reported_ids, where: str) -> None:
    """Raise PipelineError when an unlabeled row is also a labelled training row or a reported
    (validation or out-of-fold) row: learning a teacher's answer for a reported row leaks it.

    Args:
        unlabeled_ids: the rows the teacher labels.
        labelled_ids: the student's training rows.
        reported_ids: the rows whose score the student reports.
        where: names the predictions the unlabeled rows came from, for the message.
    """
    unlabeled = set(unlabeled_ids)
    for name, ids in (("validation (reported)", reported_ids), ("labelled training", labelled_ids)):
        shared = sorted(unlabeled.intersection(ids))
        if shared:
            raise PipelineError(f"{where}: {len(shared)} of the unlabeled rows are {name} rows (first: {shared[0]!r}); "
                                "a student may only be taught the teacher's answers on rows it is never scored "
                                "or trained on (the test rows)")


def pseudo_share(batch_size: int, weight: float) -> int:
    """Pseudo rows added to `batch_size` labelled rows so that they are `weight` of the step (at least 1)."""
    return max(1, round(batch_size * weight / (1 - weight)))


def mixed_batches(x: np.ndarray, y: np.ndarray, pseudo: PseudoLabels, batch_size: int, weight: float, seed: int):
    """A keras.utils.PyDataset of steps of `batch_size` labelled rows plus `pseudo_share` pseudo rows.

    Args:
        x, y: the labelled rows and their class indices.
        pseudo: the unlabeled rows and their soft labels.
        batch_size: labelled rows per step (the recipe's batch size).
        weight: the share of pseudo rows in each step (0 < weight < 1).
        seed: shuffling of both kinds of rows, per epoch.

    Returns:
        Batches of (features, probability targets); one epoch passes once over the labelled rows, in
        ceil(len(x) / batch_size) steps.
    """
    import keras

    from pipeline.training.fit import one_hot

    n_pseudo = pseudo_share(batch_size, weight)
    n_labelled = batch_size
    targets = one_hot(y, pseudo.probs.shape[1])
    soft = pseudo.probs.astype(np.float32)

    class MixedBatches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__(workers=1, use_multiprocessing=False)
            self.epoch = 0
            self._shuffle()

        def _shuffle(self):
            rng = np.random.default_rng([seed, self.epoch])
            self.order = rng.permutation(len(x))
            # enough pseudo rows for the epoch, each pass over them in a fresh order
            needed = len(self) * n_pseudo
            self.pseudo_order = np.concatenate([rng.permutation(len(soft))
                                                for _ in range(-(-needed // len(soft)))])

        def __len__(self):
            return int(np.ceil(len(x) / n_labelled))

        def __getitem__(self, batch):
            rows = self.order[batch * n_labelled:(batch + 1) * n_labelled]
            extra = self.pseudo_order[batch * n_pseudo:(batch + 1) * n_pseudo]
            return (np.concatenate([x[rows], pseudo.x[extra]]).astype(np.float32, copy=False),
                    np.concatenate([targets[rows], soft[extra]]))

        def on_epoch_end(self):
            self.epoch += 1
            self._shuffle()

    return MixedBatches()

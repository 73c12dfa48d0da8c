"""What a competition is: the `competition` config section, also what scoring reads of a competition.

One word for one concept: the config's `competition` section, the submit stage and the local
Kaggle server's scoring all speak of a `Competition`. A scoring server that knows only the sample
submission and the solution builds a partial one (`Competition.for_scoring`), with just the fields
scoring reads.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline.core.settings import StrictModel

TASKS = ("binary", "multiclass")
METRICS = ("log_loss", "accuracy")


class Competition(StrictModel):
    """The `competition` section: what the competition is (each competition file sets it)."""

    slug: str = Field(None, pattern=r"^[a-z0-9][a-z0-9-]*$", description=(
        "Kaggle competition slug (required in each competition file)"))
    task: Literal[TASKS] = Field("multiclass", description="binary | multiclass")
    classes: list[str] = Field(None, min_length=2, description=(
        "class names, in the order of the model's outputs (required)"))
    id_column: str = Field(None, min_length=1, description="the id column of sample_submission.csv (required)")
    submission_columns: list[str] = Field(None, min_length=2, description=(
        "sample_submission.csv's columns, id column first (required)"))
    metric: Literal[METRICS] = Field("log_loss", description="log_loss | accuracy: what the leaderboard scores")
    clip: tuple[float, float] = Field([0.0, 1.0], description=(
        "[lo, hi] bounds for submitted probabilities (log loss punishes certainty)"))
    image_size: tuple[int, int] = Field([224, 224], description="[height, width] the images are used at")
    channels: Literal[1, 3] = Field(3, description="1 (grayscale) or 3 (RGB)")
    # How a submission reaches Kaggle changes no prediction: left out of every dump, so of every fingerprint.
    submission: Literal["csv", "code"] = Field("csv", exclude=True, description=(
        "csv: kp submit --upload sends the file | code: a code competition, the kernel kp kernel push ran is "
        "submitted (in no fingerprint)"))

    @model_validator(mode="after")
    def _consistent(self):
        if self.task == "binary" and len(self.classes) != 2:
            raise ValueError(f"a binary task has exactly 2 classes, got {self.classes}")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes must be distinct, got {self.classes}")
        if self.submission_columns[0] != self.id_column:
            raise ValueError(
                f"submission_columns must start with the id column {self.id_column!r}, "
                f"got {self.submission_columns}"
            )
        lo, hi = self.clip
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"clip must satisfy 0 <= lo < hi <= 1, got {list(self.clip)}")
        if min(self.image_size) < 1:
            raise ValueError(f"image_size must be positive, got {list(self.image_size)}")
        return self

    @classmethod
    def for_scoring(cls, id_column: str, submission_columns: list[str], metric: str, task: str,
                    classes: list[str]) -> "Competition":
        """The fields scoring reads, unvalidated (no slug, clip or image size: a server has none)."""
        return cls.model_construct(id_column=id_column, submission_columns=submission_columns, metric=metric,
                                   task=task, classes=classes)


def network_size(value: list[int] | None) -> list[int] | None:
    """A validator of an optional [height, width] a network is fed at (`precompute.image_size`,
    `tune.image_size`, a feature set's): two sides of at least 32 pixels, or None."""
    if value is not None and (len(value) != 2 or min(value) < 32):
        raise ValueError(f"expected [height, width] of at least 32 pixels each, or null, got {value!r}")
    return value

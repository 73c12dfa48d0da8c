"""The one typed face of the config that library code and stages are written against (`ConfigReader`).

Two classes answer to it: the engine's whole `pipeline.engine.config.ResolvedConfig`, and a stage's
`pipeline.core.stage.ConfigView`, which lets it read only the keys it declares. A function annotated
`config: ConfigReader` works with either and reads the same values from both.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol


class ConfigReader(Protocol):
    """What code below the engine reads of a competition's config."""

    comp: str  # the competition's name
    root: Path  # the project root, which relative paths are resolved against

    def get(self, dotted: str) -> Any:
        """The plain value at a dotted key (`split.fraction`), or a whole section as plain values."""

    def section(self, name: str) -> Any:
        """A section's validated settings (its pydantic model)."""

    def path(self, value: str) -> Path:
        """A configured path, resolved against the project root when relative."""

    @property
    def competition(self) -> Any:
        """The `competition` section (`pipeline.core.competition.Competition`)."""

    @property
    def compute(self) -> Any:
        """The `compute` section (`pipeline.core.executor.Compute`), in no fingerprint."""

    @property
    def kaggle(self) -> Any:
        """The `kaggle` section: timeouts and retries of calls to Kaggle's API, in no fingerprint."""

    @property
    def work_dir(self) -> Path:
        """`work/COMP/` (a variant's `work/COMP/_variants/NAME/`)."""

    @property
    def submissions_dir(self) -> Path:
        """`submissions/COMP/`."""

    def predicts(self, stage: str) -> Any:
        """Stage `stage`'s role as a predicting stage (`pipeline.core.stage.Predicts`), or None."""

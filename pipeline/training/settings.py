"""Settings models that several training sections share: the `training` section, a learning-rate phase, on-the-fly augmentation."""
from __future__ import annotations

from pydantic import Field

from pipeline.core.settings import StrictModel


class Phase(StrictModel):
    """Epochs at one learning rate (`phases` schedule), or the one phase of a `cosine` schedule."""

    epochs: int = Field(ge=1)
    lr: float = Field(gt=0)


class Augment(StrictModel):
    """Random affine changes to training images (the course's MNIST: rotate 8, shift 0.08, shear 0.3 rad, zoom 0.08)."""

    rotate: float = Field(0.0, ge=0, le=180)  # degrees, +-
    shift: float = Field(0.0, ge=0, lt=1)  # fraction of width/height, +-
    shear: float = Field(0.0, ge=0, lt=90)  # degrees, +-
    zoom: float = Field(0.0, ge=0, lt=1)  # fraction, +-
    flip: bool = False  # random horizontal flip (never for digits or State Farm)


class Training(StrictModel):
    """The `training` section: what every recipe reads alike."""

    deterministic: bool = Field(True, description=(
        "TensorFlow op determinism: the same config gives the same bytes (costs some speed)"))

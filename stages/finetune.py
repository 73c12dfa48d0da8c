"""finetune: train the model on the cached features (or pixels) of the split's training rows.

Recipe: load the cached arrays and keep the split's train and valid rows (ids checked for
alignment) -> train the network `model.arch` names (a dense head on conv features: `fc`, the
course's VGG16 head, or `pool`; or a from-scratch ladder model on pixels: linear, hidden, cnn,
cnn_bn, cnn_bn_do, optionally with augmentation) with the configured optimizer and learning-rate
phases, keeping the epoch with the best validation loss -> save `model.keras`, `history.csv`,
`loss.png`, `confusion.png`, and the probabilities on the validation and test rows.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipeline.features import load_split_features
from pipeline.stage import Stage, StageContext, StrictModel


class Phase(StrictModel):
    epochs: int = Field(ge=1)
    lr: float = Field(gt=0)


class Augment(StrictModel):
    """Random affine changes to training images (the course's MNIST: rotate 8, shift 0.08, shear 0.3 rad, zoom 0.08)."""

    rotate: float = Field(0.0, ge=0, le=180)  # degrees, +-
    shift: float = Field(0.0, ge=0, lt=1)  # fraction of width/height, +-
    shear: float = Field(0.0, ge=0, lt=90)  # degrees, +-
    zoom: float = Field(0.0, ge=0, lt=1)  # fraction, +-
    flip: bool = False  # random horizontal flip (never for digits or State Farm)


class Settings(StrictModel):
    optimizer: Literal["adam", "sgd", "rmsprop"]
    momentum: float = Field(ge=0, lt=1)
    schedule: Literal["phases", "cosine"]
    phases: list[Phase] = Field(min_length=1)
    batch_size: int = Field(ge=1)
    seed: int
    augment: Augment | None


def run(ctx: StageContext) -> dict:
    from pipeline.model_training import train_model

    data = load_split_features(ctx.input("precompute"), ctx.input("split"), ctx.config.competition.classes)
    return train_model(ctx.config, data, ctx.settings.seed, ctx.out, ctx.log, ctx.warn, title=ctx.comp)


def headline(m: dict) -> str:
    return (f"{m['arch']}: val log loss {m['val_log_loss']:.4f}, accuracy {m['val_accuracy']:.4f} "
            f"(best epoch {m['best_epoch']}/{m['epochs']}, {m['seconds_per_epoch']:.1f}s/epoch)")


STAGE = Stage(
    name="finetune",
    settings=Settings,
    run=run,
    needs=("precompute", "split"),
    reads=("model", "competition.classes", "precompute.backbone", "precompute.weights"),
    version=2,
    headline=headline,
)

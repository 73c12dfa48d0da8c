"""tune: unfreeze the backbone's top blocks under the trained head and fine-tune the whole network on images.

Everything before this stage trains heads on frozen features; this is fastai's `fine_tune`, its
second step: the head is already trained (`tune.source`: finetune's, or bnretrain's), so the
backbone can be unfrozen without the random head's large gradients wrecking its ImageNet weights.

Recipe: build precompute's backbone (same weights) at `tune.image_size` (default
precompute's size; State Farm's 80x60 frames gain nothing from 224x224) and put the source's
trained head on it -> unfreeze the top `tune.unfreeze` blocks (or `all`), every BatchNormalization
layer of the backbone kept in inference mode (its moving statistics never change) -> stream the
split's training images through tf.data (parallel decode, augment's `transforms` drawn afresh for
every epoch and image, prefetch; never all in memory) -> train with a linear warmup then cosine
decay of `tune.lr`, the backbone's variables at `tune.lr * tune.backbone_lr_mult` (discriminative
rates), every epoch backed up (`keras.callbacks.BackupAndRestore`: a killed run, rerun, continues
after its last finished epoch), the best epoch by validation loss kept -> predict the validation
and test images (with `tune.tta`, averaged with augment's test passes of them, drawn as augment
draws them) -> write what finetune writes, the gain over the source stage, and the time per epoch.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from pipeline.core.competition import network_size
from pipeline.core.settings import StrictModel
from pipeline.core.stage import Predicts, Stage, StageContext
from pipeline.evaluation.mistakes import MISTAKES_READS
from pipeline.evaluation.model_outputs import MODEL_OUTPUTS
from pipeline.training.fit import OPTIMIZERS
from pipeline.training.recipes import HEAD_RECIPES, recipe


class Settings(StrictModel):
    """The `tune` section: the trained head back on its backbone, the top blocks unfrozen, trained end to end on images."""

    source: Literal[HEAD_RECIPES] = Field("finetune", description="whose trained head starts it: finetune | bnretrain")
    unfreeze: int | Literal["all"] = Field(2, description=(
        "top blocks of the backbone to train (all: every block); batchnorm stays in inference mode"))
    image_size: list[int] | None = Field(None, description=(
        "[height, width] the images are fed at (null: precompute's size)"))
    optimizer: Literal[OPTIMIZERS] = Field("adam", description="adam | sgd | rmsprop")
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd only")
    lr: float = Field(0.0003, gt=0, description="the head's peak rate (after warmup, then cosine decay to 0)")
    backbone_lr_mult: float = Field(0.1, ge=0, le=1, description=(
        "the backbone's rate = lr * this (discriminative rates; 0 freezes it in effect)"))
    epochs: int = Field(4, ge=1, description=(
        "every epoch is backed up: a killed run, rerun, continues after its last finished epoch"))
    warmup_epochs: int = Field(1, ge=0, description="linear warmup from 0 to lr over these epochs")
    batch_size: int = Field(32, ge=1, description="images per step")
    augment: bool = Field(True, description="draw augment.transforms afresh for every epoch and image (on the fly)")
    tta: bool = Field(False, description=(
        "average predictions over the clean images and augment.test_passes augmented versions"))
    mixup: float | None = Field(None, gt=0, description=(
        "Keras' MixUp on every training batch, weight ~ Beta(a, a) (0.2 usual; null: off)"))
    cutmix: float | None = Field(None, gt=0, le=1, description=(
        "Keras' CutMix on every training batch: a patch of another image pasted, labels mixed by area; its "
        "factor (1: any patch size; null: off)"))
    gradient_accumulation_steps: int | None = Field(None, ge=2, description=(
        "update the weights every N batches with their mean gradient (an N x larger batch in the same memory; "
        "null: every batch)"))
    seed: int = Field(0, description="shuffling, augmentation draws, dropout")

    @field_validator("unfreeze", mode="before")
    @classmethod
    def _blocks(cls, value):
        if isinstance(value, bool) or not (value == "all" or (isinstance(value, int) and value >= 0)):
            raise ValueError(f"expected a number of top blocks (0 or more) or all, got {value!r}")
        return value

    _height_width = field_validator("image_size")(network_size)

    @model_validator(mode="after")
    def _warmup_inside(self):
        if self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) must be fewer than epochs ({self.epochs})")
        return self


def run(ctx: StageContext) -> dict:
    from pipeline.core.cache import Manifest
    from pipeline.training.stage_model import train_stage_model

    s = ctx.settings
    metrics = train_stage_model(ctx, recipe("tune"), s.source, s.seed)
    source = Manifest.read(ctx.input(s.source)).metrics
    return {
        **metrics,
        "arch": f"{source.get('arch', 'head')} + backbone",
        "source_val_log_loss": source["val_log_loss"],
        "source_val_accuracy": source["val_accuracy"],
        "log_loss_gain": round(source["val_log_loss"] - metrics["val_log_loss"], 5),
        "accuracy_gain": round(metrics["val_accuracy"] - source["val_accuracy"], 5),
    }


def headline(m: dict) -> str:
    tta = f", TTA x{m['tta_passes']}" if m.get("tta_passes") else ""
    return (f"{len(m['unfrozen_blocks'])}/{m['total_blocks']} blocks of the backbone at "
            f"{m['image_size'][0]}x{m['image_size'][1]}: val log loss {m['val_log_loss']:.4f} "
            f"({m['source']} {m['source_val_log_loss']:.4f}), accuracy {m['val_accuracy']:.4f} "
            f"(best epoch {m['best_epoch']}/{m['epochs']}, {m['seconds_per_epoch']:.0f}s/epoch{tta})")


STAGE = Stage(
    name="tune",
    settings=Settings,
    run=run,
    needs=("download", "split"),
    reads=MISTAKES_READS,
    outs=MODEL_OUTPUTS,
    headline=headline,
    extra_needs=lambda config: (config.section("tune").source, *recipe("tune").needs_for(config)),
    recipes=lambda config: (recipe("tune"),),
    predicts=Predicts(recipe=lambda config: "tune"),
)

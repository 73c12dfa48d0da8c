"""finetune: train the model on the cached features (or pixels) of the split's training rows.

Recipe: load the cached arrays and keep the split's train and valid rows (ids checked for
alignment), plus augment's passes of the training rows with `augmented` -> train the network `model.arch` names (a dense head on conv features: `fc`, the
course's VGG16 head, or `pool`; or a from-scratch ladder model on pixels: linear, hidden, cnn,
cnn_bn, cnn_bn_do, optionally with augmentation) with the configured optimizer and learning-rate
schedule, keeping the epoch with the best validation loss -> save `model.keras`, `history.csv`,
`loss.png`, `confusion.png`, and the probabilities on the validation and test rows (with `tta`,
averaged over the clean rows and augment's test passes, and the validation rows' passes alike) ->
`top_losses.png` (the validation images it is most confidently wrong about) and the most confused
class pairs in the manifest, as every predicting stage.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline.core.artifacts import CONFUSION_PLOT, HISTORY_FILE, LOSS_PLOT, MODEL_FILE, PREDICTION_FILES, TOP_LOSSES_PLOT
from pipeline.core.stage import Stage, StageContext, StrictModel
from pipeline.evaluation.mistakes import MISTAKES_READS
from pipeline.training.fit import OPTIMIZERS, SCHEDULES

# What the shared training recipe (pipeline.training.recipe) and `write_mistakes` read besides this stage's section.
TRAINING_READS = ("model", "precompute.backbone", "precompute.weights", *MISTAKES_READS)
TRAINING_OUTS = (MODEL_FILE, HISTORY_FILE, LOSS_PLOT, CONFUSION_PLOT, TOP_LOSSES_PLOT, *PREDICTION_FILES)
PREDICTING_NEEDS = ("download", "precompute", "split")  # download: the images `top_losses.png` draws


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
    optimizer: Literal[OPTIMIZERS]
    momentum: float = Field(ge=0, lt=1)
    schedule: Literal[SCHEDULES]
    phases: list[Phase] = Field(min_length=1)
    warmup_epochs: int = Field(ge=0)
    batch_size: int = Field(ge=1)
    seed: int
    deterministic: bool
    augment: Augment | None
    augmented: bool
    tta: bool

    @model_validator(mode="after")
    def _cosine_has_one_phase(self):
        if self.schedule == "cosine" and len(self.phases) != 1:
            raise ValueError(f"schedule cosine takes exactly one phase (its epochs and peak lr), got {len(self.phases)}")
        if self.warmup_epochs and (self.schedule != "cosine" or self.warmup_epochs >= self.phases[0].epochs):
            raise ValueError("warmup_epochs needs schedule cosine and must be fewer than the phase's epochs")
        return self


RECIPES = ("finetune", "bnretrain")  # what a model can follow: finetune's recipe, or finetune's then bnretrain's


def uses_passes(settings) -> bool:
    """Whether a training section (finetune's, bnretrain's) reads augment's passes."""
    return settings.augmented or settings.tta


def recipe_sections(config, source: str) -> dict:
    """The training sections a model trained by `source`'s recipe follows, by name."""
    return {name: config.section(name) for name in RECIPES[:RECIPES.index(source) + 1]}


def run(ctx: StageContext) -> dict:
    from pipeline.evaluation.mistakes import write_mistakes
    from pipeline.evaluation.predictions import load_predictions
    from pipeline.training.recipe import load_training_data, train_model

    s = ctx.settings
    data = load_training_data(ctx.config, ctx.inputs, s.augmented, s.tta)
    metrics = train_model(ctx.config, data, s.seed, ctx.out, ctx.log, ctx.warn, title=ctx.comp)
    return {**metrics, **write_mistakes(ctx.config, ctx.input("download"), load_predictions(ctx.out), ctx.out,
                                        f"{ctx.comp} finetune")}


def with_passes(m: dict) -> str:
    """What a training headline adds for augmented passes and TTA."""
    text = f", clean + {m['train_passes']} passes" if m.get("train_passes") else ""
    if m.get("tta_passes"):
        text += f", TTA x{m['tta_passes']} (without: {m['val_log_loss_no_tta']:.4f})"
    return text


def headline(m: dict) -> str:
    return (f"{m['arch']}: val log loss {m['val_log_loss']:.4f}, accuracy {m['val_accuracy']:.4f} "
            f"(best epoch {m['best_epoch']}/{m['epochs']}, {m['seconds_per_epoch']:.1f}s/epoch{with_passes(m)})")


STAGE = Stage(
    name="finetune",
    settings=Settings,
    run=run,
    needs=PREDICTING_NEEDS,
    reads=TRAINING_READS,
    outs=TRAINING_OUTS,
    headline=headline,
    extra_needs=lambda config: ("augment",) if uses_passes(config.section("finetune")) else (),
)

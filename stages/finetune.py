"""finetune: train the model on the cached features (or pixels) of the split's training rows.

Recipe: load the cached arrays and keep the split's train and valid rows (ids checked for
alignment), plus augment's passes of the training rows with `augmented` -> train the network `model.arch` names (a dense head on conv features: `fc`, the
course's VGG16 head, or `pool`; or a from-scratch ladder model on pixels: linear, hidden, cnn,
cnn_bn, cnn_bn_do, cnn_strided, optionally with augmentation) with the configured optimizer and learning-rate
schedule, keeping the epoch with the best validation loss -> save `model.keras`, `history.csv`,
`loss.png`, `confusion.png`, and the probabilities on the validation and test rows (with `tta`,
averaged over the clean rows and augment's test passes, and the validation rows' passes alike) ->
`top_losses.png` (the validation images it is most confidently wrong about) and the most confused
class pairs in the manifest, as every predicting stage.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline.core.settings import StrictModel
from pipeline.core.stage import Predicts, Stage, StageContext
from pipeline.evaluation.mistakes import MISTAKES_READS
from pipeline.evaluation.model_outputs import MODEL_OUTPUTS, passes_text
from pipeline.training.fit import OPTIMIZERS, SCHEDULES
from pipeline.training.recipes import needs_of, recipe, steps_of
from pipeline.training.settings import Augment, Phase


class Settings(StrictModel):
    """The `finetune` section: trains the model on the cached features (or pixels)."""

    optimizer: Literal[OPTIMIZERS] = Field("adam", description="adam | sgd | rmsprop")
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd only")
    schedule: Literal[SCHEDULES] = Field("phases", description=(
        "phases: each phase's lr for its epochs | cosine: one phase, from its lr (after warmup) down to 0"))
    phases: list[Phase] = Field([{"epochs": 3, "lr": 0.001}, {"epochs": 3, "lr": 0.0001}], min_length=1, description=(
        "[{epochs, lr}, ...], run in order"))
    warmup_epochs: int = Field(0, ge=0, description="cosine only: epochs of linear warmup from 0 to the phase's lr")
    batch_size: int = Field(64, ge=1, description="rows per gradient step")
    seed: int = Field(0, description="weight init and shuffling")
    augment: Augment | None = Field(None, description=(
        "from-scratch models only: {rotate: deg, shift: fraction, shear: deg, zoom: fraction, flip: bool}, on "
        "train rows only"))
    augmented: bool = Field(False, description=(
        "also train on augment's passes of the training rows (clean + K passes per epoch)"))
    label_smoothing: float = Field(0.0, ge=0, lt=1, description=(
        "train against (1 - s) one-hot + s / classes (0: off); the best epoch is chosen on plain log loss"))
    tta: bool = Field(False, description=(
        "average predictions over the clean rows and augment's test passes (validation rows alike)"))
    mixup: float | None = Field(None, gt=0, description=(
        "mix each training row with another of its batch, targets alike, weight ~ Beta(a, a) (0.2-0.4 usual; null: "
        "off)"))
    ema: float | None = Field(None, gt=0, lt=1, description=(
        "keep an exponential moving average of the weights with this momentum (0.99: about the last 100 steps), "
        "written into the model at the end of every epoch, so validation and the best epoch see it (null: off)"))

    @model_validator(mode="after")
    def _cosine_has_one_phase(self):
        if self.schedule == "cosine" and len(self.phases) != 1:
            raise ValueError(f"schedule cosine takes exactly one phase (its epochs and peak lr), got {len(self.phases)}")
        if self.warmup_epochs and (self.schedule != "cosine" or self.warmup_epochs >= self.phases[0].epochs):
            raise ValueError("warmup_epochs needs schedule cosine and must be fewer than the phase's epochs")
        return self


def run(ctx: StageContext) -> dict:
    from pipeline.training.stage_model import train_stage_model

    step = recipe("finetune").resolved(ctx.config)  # the head recipe, or the scratch recipe for a model on pixels
    return train_stage_model(ctx, step, None, ctx.settings.seed)


def headline(m: dict) -> str:
    return (f"{m['arch']}: val log loss {m['val_log_loss']:.4f}, accuracy {m['val_accuracy']:.4f} "
            f"(best epoch {m['best_epoch']}/{m['epochs']}, {m['seconds_per_epoch']:.1f}s/epoch{passes_text(m)})")


STAGE = Stage(
    name="finetune",
    settings=Settings,
    run=run,
    needs=("download", "precompute", "split"),  # download: the images `top_losses.png` draws
    reads=MISTAKES_READS,
    outs=MODEL_OUTPUTS,
    headline=headline,
    extra_needs=lambda config: needs_of(steps_of("finetune", config), config),
    recipes=lambda config: steps_of("finetune", config),
    predicts=Predicts(recipe=lambda config: "finetune"),
)

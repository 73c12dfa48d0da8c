"""bnretrain: put batchnorm into the trained head without changing a prediction, then retrain it harder.

Recipe (the course's Vgg16BN step, done right): load finetune's trained head and the split's rows of
the cached features (plus augment's passes of the training rows with `augmented`) -> insert
BatchNormalization after each hidden Dense layer, initialised from the training rows' activations
(moving mean / variance = their mean / variance, gamma = sqrt(variance + epsilon), beta = mean), so
every prediction is unchanged (checked on the validation rows) -> set every dropout rate to
`bnretrain.dropout` (Keras' dropout is inverted: no weight is rescaled) -> retrain the whole head
with its own optimizer and learning-rate phases, keeping the best epoch by validation loss -> write
what finetune writes (with `tta`, probabilities averaged over augment's test passes), and the gain
over finetune.

While it retrains, the inserted layers run in training mode: each batch is normalised by its own
statistics and the moving averages (momentum 0.99, starting from the exact training statistics)
follow slowly; validation and test use the moving averages. From-scratch ladder models already
have batchnorm: asking for this stage with them is an error. The recipe is
`pipeline.training.recipes.batchnorm`; the model is a unit of the run cache (a rerun for a plot's
sake retrains nothing).
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipeline.core.settings import StrictModel
from pipeline.core.stage import Predicts, Stage, StageContext
from pipeline.evaluation.mistakes import MISTAKES_READS
from pipeline.evaluation.model_outputs import MODEL_OUTPUTS, passes_text
from pipeline.training.fit import OPTIMIZERS
from pipeline.training.recipes import recipe
from pipeline.training.settings import Phase


class Settings(StrictModel):
    """The `bnretrain` section: batchnorm inserted into finetune's head (predictions unchanged), then retrained."""

    dropout: float = Field(0.5, ge=0, lt=1, description=(
        "the new rate of every dropout layer (inverted dropout: no weight rescaling)"))
    optimizer: Literal[OPTIMIZERS] = Field("adam", description="adam | sgd | rmsprop")
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd only")
    phases: list[Phase] = Field([{"epochs": 10, "lr": 0.0001}], min_length=1, description=(
        "its own learning-rate phases (1e-3 overfit State Farm's head in one epoch)"))
    batch_size: int = Field(64, ge=1, description="rows per gradient step")
    seed: int = Field(0, description="shuffling and dropout draws")
    augmented: bool = Field(False, description="retrain on the clean training rows plus augment's passes of them")
    tta: bool = Field(False, description="average predictions over the clean rows and augment's test passes")


def run(ctx: StageContext) -> dict:
    from pipeline.core.cache import Manifest
    from pipeline.training.stage_model import train_stage_model

    metrics = train_stage_model(ctx, recipe("bnretrain"), "finetune", ctx.settings.seed)
    finetune = Manifest.read(ctx.input("finetune")).metrics
    return {
        **metrics,
        "finetune_val_log_loss": finetune["val_log_loss"],
        "finetune_val_accuracy": finetune["val_accuracy"],
        "log_loss_gain": round(finetune["val_log_loss"] - metrics["val_log_loss"], 5),
        "accuracy_gain": round(metrics["val_accuracy"] - finetune["val_accuracy"], 5),
    }


def headline(m: dict) -> str:
    return (f"{m['arch']} + batchnorm: val log loss {m['val_log_loss']:.4f} (finetune {m['finetune_val_log_loss']:.4f}), "
            f"accuracy {m['val_accuracy']:.4f} (best epoch {m['best_epoch']}/{m['epochs']}{passes_text(m)})")


STAGE = Stage(
    name="bnretrain",
    settings=Settings,
    run=run,
    needs=("finetune", "download", "precompute", "split"),
    reads=MISTAKES_READS,
    outs=MODEL_OUTPUTS,
    headline=headline,
    extra_needs=lambda config: recipe("bnretrain").needs_for(config),
    recipes=lambda config: (recipe("bnretrain"),),
    predicts=Predicts(recipe=lambda config: "bnretrain"),
)

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
have batchnorm: asking for this stage with them is an error.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipeline.core.artifacts import MODEL_FILE
from pipeline.core.errors import PipelineError
from pipeline.core.stage import Stage, StageContext, StrictModel
from pipeline.training.fit import OPTIMIZERS
from pipeline.evaluation.mistakes import MISTAKES_READS
from stages.finetune import PREDICTING_NEEDS, TRAINING_OUTS, Phase, uses_passes, with_passes


class Settings(StrictModel):
    dropout: float = Field(ge=0, lt=1)
    optimizer: Literal[OPTIMIZERS]
    phases: list[Phase] = Field(min_length=1)
    batch_size: int = Field(ge=1)
    seed: int
    augmented: bool
    tta: bool


def check_dense_head(config) -> str:
    """The model's arch, or one clear error when it is a from-scratch model (it has batchnorm already)."""
    from pipeline.models.build import resolve_arch
    from pipeline.models.scratch import LADDER

    arch = resolve_arch(config.get("model.arch"), config.get("precompute.backbone"))
    if arch in LADDER:
        raise PipelineError(f"bnretrain inserts batchnorm into a dense head on cached features, but model.arch "
                            f"{arch!r} is a from-scratch model that has it already: remove bnretrain from stages")
    return arch


def run(ctx: StageContext) -> dict:
    import keras

    from pipeline.core.cache import Manifest
    from pipeline.evaluation.mistakes import write_mistakes
    from pipeline.evaluation.predictions import load_predictions
    from pipeline.training.recipe import load_training_data, retrain_with_batchnorm

    s = ctx.settings
    arch = check_dense_head(ctx.config)
    data = load_training_data(ctx.config, ctx.inputs, s.augmented, s.tta)
    head = keras.models.load_model(ctx.input("finetune") / MODEL_FILE)
    metrics = retrain_with_batchnorm(ctx.config, head, data, s.seed, ctx.out, ctx.log, title=f"{ctx.comp} {arch}")
    finetune = Manifest.read(ctx.input("finetune")).metrics
    return {
        **metrics,
        "arch": arch,
        "finetune_val_log_loss": finetune["val_log_loss"],
        "finetune_val_accuracy": finetune["val_accuracy"],
        "log_loss_gain": round(finetune["val_log_loss"] - metrics["val_log_loss"], 5),
        "accuracy_gain": round(metrics["val_accuracy"] - finetune["val_accuracy"], 5),
        **write_mistakes(ctx.config, ctx.input("download"), load_predictions(ctx.out), ctx.out, f"{ctx.comp} bnretrain"),
    }


def headline(m: dict) -> str:
    return (f"{m['arch']} + batchnorm: val log loss {m['val_log_loss']:.4f} (finetune {m['finetune_val_log_loss']:.4f}), "
            f"accuracy {m['val_accuracy']:.4f} (best epoch {m['best_epoch']}/{m['epochs']}{with_passes(m)})")


STAGE = Stage(
    name="bnretrain",
    settings=Settings,
    run=run,
    needs=("finetune", *PREDICTING_NEEDS),
    reads=("model.arch", "precompute.backbone", "finetune.deterministic", *MISTAKES_READS),
    outs=TRAINING_OUTS,
    headline=headline,
    extra_needs=lambda config: ("augment",) if uses_passes(config.section("bnretrain")) else (),
)

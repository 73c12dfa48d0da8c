"""bnretrain: put batchnorm into the trained head without changing a prediction, then retrain it harder.

Recipe (the course's Vgg16BN step, done right): load finetune's trained head and the split's rows of
the cached features -> insert BatchNormalization after each hidden Dense layer, initialised from the
training rows' activations (moving mean / variance = their mean / variance, gamma = sqrt(variance +
epsilon), beta = mean), so every prediction is unchanged (checked on the validation rows) -> set
every dropout rate to `bnretrain.dropout` (Keras' dropout is inverted: no weight is rescaled) ->
retrain the whole head with its own optimizer and learning-rate phases, keeping the best epoch by
validation loss -> write what finetune writes, and the gain over finetune.

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
from stages.finetune import TRAINING_OUTS, Phase

IDENTITY_TOLERANCE = 1e-4  # largest change of a validation probability the insertion may cause


class Settings(StrictModel):
    dropout: float = Field(ge=0, lt=1)
    optimizer: Literal[OPTIMIZERS]
    phases: list[Phase] = Field(min_length=1)
    batch_size: int = Field(ge=1)
    seed: int


def run(ctx: StageContext) -> dict:
    import time

    import keras
    import numpy as np

    from pipeline.core.cache import Manifest
    from pipeline.data.features import load_split_features
    from pipeline.models.batchnorm import with_batchnorm
    from pipeline.models.build import resolve_arch
    from pipeline.models.inference import predict_in_chunks
    from pipeline.models.scratch import LADDER
    from pipeline.training.fit import Phase as FitPhase, fit
    from pipeline.training.recipe import finish_training, set_determinism

    s = ctx.settings
    arch = resolve_arch(ctx.config.get("model.arch"), ctx.config.get("precompute.backbone"))
    if arch in LADDER:
        raise PipelineError(f"bnretrain inserts batchnorm into a dense head on cached features, but model.arch "
                            f"{arch!r} is a from-scratch model that has it already: remove bnretrain from stages")
    data = load_split_features(ctx.input("precompute"), ctx.input("split"), ctx.config.competition.classes)
    head = keras.models.load_model(ctx.input("finetune") / MODEL_FILE)
    before = predict_in_chunks(head, data.x_valid)
    model = with_batchnorm(head, data.x_train, dropout=s.dropout)
    change = float(np.abs(predict_in_chunks(model, data.x_valid) - before).max()) if len(before) else 0.0
    if change > IDENTITY_TOLERANCE:
        raise RuntimeError(f"inserting batchnorm changed a validation probability by {change:.2e}")
    ctx.log(f"batchnorm inserted after {sum(isinstance(l, keras.layers.BatchNormalization) for l in model.layers)} "
            f"hidden layers; largest change of a validation probability {change:.1e}; dropout -> {s.dropout}")

    set_determinism(ctx.config.get("finetune.deterministic"))
    keras.utils.set_random_seed(s.seed)
    start = time.perf_counter()
    history, best_epoch, _ = fit(model, (data.x_train, data.y_train), (data.x_valid, data.y_valid),
                                 phases=[FitPhase(p.epochs, p.lr) for p in s.phases], schedule="phases",
                                 optimizer=s.optimizer, momentum=0.9, batch_size=s.batch_size, out_dir=ctx.out)
    seconds = time.perf_counter() - start
    metrics = finish_training(model, data, history, best_epoch, ctx.out, f"{ctx.comp} {arch} + batchnorm")
    finetune = Manifest.read(ctx.input("finetune")).metrics
    return {
        **metrics,
        "arch": arch,
        "insertion_change": change,
        "dropout": s.dropout,
        "seconds_per_epoch": round(seconds / max(1, len(history["loss"])), 3),
        "finetune_val_log_loss": finetune["val_log_loss"],
        "finetune_val_accuracy": finetune["val_accuracy"],
        "log_loss_gain": round(finetune["val_log_loss"] - metrics["val_log_loss"], 5),
        "accuracy_gain": round(metrics["val_accuracy"] - finetune["val_accuracy"], 5),
    }


def headline(m: dict) -> str:
    return (f"{m['arch']} + batchnorm: val log loss {m['val_log_loss']:.4f} (finetune {m['finetune_val_log_loss']:.4f}), "
            f"accuracy {m['val_accuracy']:.4f} (best epoch {m['best_epoch']}/{m['epochs']})")


STAGE = Stage(
    name="bnretrain",
    settings=Settings,
    run=run,
    needs=("finetune", "precompute", "split"),
    reads=("model.arch", "competition.classes", "precompute.backbone", "finetune.deterministic"),
    outs=TRAINING_OUTS,
    headline=headline,
)

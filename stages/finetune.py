"""finetune: train a dense head on the cached conv features.

Recipe: load the cached features and keep the split's train and valid rows (ids checked for
alignment) -> build the head (`fc`: the course's VGG16 head, optionally starting from VGG16's
ImageNet fc1/fc2; `pool`: global pooling + hidden layers) -> train it with the configured
optimizer and learning-rate phases (or cosine), keeping the epoch with the best validation loss
-> save `model.keras`, `history.csv`, `loss.png`, `confusion.png`, and the probabilities on the
validation and test rows for the ensemble and submit stages.
"""
from __future__ import annotations

import time
from typing import Literal

from pydantic import Field, model_validator

from pipeline.features import load_split_features
from pipeline.stage import Stage, StageContext, StrictModel


class Phase(StrictModel):
    epochs: int = Field(ge=1)
    lr: float = Field(gt=0)


class Settings(StrictModel):
    head: Literal["auto", "fc", "pool"]
    hidden: list[int]
    dropout: list[float]
    l2: float = Field(ge=0)
    imagenet_init: bool
    optimizer: Literal["adam", "sgd", "rmsprop"]
    momentum: float = Field(ge=0, lt=1)
    schedule: Literal["phases", "cosine"]
    phases: list[Phase] = Field(min_length=1)
    batch_size: int = Field(ge=1)
    seed: int

    @model_validator(mode="after")
    def _one_rate_per_layer(self):
        if len(self.dropout) != len(self.hidden):
            raise ValueError(f"dropout has {len(self.dropout)} rates for {len(self.hidden)} hidden layers")
        if any(not 0 <= r < 1 for r in self.dropout):
            raise ValueError(f"dropout rates must be in [0, 1), got {self.dropout}")
        return self


def run(ctx: StageContext) -> dict:
    import keras
    import numpy as np

    from pipeline.heads import build_head, init_from_vgg16_top
    from pipeline.metrics import accuracy, multiclass_log_loss
    from pipeline.plots import plot_confusion, plot_history
    from pipeline.predictions import Predictions, predict_in_chunks, save_predictions
    from pipeline.training import Phase as TrainingPhase
    from pipeline.training import fit

    s, competition = ctx.settings, ctx.config.competition
    data = load_split_features(ctx.input("precompute"), ctx.input("split"), competition.classes)
    backbone = ctx.config.get("precompute.backbone")
    kind = ("fc" if backbone == "vgg16" else "pool") if s.head == "auto" else s.head
    keras.utils.set_random_seed(s.seed)
    model = build_head(data.x_train.shape[1:], len(data.classes), kind, s.hidden, s.dropout, s.l2)
    ctx.log(f"{kind} head, {model.count_params():,} parameters, on {len(data.x_train):,} train / "
            f"{len(data.x_valid):,} valid rows of {data.x_train.shape[1:]} features")
    if kind == "fc" and s.imagenet_init:
        if backbone == "vgg16" and ctx.config.get("precompute.weights") == "imagenet":
            ctx.log(f"initialised {init_from_vgg16_top(model)} from VGG16's ImageNet top")
        else:
            ctx.warn("finetune.imagenet_init needs precompute.backbone vgg16 with weights imagenet; "
                     "the head starts from random weights")

    start = time.perf_counter()
    history, best_epoch, _ = fit(
        model, (data.x_train, data.y_train), (data.x_valid, data.y_valid),
        phases=[TrainingPhase(p.epochs, p.lr) for p in s.phases], schedule=s.schedule,
        optimizer=s.optimizer, momentum=s.momentum, batch_size=s.batch_size, out_dir=ctx.out,
    )
    train_seconds = time.perf_counter() - start
    model.save(ctx.out / "model.keras")

    valid_probs = predict_in_chunks(model, data.x_valid)
    test_probs = predict_in_chunks(model, data.x_test)
    save_predictions(ctx.out, Predictions(data.valid_ids, data.y_valid, valid_probs, data.test_ids, test_probs))
    metrics = {
        "val_log_loss": round(multiclass_log_loss(data.y_valid, valid_probs), 5),
        "val_accuracy": round(accuracy(data.y_valid, valid_probs), 5),
        "best_epoch": best_epoch + 1,
        "epochs": len(history["loss"]),
        "train_seconds": round(train_seconds, 2),
        "seconds_per_epoch": round(train_seconds / max(1, len(history["loss"])), 3),
        "head": kind,
        "parameters": int(model.count_params()),
        "n_train": len(data.x_train),
        "n_valid": len(data.x_valid),
    }
    title = f"{ctx.comp} {kind} head: val loss {metrics['val_log_loss']:.4f}, acc {metrics['val_accuracy']:.4f}"
    plot_history(history, ctx.out / "loss.png", title)
    plot_confusion(data.y_valid, np.argmax(valid_probs, axis=1), data.classes, ctx.out / "confusion.png", title)
    return metrics


def _headline(m: dict) -> str:
    return (f"val log loss {m['val_log_loss']:.4f}, accuracy {m['val_accuracy']:.4f} "
            f"(best epoch {m['best_epoch']}/{m['epochs']}, {m['seconds_per_epoch']:.1f}s/epoch)")


STAGE = Stage(
    name="finetune",
    settings=Settings,
    run=run,
    needs=("precompute", "split"),
    reads=("competition.classes", "precompute.backbone", "precompute.weights"),
    version=1,
    headline=_headline,
)

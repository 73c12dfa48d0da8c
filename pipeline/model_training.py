"""One trained model, start to finish: the recipe finetune runs once and ensemble runs per member.

build the network `model.arch` names (a head on cached features, or a from-scratch ladder model on
pixels) -> optionally start the VGG16 head from ImageNet's fc layers -> train it on the split's
training rows (augmented when `finetune.augment` is set and the inputs are pixels) with the
configured optimizer and learning-rate phases, keeping the best epoch by validation loss -> save
`model.keras`, `history.csv`, `loss.png`, `confusion.png` and the valid/test probabilities.
Imports Keras.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError
from pipeline.features import SplitFeatures
from pipeline.scratch_models import LADDER

HEADS = ("auto", "fc", "pool")


def resolve_arch(arch: str, backbone: str) -> str:
    """`auto` -> fc for VGG16 features (the course's head), pool for other backbones; checks that
    heads get features and ladder models get pixels."""
    if arch == "auto":
        arch = "fc" if backbone == "vgg16" else "pool" if backbone != "none" else "cnn_bn_do"
    if arch in HEADS and backbone == "none":
        raise PipelineError(f"model.arch {arch!r} is a head for cached conv features, but precompute.backbone "
                            f"is none (pixels); use one of {', '.join(LADDER)}")
    return arch


def build_model(config, input_shape: tuple[int, ...], n_classes: int, warn=print):
    from pipeline.heads import build_head, init_from_vgg16_top
    from pipeline.scratch_models import build_scratch_model

    m, backbone = config.section("model"), config.get("precompute.backbone")
    arch = resolve_arch(m.arch, backbone)
    if arch in LADDER:
        return build_scratch_model(arch, input_shape, n_classes, m.hidden, m.dropout, m.conv_dropout, m.l2), arch
    model = build_head(input_shape, n_classes, arch, m.hidden, m.dropout, m.l2)
    if arch == "fc" and m.imagenet_init:
        if backbone == "vgg16" and config.get("precompute.weights") == "imagenet":
            init_from_vgg16_top(model)
        else:
            warn("model.imagenet_init needs precompute.backbone vgg16 with weights imagenet; "
                 "the head starts from random weights")
    return model, arch


def train_model(config, data: SplitFeatures, seed: int, out_dir: Path, log=print, warn=print,
                title: str = "", verbose: int = 2) -> dict:
    """Train one model with `seed` into `out_dir`; returns its metrics."""
    import keras

    from pipeline.augmentation import augmented_batches, build_augmenter
    from pipeline.metrics import accuracy, multiclass_log_loss
    from pipeline.plots import plot_confusion, plot_history
    from pipeline.predictions import Predictions, predict_in_chunks, save_predictions
    from pipeline.training import Phase, fit

    s = config.section("finetune")
    keras.utils.set_random_seed(seed)
    model, arch = build_model(config, data.x_train.shape[1:], len(data.classes), warn)
    log(f"{arch}: {model.count_params():,} parameters, {len(data.x_train):,} train / {len(data.x_valid):,} "
        f"valid rows of {data.x_train.shape[1:]}, seed {seed}")
    train = (data.x_train, data.y_train)
    if s.augment:
        if arch not in LADDER:
            raise PipelineError("finetune.augment augments pixels, but this model trains on cached conv features "
                                "(precompute.backbone is not none); set finetune.augment: null")
        augmenter = build_augmenter(s.augment, fill=float(np.min(data.x_train)))
        train = augmented_batches(data.x_train, data.y_train, s.batch_size, augmenter, seed)

    start = time.perf_counter()
    history, best_epoch, _ = fit(
        model, train, (data.x_valid, data.y_valid), phases=[Phase(p.epochs, p.lr) for p in s.phases],
        schedule=s.schedule, optimizer=s.optimizer, momentum=s.momentum, batch_size=s.batch_size,
        out_dir=out_dir, verbose=verbose,
    )
    train_seconds = time.perf_counter() - start
    model.save(out_dir / "model.keras")
    valid_probs = predict_in_chunks(model, data.x_valid)
    test_probs = predict_in_chunks(model, data.x_test)
    save_predictions(out_dir, Predictions(data.valid_ids, data.y_valid, valid_probs, data.test_ids, test_probs))
    metrics = {
        "val_log_loss": round(multiclass_log_loss(data.y_valid, valid_probs), 5),
        "val_accuracy": round(accuracy(data.y_valid, valid_probs), 5),
        "best_epoch": best_epoch + 1,
        "epochs": len(history["loss"]),
        "train_seconds": round(train_seconds, 2),
        "seconds_per_epoch": round(train_seconds / max(1, len(history["loss"])), 3),
        "arch": arch,
        "augmented": bool(s.augment),
        "parameters": int(model.count_params()),
        "seed": seed,
        "n_train": len(data.x_train),
        "n_valid": len(data.x_valid),
    }
    heading = f"{title} {arch}: val loss {metrics['val_log_loss']:.4f}, acc {metrics['val_accuracy']:.4f}"
    plot_history(history, out_dir / "loss.png", heading)
    plot_confusion(data.y_valid, np.argmax(valid_probs, axis=1), data.classes, out_dir / "confusion.png", heading)
    return metrics

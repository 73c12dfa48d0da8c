"""The tune recipe (fastai's `fine_tune`): a trained head back on its backbone, the top blocks unfrozen.

`build_tuned_model` builds the backbone the `precompute` section names (its weights; `weights: none`
from the same seed precompute used) at the tune image size, stacks a trained head on it (the tune
stage's: `tune.source`'s output; an ensemble member's: its own head, trained first by `tune.source`'s
recipe) and unfreezes the top `tune.unfreeze` blocks, batchnorm kept in inference mode
(`pipeline.models.unfreeze`). `TuneRecipe.fit` trains it on the split's training images, decoded and
augmented on the fly (`pipeline.data.image_stream`, augment's `transforms`), with one warmup +
cosine schedule whose rate the backbone's variables take times `tune.backbone_lr_mult`
(discriminative rates, `pipeline.training.fit.make_optimizer`); every epoch is backed up so a
killed run resumes (`pipeline.training.epochs`); the best epoch by validation loss is kept. Then
it predicts the validation and test images, with `tune.tta` also augment's test passes of them
(drawn exactly as augment draws them) and averages. Imports Keras inside the functions.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from pipeline.core.artifacts import MODEL_FILE
from pipeline.core.config_reader import ConfigReader
from pipeline.core.errors import PipelineError
from pipeline.data.image_rows import ImageRows, SplitImages
from pipeline.models.saved import load_saved_model
from pipeline.training.recipes import HEAD_RECIPES, recipe
from pipeline.training.recipes.base import Recipe, TrainingRun

TRAINING_DRAWS = 2  # augment draws subset 0 (train) and 1 (test) passes; tune's training draws are stream 2


def image_size(config: ConfigReader) -> tuple[int, int]:
    """(height, width) the tune stage feeds its backbone: `tune.image_size`, else precompute's size."""
    from pipeline.models.extractor import feature_size

    return tuple(config.get("tune.image_size") or feature_size(config))


def build_tuned_model(config: ConfigReader, head_dir: Path, precision: str = "float32"):
    """The trained head of `head_dir` on the `precompute` backbone, top blocks unfrozen.

    Args:
        precision: the Keras dtype policy the backbone computes in (`DevicePlan.precision`; the
            head keeps the float32 it was saved with, so the probabilities are float32).

    Returns:
        (model, backbone, the backbone's preprocessing or None, `Unfrozen`).
    """
    import keras

    from pipeline.models.backbones import build_feature_model, resolve_weights
    from pipeline.models.device import precision_scope
    from pipeline.models.extractor import RANDOM_WEIGHTS_SEED
    from pipeline.models.unfreeze import stack, unfreeze_top

    p, s = config.section("precompute"), config.section("tune")
    if p.backbone == "none":
        raise PipelineError("tune fine-tunes an ImageNet backbone under a trained head, but precompute.backbone is "
                            "none (a from-scratch model already trains end to end): remove tune from stages")
    height, width = image_size(config)
    weights = resolve_weights(p.weights, config.root)
    if weights is None:
        keras.utils.set_random_seed(RANDOM_WEIGHTS_SEED)  # the random network precompute's features came from
    with precision_scope(precision):  # the stacked model too: Keras scales a mixed_float16 model's loss
        features = build_feature_model(p.backbone, weights, (height, width, 3), p.cut, p.alpha, p.preprocess,
                                       config.root)
        backbone = features.model
        unfrozen = unfreeze_top(backbone, s.unfreeze)
        head = load_saved_model(head_dir / MODEL_FILE)
        model = stack(backbone, head)
    return model, backbone, features.preprocess, unfrozen


def training_augmenter(config: ConfigReader, seed: int):
    """Augment's transforms drawn afresh for every (epoch, image) of tune's training with `seed`, or None."""
    from pipeline.data.augmentation import RowAugmenter

    transforms = config.get("augment.transforms")
    return RowAugmenter(transforms, (seed, TRAINING_DRAWS)) if config.get("tune.augment") and transforms else None


def tune_model(config: ConfigReader, images: SplitImages, head_dir: Path, out_dir: Path, backup_dir: Path, seed: int,
               log=print, verbose: int = 2, stop_after: int | None = None, title: str = "") -> dict:
    """Train the tuned network into `out_dir`, resuming from `backup_dir` when a killed run left one.

    Args:
        config: a config view that declares the tune recipe's keys.
        images: the split's rows as image files.
        head_dir: the folder of the trained head that starts it.
        out_dir: where the model, history and predictions go.
        backup_dir: the run's backup (kept outside `out_dir`, which a killed run loses).
        seed: the run's seed (`tune.seed`, or an ensemble member's).
        log: prints progress.
        verbose: 0: silently; else one progress display of its epochs, titled `title`.
        stop_after: train exactly this many epochs of the schedule and keep the last, never scoring
            the validation rows in training (a cv fold's epochs, chosen on another fold); None: keep
            the best epoch by validation loss.

    Returns:
        Its record: validation scores, best epoch, what was unfrozen, timing, `resumed_at`.
    """
    import keras

    from pipeline.data.image_stream import labelled_batches, training_stream
    from pipeline.models.device import plan_device, replicas_scope
    from pipeline.models.unfreeze import backbone_rate_factors
    from pipeline.training.fit import FitOptions, Phase, fit
    from pipeline.training.mixup import image_mixer
    from pipeline.training.record import record, set_determinism
    from pipeline.training.epochs import resumed_epoch

    s = config.section("tune")
    size = image_size(config)
    set_determinism(config.get("training.deterministic"))
    plan = plan_device(config.compute, s.batch_size)
    keras.utils.set_random_seed(seed)  # the loaded head's dropout seeds come from here
    with replicas_scope(plan) as replicas:  # several GPUs: one replica each, the batch split among them
        model, backbone, preprocess, unfrozen = build_tuned_model(config, head_dir, plan.precision)
        keras.utils.set_random_seed(seed)
        factors = backbone_rate_factors(backbone, s.backbone_lr_mult)
        start = resumed_epoch(backup_dir)
        train, steps = training_stream(images.train, size, s.batch_size, preprocess,
                                       training_augmenter(config, seed), seed, start, s.epochs)
        mix = image_mixer(s.mixup, s.cutmix, len(images.classes), seed)
        if mix is not None:
            train = train.map(mix)
        log(f"{backbone.name} at {size[0]}x{size[1]} + {s.source}'s head: {len(unfrozen.blocks)} of "
            f"{unfrozen.total_blocks} blocks unfrozen ({unfrozen.trainable_backbone_weights:,} backbone parameters "
            f"at lr x {s.backbone_lr_mult}, {unfrozen.frozen_batchnorm} batchnorm layers in inference mode), "
            f"{len(images.train):,} train / {len(images.valid):,} valid images, {steps} steps per epoch; "
            f"{plan.description}, {plan.precision}, {replicas} replica(s)"
            + (f"; resuming at epoch {start + 1}" if start else ""))
        began = time.perf_counter()
        valid = labelled_batches(images.valid, size, s.batch_size, preprocess)
        history, best_epoch, _ = fit(model, train, valid, FitOptions(
            phases=[Phase(s.epochs, s.lr)], schedule="cosine", warmup_epochs=s.warmup_epochs, optimizer=s.optimizer,
            momentum=s.momentum, batch_size=s.batch_size, out_dir=out_dir, verbose=verbose, title=title, rate_factors=factors,
            steps_per_epoch=steps, backup_dir=backup_dir, stop_after=stop_after, soft_targets=mix is not None,
            accumulate=s.gradient_accumulation_steps, curves=config.compute.tensorboard))
        seconds = time.perf_counter() - began
    model.save(out_dir / MODEL_FILE)
    predictions, valid_each = predict_split(config, model, images, preprocess, plan)
    metrics = record(predictions, valid_each, history, best_epoch, out_dir)
    trained_now = max(1, (stop_after or s.epochs) - start)
    return {**metrics, "source": s.source, "image_size": list(size), "unfreeze": s.unfreeze,
            "unfrozen_blocks": unfrozen.blocks, "total_blocks": unfrozen.total_blocks,
            "trainable_backbone_parameters": unfrozen.trainable_backbone_weights,
            "frozen_batchnorm_layers": unfrozen.frozen_batchnorm, "backbone_lr_mult": s.backbone_lr_mult,
            "resumed_at": start, "seconds_per_epoch": round(seconds / trained_now, 2),
            "train_images_per_s": round(len(images.train) * trained_now / max(seconds, 1e-9), 1),
            "n_train": len(images.train), "n_valid": len(images.valid), "seed": seed,
            "device": {**plan.record(), "replicas": replicas}}


def predict_split(config: ConfigReader, model, images: SplitImages, preprocess, plan):
    """The validation and test probabilities, with `tune.tta` averaged over the clean images and
    augment's first `augment.test_passes` passes (validation rows: their training passes, as augment draws them).

    Args:
        plan: the `DevicePlan` the predictions run with.

    Returns:
        (`Predictions`, the validation probabilities of each version, clean first).
    """
    from pipeline.data.augmentation import RowAugmenter, pass_seed
    from pipeline.evaluation.predictions import Predictions
    from pipeline.models.inference import Forward

    s = config.section("tune")
    passes = config.get("augment.test_passes") if s.tta else 0
    transforms, seed = config.get("augment.transforms"), config.get("augment.seed")

    forward = Forward(model, plan, preprocess)

    def versions(rows: ImageRows, subset: str) -> list[np.ndarray]:
        augmenters = [None] + [RowAugmenter(transforms, pass_seed(seed, subset, k)) for k in range(1, passes + 1)]
        return [predict_images(forward, rows, image_size(config), a) for a in augmenters]

    valid_each, test_each = versions(images.valid, "train"), versions(images.test, "test")
    mean = lambda each: np.mean(each, axis=0, dtype=np.float64).astype(np.float32)  # noqa: E731
    return (Predictions(images.valid.ids, images.valid.labels, mean(valid_each), images.test.ids, mean(test_each)),
            valid_each)


def predict_images(forward, rows: ImageRows, size: tuple[int, int], augmenter=None) -> np.ndarray:
    """A model's outputs on image files, in order.

    Args:
        forward: the model's compiled inference (`pipeline.models.inference.Forward`).
        rows: the images.
        size: (height, width) they are decoded at.
        augmenter: `augmenter(image, row)`: each image's version drawn from its row number in its
            subset (`rows.rows`), as augment's passes draw it; None: the clean images.
    """
    from pipeline.data.features import outputs_in_order

    augment = None if augmenter is None else (lambda image, position: augmenter(image, int(rows.rows[position])))
    parts = []
    outputs_in_order(forward, forward.batches(rows.paths, size, augment=augment), parts.append)
    return np.concatenate(parts)


class TuneRecipe(Recipe):
    """tune's recipe: starts from a head trained by `tune.source`'s recipe; trains on images, not cached rows."""

    name = "tune"
    section = "tune"
    reads = ("precompute", "competition.image_size", "competition.classes", "augment.transforms", "augment.seed",
             "augment.test_passes", "training.deterministic")
    needs = ("download", "split")
    teachable = False
    takes = "images"

    def previous(self, config: ConfigReader) -> Recipe:
        return recipe(config.section("tune").source)

    def check(self, config: ConfigReader) -> None:
        if self.settings(config).source not in HEAD_RECIPES:
            raise PipelineError(f"tune.source must be a recipe that trains a head ({', '.join(HEAD_RECIPES)})")

    def load(self, config: ConfigReader, inputs, sides=None):
        from pipeline.data.image_rows import load_split_images

        return load_split_images(inputs["download"], inputs["split"], config.competition.classes, sides)

    def fit(self, config: ConfigReader, data, start, out, run: TrainingRun) -> dict:
        if run.teaching is not None:
            raise PipelineError("the tune recipe trains on labelled images only: it cannot train a pseudo-labelled "
                                "student")
        if run.backup is None:
            raise ValueError("the tune recipe backs up every epoch: it needs a backup folder")
        return tune_model(config, data, start, out, run.backup, run.seed, run.log, run.verbose,
                          run.stop_after(self.name), run.title)

    def arch_after(self, arch: str) -> str:
        return f"{arch} + backbone"

    def scheduled_epochs(self, config: ConfigReader) -> int:
        return self.settings(config).epochs

    def range_test_setup(self, config: ConfigReader, inputs: dict[str, Path], steps: int, warn=print):
        """What `kp lr-find --stage tune` tests: the model tune starts from and its training batches,
        streamed as tune streams them, with the backbone's rate factors."""
        from pipeline.data.image_rows import load_split_images
        from pipeline.data.image_stream import training_stream
        from pipeline.models.unfreeze import backbone_rate_factors

        s = config.section("tune")
        images = load_split_images(inputs["download"], inputs["split"], config.competition.classes)
        model, backbone, preprocess, _ = build_tuned_model(config, inputs[s.source])
        per_epoch = -(-len(images.train) // s.batch_size)
        stream, _ = training_stream(images.train, image_size(config), s.batch_size, preprocess,
                                    training_augmenter(config, s.seed), s.seed, 0, -(-steps // per_epoch) + 1)
        return (model, None, None, stream.as_numpy_iterator(), backbone_rate_factors(backbone, s.backbone_lr_mult),
                len(images.train))


RECIPE = TuneRecipe()

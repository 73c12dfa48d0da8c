"""The head recipe (finetune's): a dense head on precompute's cached features, trained from nothing.

Build the head `model.arch` names (`pipeline.models.build`) -> train it on the split's training
rows (plus augment's passes of them with `finetune.augmented`; plus pseudo-labelled test rows, a
share of every batch, when a student is taught, see `pipeline.training.pseudo`) with the
configured optimizer and learning-rate schedule, keeping the best epoch by validation loss -> save
the model, its history and the validation and test probabilities (averaged over augment's test
passes with `finetune.tta`). With `training.deterministic` TensorFlow's op determinism is on, so
the same config gives the same bytes. When `model.arch` names a from-scratch model on pixels, the
finetune recipe is the scratch recipe instead (`steps`; `pipeline.training.recipes.scratch`).
Imports Keras inside the functions.
"""
from __future__ import annotations

import time
from pathlib import Path

from pipeline.core.config_reader import ConfigReader
from pipeline.core.errors import PipelineError
from pipeline.training.recipes.base import Recipe, TrainingRun

def load_training_data(config: ConfigReader, inputs: dict[str, Path], augmented: bool, tta: bool, sides=None):
    """The split's rows of precompute's arrays (`pipeline.data.features.SplitFeatures`), with augment's
    passes when `augmented` / `tta` ask for them.

    Args:
        config: a config view that reads `competition.classes`.
        inputs: upstream output folders by stage name (`precompute`, `split`, and `augment` when used).
        augmented: train on the clean rows plus every augmented pass of them.
        tta: average predictions over the clean rows and the augmented test passes.
        sides: (train, valid) row masks instead of the split's sides (`load_split_features`).
    """
    from pipeline.data.features import load_split_features

    return load_split_features(inputs["precompute"], inputs["split"], config.competition.classes,
                               passes_dir=inputs.get("augment"), train_passes=augmented, tta=tta, sides=sides)


def taught(train, data, teaching, batch_size: int, seed: int, log):
    """`train` unchanged without `teaching`; with it, batches mixing the labelled rows with the taught
    test rows (`pipeline.training.pseudo.mixed_batches`) and the counts for the record."""
    if teaching is None:
        return train, {}
    from pipeline.training.pseudo import mixed_batches, pseudo_share

    pseudo = teaching.rows(data)
    share = pseudo_share(batch_size, teaching.weight)
    passes = f" ({len(pseudo.x):,} rows with their passes)" if len(pseudo.x) > teaching.keep.sum() else ""
    log(f"pseudo-labels: {int(teaching.keep.sum()):,} of {len(teaching.keep):,} test rows{passes}, "
        f"{share} added to every {batch_size} labelled rows")
    return (mixed_batches(data.x_train, data.y_train, pseudo, batch_size, teaching.weight, seed),
            {"pseudo_rows": int(teaching.keep.sum()), "pseudo_rows_with_passes": len(pseudo.x),
             "pseudo_per_batch": share})


def distilled(train, data, targets):
    """The training rows with `targets` (a teacher's probabilities mixed with the labels, row for row with
    the clean training rows) as what they learn; each augmented pass of a row learns its row's target."""
    import numpy as np

    if not isinstance(train, tuple) or len(train[0]) != len(targets) * (data.train_passes + 1):
        raise PipelineError("a distilled student learns its training rows' targets as cached rows: it cannot be "
                            "combined with pseudo-labels, finetune.mixup or finetune.augment")
    return train[0], np.tile(np.asarray(targets, dtype=np.float32), (data.train_passes + 1, 1))


class CachedRowsRecipe(Recipe):
    """A recipe that trains on precompute's rows, with augment's passes as its section's `augmented`
    and `tta` say (the head and batchnorm recipes)."""

    needs = ("precompute", "split")

    def uses_passes(self, config: ConfigReader) -> bool:
        s = self.settings(config)
        return s.augmented or s.tta

    def data_key(self, config: ConfigReader) -> tuple:
        s = self.settings(config)
        return ("features", s.augmented, s.tta)

    def load(self, config: ConfigReader, inputs, sides=None):
        s = self.settings(config)
        return load_training_data(config, inputs, s.augmented, s.tta, sides)


def model_arch(config: ConfigReader) -> str:
    """The network `model.arch` names, `auto` resolved against `precompute.backbone` (`resolve_arch`)."""
    from pipeline.models.build import resolve_arch

    return resolve_arch(config.get("model.arch"), config.get("precompute.backbone"))


def trains_pixels(config: ConfigReader) -> bool:
    """Whether the model is a from-scratch ladder model on pixels."""
    from pipeline.models.scratch import LADDER

    return model_arch(config) in LADDER


class HeadRecipe(CachedRowsRecipe):
    """finetune's recipe: the `model` head on the cached features, from nothing."""

    name = "finetune"
    section = "finetune"
    reads = ("model", "precompute.backbone", "precompute.weights", "training.deterministic", "competition.classes")

    def resolved(self, config: ConfigReader) -> Recipe:
        """This recipe, or for a from-scratch model on pixels the scratch recipe."""
        from pipeline.training.recipes import recipe

        return recipe("scratch") if trains_pixels(config) else self

    def batches(self, config: ConfigReader, data, seed: int):
        """What `fit` trains on: the cached rows as arrays (a head never augments them on the fly)."""
        if self.settings(config).augment:
            raise PipelineError("finetune.augment augments pixels, but this model trains on cached conv features "
                                "(precompute.backbone is not none); set finetune.augment: null")
        return data.x_train, data.y_train

    def build(self, config: ConfigReader, data, warn=print):
        """A fresh network for `data`'s rows: (model, arch)."""
        from pipeline.models.build import build_model

        return build_model(config, data.x_train.shape[1:], len(data.classes), warn)

    def fit(self, config: ConfigReader, data, start, out, run: TrainingRun) -> dict:
        import keras

        from pipeline.training.fit import FitOptions, Phase, fit
        from pipeline.training.record import finish, set_determinism

        s, seed, teaching = self.settings(config), run.seed, run.teaching
        set_determinism(config.get("training.deterministic"))
        keras.utils.set_random_seed(seed)
        model, arch = self.build(config, data, run.warn)
        passes = f" (clean + {data.train_passes} augmented passes)" if data.train_passes else ""
        run.log(f"{run.title} {arch}: {model.count_params():,} parameters, {len(data.x_train):,} train{passes} / "
                f"{len(data.x_valid):,} valid rows of {data.x_train.shape[1:]}, seed {seed}".strip())
        if s.augment and teaching is not None:
            raise PipelineError("pseudo-labelling trains on cached rows; it cannot be combined with "
                                "finetune.augment (augmentation on the fly): set finetune.augment: null")
        train = self.batches(config, data, seed)
        if s.mixup is not None:
            from pipeline.training.mixup import mixed_rows

            if teaching is not None or not isinstance(train, tuple):
                raise PipelineError("finetune.mixup mixes the cached rows of each batch; it cannot be combined with "
                                    "pseudo-labels or finetune.augment (augmentation on the fly)")
            train = mixed_rows(*train, len(data.classes), s.batch_size, s.mixup, seed)
        train, pseudo_rows = taught(train, data, teaching, s.batch_size, seed, run.log)
        if run.targets is not None:
            train = distilled(train, data, run.targets)
        began = time.perf_counter()
        history, best_epoch, _ = fit(model, train, (data.x_valid, data.y_valid), FitOptions(
            phases=[Phase(p.epochs, p.lr) for p in s.phases], schedule=s.schedule, optimizer=s.optimizer,
            momentum=s.momentum, batch_size=s.batch_size, out_dir=out, verbose=run.verbose, title=run.title,
            warmup_epochs=s.warmup_epochs, stop_after=run.stop_after(self.name),
            soft_targets=teaching is not None or s.mixup is not None or run.targets is not None, label_smoothing=s.label_smoothing, ema=s.ema,
            curves=config.compute.tensorboard))
        seconds = time.perf_counter() - began
        return {
            **finish(model, data, history, best_epoch, out),
            "train_seconds": round(seconds, 2),
            "seconds_per_epoch": round(seconds / max(1, len(history["loss"])), 3),
            "arch": arch,
            "augmented_on_the_fly": bool(s.augment),
            "deterministic": config.get("training.deterministic"),
            "parameters": int(model.count_params()),
            "seed": seed,
            "n_train": len(data.x_train) // (data.train_passes + 1),
            "train_passes": data.train_passes,
            "n_valid": len(data.x_valid),
            **pseudo_rows,
        }

    def range_test_setup(self, config: ConfigReader, inputs, steps: int, warn=print):
        """What `kp lr-find` tests: (model, training rows x, y, None, None, row count)."""
        s = self.settings(config)
        data = load_training_data(config, inputs, s.augmented, tta=False)
        model, _ = self.build(config, data, warn)
        return model, data.x_train, data.y_train, None, None, len(data.x_train)


RECIPE = HeadRecipe()

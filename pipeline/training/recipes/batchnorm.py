"""The batchnorm recipe (bnretrain's): finetune's trained head with batchnorm inserted, then retrained harder.

Insert BatchNormalization after each hidden Dense layer of the trained head, initialised from the
training rows' activations so that every prediction is unchanged (checked on the validation rows,
`pipeline.models.batchnorm`) -> set every dropout rate to `bnretrain.dropout` (Keras' dropout is
inverted: no weight is rescaled) -> retrain the whole head with bnretrain's optimizer, momentum and
learning-rate phases on its own rows (`bnretrain.augmented` / `tta`), keeping the best epoch by
validation loss. A model trained from nothing by this recipe first follows the head recipe (its
head kept in `head/`). Imports Keras inside the functions.
"""
from __future__ import annotations

import time

import numpy as np

from pipeline.core.artifacts import MODEL_FILE
from pipeline.core.config_reader import ConfigReader
from pipeline.core.errors import PipelineError
from pipeline.models.saved import load_saved_model
from pipeline.training.recipes.base import Recipe, TrainingRun
from pipeline.training.recipes.head import RECIPE as HEAD
from pipeline.training.recipes.head import CachedRowsRecipe, load_training_data, model_arch, taught, trains_pixels

IDENTITY_TOLERANCE = 1e-4  # largest change of a validation probability batchnorm insertion may cause


class BatchnormRecipe(CachedRowsRecipe):
    """bnretrain's recipe: starts from a trained head (the head recipe's)."""

    name = "bnretrain"
    section = "bnretrain"
    reads = ("model.arch", "precompute.backbone", "training.deterministic", "competition.classes")

    def previous(self, config: ConfigReader) -> Recipe:
        return HEAD

    def check(self, config: ConfigReader) -> None:
        """A from-scratch model has batchnorm already: one clear error."""
        if trains_pixels(config):
            raise PipelineError(f"bnretrain inserts batchnorm into a dense head on cached features, but model.arch "
                                f"{model_arch(config)!r} is a from-scratch model that has it already: use finetune's "
                                "recipe")

    def with_batchnorm(self, config: ConfigReader, start, data, log=print):
        """The head of `start` with batchnorm inserted and dropout reset; (model, largest change of a validation probability)."""
        import keras

        from pipeline.models.batchnorm import with_batchnorm
        from pipeline.models.inference import predict_in_chunks

        s = self.settings(config)
        head = load_saved_model(start / MODEL_FILE)
        before = predict_in_chunks(head, data.x_valid)
        model = with_batchnorm(head, data.x_train, dropout=s.dropout)
        change = float(np.abs(predict_in_chunks(model, data.x_valid) - before).max()) if len(before) else 0.0
        if change > IDENTITY_TOLERANCE:
            raise RuntimeError(f"inserting batchnorm changed a validation probability by {change:.2e}")
        log(f"batchnorm inserted after {sum(isinstance(l, keras.layers.BatchNormalization) for l in model.layers)} "
            f"hidden layers; largest change of a validation probability {change:.1e}; dropout -> {s.dropout}")
        return model, change

    def fit(self, config: ConfigReader, data, start, out, run: TrainingRun) -> dict:
        import keras

        from pipeline.training.fit import FitOptions, Phase, fit
        from pipeline.training.record import finish, set_determinism

        if run.targets is not None:
            raise PipelineError("a distilled student follows finetune's recipe (a head on the cached features)")
        self.check(config)
        s, seed = self.settings(config), run.seed
        model, change = self.with_batchnorm(config, start, data, run.log)
        set_determinism(config.get("training.deterministic"))
        keras.utils.set_random_seed(seed)
        train, pseudo_rows = taught((data.x_train, data.y_train), data, run.teaching, s.batch_size, seed, run.log)
        began = time.perf_counter()
        history, best_epoch, _ = fit(model, train, (data.x_valid, data.y_valid), FitOptions(
            phases=[Phase(p.epochs, p.lr) for p in s.phases], schedule="phases", optimizer=s.optimizer,
            momentum=s.momentum, batch_size=s.batch_size, out_dir=out, verbose=run.verbose, title=run.title,
            stop_after=run.stop_after(self.name), soft_targets=run.teaching is not None,
            curves=config.compute.tensorboard))
        seconds = time.perf_counter() - began
        return {
            **finish(model, data, history, best_epoch, out),
            "arch": model_arch(config),
            "insertion_change": change,
            "dropout": s.dropout,
            "seconds_per_epoch": round(seconds / max(1, len(history["loss"])), 3),
            "seed": seed,
            "train_passes": data.train_passes,
            **pseudo_rows,
        }

    def range_test_setup(self, config: ConfigReader, inputs, steps: int, warn=print):
        """What `kp lr-find --stage bnretrain` tests: finetune's trained head with batchnorm inserted."""
        from pipeline.models.batchnorm import with_batchnorm

        s = self.settings(config)
        data = load_training_data(config, inputs, s.augmented, tta=False)
        model = with_batchnorm(load_saved_model(inputs["finetune"] / MODEL_FILE), data.x_train,
                               dropout=s.dropout)
        return model, data.x_train, data.y_train, None, None, len(data.x_train)


RECIPE = BatchnormRecipe()

"""Inference with a built model: a compiled forward pass over image batches for precompute, augment
and tune (`Forward`, run as a `DevicePlan` says), chunked prediction for heads, and its average over
augmented versions of the rows (test-time augmentation).

Imports TensorFlow / Keras inside the functions only.
"""
from __future__ import annotations

import numpy as np


class Forward:
    """A model's inference on image batches, compiled as a `DevicePlan` says.

    `batches(paths, size)` streams image files as this forward pass wants them (float32 pixels
    preprocessed in the input pipeline, or uint8 pixels that the compiled function casts and
    preprocesses on the device; prefetched onto the device when the plan says so), and calling the
    object on such a batch returns the model's float32 outputs as a tensor (on a GPU, before they are
    computed: converting them to NumPy is what waits). A tf.function: faster than `model.predict` on
    these CPUs (see README). With XLA it is compiled for one batch shape and a shorter last batch is
    padded with zeros, then cut, so it never compiles twice.
    """

    def __init__(self, model, plan, preprocess=None):
        """
        Args:
            model: a Keras model of images (as `preprocess` leaves them) to rows.
            plan: a `pipeline.models.device.DevicePlan` (its `batch_size` None: choose from the
                GPU's memory).
            preprocess: RGB 0..255 -> what the model expects, or None.
        """
        import tensorflow as tf

        self.model, self.plan, self.preprocess = model, plan, preprocess
        on_device = preprocess if plan.pixels == "uint8" else None

        def run(pixels):
            with tf.device(plan.device):
                images = tf.cast(pixels, tf.float32) if pixels.dtype != tf.float32 else pixels
                if on_device is not None:
                    images = on_device(images)
                outputs = model(images, training=False)
                return tf.cast(outputs, tf.float32) if outputs.dtype != tf.float32 else outputs

        self._run = tf.function(run, jit_compile=plan.xla, reduce_retracing=not plan.xla)
        self.batch_size = plan.batch_size or self._batch_for_memory()

    def __call__(self, batch):
        rows = int(batch.shape[0])
        if not self.plan.xla or rows == self.batch_size:
            return self._run(batch)
        import tensorflow as tf

        if rows > self.batch_size:  # only from `on_pixels`: batches from `batches` are never larger
            return tf.concat([self(batch[i:i + self.batch_size]) for i in range(0, rows, self.batch_size)], axis=0)
        padding = tf.zeros((self.batch_size - rows, *batch.shape[1:]), batch.dtype)
        return self._run(tf.concat([batch, padding], axis=0))[:rows]

    def on_pixels(self, images):
        """The outputs for RGB 0..255 images already in memory, as if they had been decoded from files."""
        import tensorflow as tf

        images = tf.convert_to_tensor(images, tf.float32)
        if self.plan.pixels == "uint8":
            return self(tf.cast(tf.clip_by_value(tf.round(images), 0, 255), tf.uint8))
        return self(self.preprocess(images) if self.preprocess is not None else images)

    def batches(self, paths, size: tuple[int, int], augment=None, channels: int = 3):
        """Batches of image files in order, ready for this forward pass (see `checked_batches`)."""
        from pipeline.data.images import checked_batches

        in_pipeline = self.preprocess if self.plan.pixels == "float32" else None
        return checked_batches(paths, size, self.batch_size, in_pipeline, channels, augment, pixels=self.plan.pixels,
                               device=self.plan.device if self.plan.prefetch else None)

    def _batch_for_memory(self) -> int:
        import tensorflow as tf

        from pipeline.models.device import choose_batch_size

        shape, dtype = tuple(self.model.input.shape[1:]), tf.as_dtype(self.plan.pixels)
        return choose_batch_size(lambda n: self._run(tf.zeros((n, *shape), dtype)).numpy(),
                                 self.plan.device.strip("/"))


def predict_in_chunks(model, x, chunk: int = 2048) -> np.ndarray:
    """Predict over a (possibly memory-mapped) array a slice at a time: memory stays flat.

    Args:
        model: a Keras model.
        x: an (n, ...) array; read `chunk` rows at a time.
        chunk: rows per call.

    Returns:
        (n, k) float32 outputs.
    """
    parts = [np.asarray(model.predict_on_batch(np.asarray(x[i:i + chunk], dtype=np.float32)))
             for i in range(0, len(x), chunk)]
    return np.concatenate(parts) if parts else np.zeros((0, model.output_shape[-1]), np.float32)


def predict_averaged(model, versions: list) -> tuple[np.ndarray, list[np.ndarray]]:
    """Test-time augmentation: the mean of the model's outputs over versions of the same rows.

    Args:
        model: a Keras model.
        versions: arrays of the same rows in the same order (the clean rows, then augmented passes).

    Returns:
        (the mean over versions, each version's own outputs).
    """
    each = [predict_in_chunks(model, x) for x in versions]
    return np.mean(each, axis=0, dtype=np.float64).astype(np.float32), each

"""Images on disk -> features on disk: the precompute loop, shared by the stage and its benchmark.

Decoding runs in tf.data's parallel map while the compiled forward pass consumes batches in index
order; each batch is written straight into a memory-mapped `.npy`, so memory stays flat however
many images there are. Imports TensorFlow.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from pipeline.arrays import ChunkedArrayWriter
from pipeline.images import image_batches


def compiled_forward(model):
    """The model's inference as a tf.function: faster than model.predict on these CPUs (see README)."""
    import tensorflow as tf

    return tf.function(lambda images: model(images, training=False), reduce_retracing=True)


def write_features(forward, paths: list[Path], out: Path, row_shape: tuple[int, ...], dtype: str,
                   size: tuple[int, int], batch_size: int, preprocess=None, progress=None) -> int:
    """Run `forward` over the images in `paths`, in order, into `out` (.npy). Returns rows written."""
    bar = progress if progress is not None else contextlib.nullcontext()
    with ChunkedArrayWriter(out, len(paths), row_shape, dtype) as writer, bar:
        for images in image_batches(paths, size, batch_size, preprocess):
            writer.append(np.asarray(forward(images)).astype(dtype, copy=False))
            if progress is not None:
                progress.update(len(images))
    return len(paths)

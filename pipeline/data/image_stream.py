"""Images streamed through tf.data for a model trained end to end: never all in memory, and resumable.

`training_stream` decodes, augments and preprocesses the training images in parallel (`tf.data`
map + prefetch, through `pipeline.data.images.load_image`), epoch after epoch. Each epoch's order is
a permutation drawn from (seed, epoch) and each image's augmentation from its own (epoch, row)
number, both stateless, so a run resumed at epoch e sees exactly the batches an uninterrupted run
would have seen from epoch e on. `labelled_batches` is the same without shuffling or augmentation
(validation during training). Imports TensorFlow inside the functions only.
"""
from __future__ import annotations

import math

from pipeline.data.image_rows import ImageRows


def training_stream(rows: ImageRows, size: tuple[int, int], batch_size: int, preprocess, augment, seed: int,
                    start_epoch: int, epochs: int):
    """(images, labels) batches of epochs `start_epoch` .. `epochs - 1`, one after the other.

    Args:
        rows: the training images and their labels.
        size: (height, width) they are decoded at.
        batch_size: images per batch (an epoch's last batch holds the rest).
        preprocess: the backbone's preprocessing of RGB 0..255, or None.
        augment: `augment(image, number)` on each decoded uint8 image (a `RowAugmenter`), or None;
            `number` is epoch * len(rows) + the image's position in `rows`.
        seed: the epochs' orders.
        start_epoch: the first epoch to produce (a resumed run's).
        epochs: the end of the schedule.

    Returns:
        (the tf.data Dataset, batches per epoch).
    """
    import tensorflow as tf

    from pipeline.data.images import load_image

    n = len(rows)
    paths = tf.constant([str(p) for p in rows.paths])
    labels = tf.constant(rows.labels, dtype=tf.int64)

    def epoch_batches(epoch):
        order = tf.random.experimental.stateless_shuffle(tf.range(n, dtype=tf.int64),
                                                         seed=tf.stack([tf.constant(seed, tf.int64), epoch]))

        def load(i):
            image = load_image(tf.gather(paths, i), epoch * n + i, size, 3, augment, preprocess)
            return image, tf.gather(labels, i)

        return (tf.data.Dataset.from_tensor_slices(order)
                .map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(batch_size))

    dataset = tf.data.Dataset.range(start_epoch, epochs).flat_map(epoch_batches)
    return dataset.prefetch(tf.data.AUTOTUNE), math.ceil(n / batch_size)


def labelled_batches(rows: ImageRows, size: tuple[int, int], batch_size: int, preprocess):
    """(images, labels) batches of `rows` in order, unaugmented: validation data for `fit`."""
    import tensorflow as tf

    from pipeline.data.images import image_batches

    images = image_batches(rows.paths, size, batch_size, preprocess)
    return tf.data.Dataset.zip((images, tf.data.Dataset.from_tensor_slices(rows.labels).batch(batch_size)))

"""Image input for Keras: files listed by the dataset index -> batches of RGB float tensors, in order.

Decoding and resizing run in parallel with the consumer (`tf.data` `map(num_parallel_calls=
AUTOTUNE)` + `prefetch`) while keeping the index order (`deterministic=True`): the features a
precompute writes are aligned row for row with the index, never shuffled. Large JPEGs are decoded
at 1/2, 1/4 or 1/8 scale when the target size allows (libjpeg's DCT scaling), which costs far less
than decoding full size and resizing. Imports TensorFlow: call only from inside a stage's `run`.
"""
from __future__ import annotations

from pathlib import Path

JPEG_SCALES = (1, 2, 4, 8)  # the reductions libjpeg can apply while decoding
# What tf.io.decode_image reads, as PIL names the formats (download checks against this list).
DECODABLE_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP")


def decode_resize(path, size: tuple[int, int], channels: int = 3):
    """One image file -> float32 (height, width, channels) in 0..255, resized bilinearly."""
    import tensorflow as tf

    height, width = size
    data = tf.io.read_file(path)

    def scaled_jpeg():
        shape = tf.image.extract_jpeg_shape(data)
        branch = tf.constant(0)  # index into SCALES: the largest scale that keeps the target size
        for i, scale in enumerate(JPEG_SCALES[1:], start=1):
            fits = tf.logical_and(shape[0] // scale >= height, shape[1] // scale >= width)
            branch = tf.where(fits, i, branch)
        return tf.switch_case(branch, [
            lambda scale=scale: tf.io.decode_jpeg(data, channels=channels, ratio=scale) for scale in JPEG_SCALES
        ])

    def resized(image, antialias: bool):
        return tf.image.resize(tf.cast(image, tf.float32), (height, width), antialias=antialias)

    # After DCT scaling a JPEG is less than 2x the target size, where plain bilinear does not alias
    # (and antialiasing would halve decode throughput); other formats may shrink by any factor.
    image = tf.cond(tf.io.is_jpeg(data), lambda: resized(scaled_jpeg(), antialias=False),
                    lambda: resized(tf.io.decode_image(data, channels=channels, expand_animations=False), True))
    image.set_shape((height, width, channels))
    return image


def image_batches(paths: list[str | Path], size: tuple[int, int], batch_size: int, preprocess=None,
                  channels: int = 3, augment=None, pixels: str = "float32", device: str | None = None):
    """A tf.data.Dataset of image batches, in the order of `paths`, decoded in parallel.

    `augment(image, row)`, when given, changes each decoded image (uint8, 0..255) before `preprocess`;
    `row` is the image's position in `paths` (see `pipeline.data.augmentation.RowAugmenter`).
    `pixels: uint8` yields the resized images rounded to uint8 (a quarter of the bytes to move to a
    GPU; `preprocess` must then be None: the device applies it). `device` ("/GPU:0"): batches are
    prefetched onto it, so the next batch is already there when the forward pass asks for it.
    """
    import tensorflow as tf

    rows = tf.range(len(paths), dtype=tf.int64)
    dataset = tf.data.Dataset.from_tensor_slices(([str(p) for p in paths], rows))
    dataset = dataset.map(lambda path, row: load_image(path, row, size, channels, augment, preprocess, pixels),
                          num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    dataset = dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)
    return dataset if device is None else dataset.apply(tf.data.experimental.prefetch_to_device(device, 2))


def load_image(path, row, size: tuple[int, int], channels: int = 3, augment=None, preprocess=None,
               pixels: str = "float32"):
    """One image inside a tf.data map: decoded and resized (`decode_resize`), then `augment(image, row)`
    on its uint8 pixels when given (`row` an int64 tensor: which draw), then `preprocess`; with
    `pixels: uint8` the (augmented) image rounded to uint8 instead, unpreprocessed."""
    import tensorflow as tf

    if pixels == "uint8" and preprocess is not None:
        raise ValueError("uint8 pixels go to the device unpreprocessed: preprocess there")
    image = decode_resize(path, size, channels)
    if augment is not None or pixels == "uint8":
        image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
    if augment is not None:
        changed = tf.numpy_function(lambda x, r: augment(x, int(r)), [image, row], tf.uint8, stateful=False)
        image = tf.ensure_shape(changed, image.shape)
    if pixels == "uint8":
        return image
    image = tf.cast(image, tf.float32)
    return preprocess(image) if preprocess is not None else image


def checked_batches(paths: list[str | Path], size: tuple[int, int], batch_size: int, preprocess=None,
                    channels: int = 3, augment=None, pixels: str = "float32", device: str | None = None):
    """`image_batches` as NumPy-ready tensors, in order; a file that fails to decode is named.

    tf.data reports a decoding error without the file; the batch it came from is the next one in
    order, so its files are decoded one by one to find it.

    Raises:
        PipelineError: naming the first file of that batch (or a later one) that does not decode.
    """
    import tensorflow as tf

    from pipeline.core.errors import PipelineError

    done = 0
    iterator = iter(image_batches(paths, size, batch_size, preprocess, channels, augment, pixels, device))
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except tf.errors.InvalidArgumentError as exc:
            for path in paths[done:]:
                try:
                    decode_resize(str(path), size, channels)
                except tf.errors.InvalidArgumentError:
                    reason = str(exc).splitlines()[0].split("status: ")[-1][:200]
                    raise PipelineError(f"{path}: cannot decode this image ({reason}); replace or remove the file "
                                        "and rerun download") from None
            raise
        done += len(batch)
        yield batch

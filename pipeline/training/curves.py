"""Training curves for TensorBoard: loss, accuracy and learning rate per epoch, written as event files.

Keras' own `TensorBoard` callback needs the `tensorboard` package at training time (its scalar
summaries are implemented there); kp must not, so `EpochCurves` writes the same event files
(`train/` and `validation/` runs, tags `epoch_loss`, `epoch_accuracy`, `epoch_learning_rate`, ...)
with TensorFlow's own summary writer and raw summary protos. TensorBoard is needed only to look at
them (`make tensorboard COMP=NAME`). Imports TensorFlow inside the callback.
"""
from __future__ import annotations

from pathlib import Path


def epoch_curves(log_dir: Path):
    """A Keras callback writing every epoch's logs to `log_dir/train` and `log_dir/validation` (`val_*`).

    Raises:
        PipelineError: the folder cannot be made (a file in its way, no permission), naming it and the
            setting that turns the curves off.
    """
    import keras
    import tensorflow as tf

    from pipeline.core.errors import PipelineError

    for side in ("train", "validation"):
        try:
            (log_dir / side).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            in_way = next((p for p in (log_dir / side, *(log_dir / side).parents) if p.exists() and not p.is_dir()),
                          None)
            what = f"{in_way} is a file, in the way of" if in_way else f"cannot make ({exc.strerror})"
            raise PipelineError(f"{what} the training curves' folder {log_dir / side}: move it, or set "
                                "compute.tensorboard: false") from None

    class EpochCurves(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.writers = {side: tf.summary.create_file_writer(str(log_dir / side)) for side in ("train", "validation")}

        def on_epoch_end(self, epoch, logs=None):
            for key, value in (logs or {}).items():
                side, name = ("validation", key[4:]) if key.startswith("val_") else ("train", key)
                summary = tf.compat.v1.Summary(value=[tf.compat.v1.Summary.Value(tag=f"epoch_{name}",
                                                                                  simple_value=float(value))])
                with self.writers[side].as_default():
                    tf.summary.experimental.write_raw_pb(summary.SerializeToString(), step=epoch)

        def on_train_end(self, logs=None):
            for writer in self.writers.values():
                writer.close()

    return EpochCurves()

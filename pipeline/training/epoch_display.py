"""One progress display per training, with its epochs: kp's own, in place of Keras' epoch lines.

On a terminal a bar over the training's epochs (`[comp] member 2/5 (seed 1001)`, its last loss,
validation loss and accuracy beside it), gone once the training ends; without a terminal one plain
line per epoch, with the competition's `[comp]` as every kp line has it; nothing under `kp -q`
(`pipeline.core.console`). Imports Keras inside the function only.
"""
from __future__ import annotations

import time

SHOWN = ("loss", "val_loss", "accuracy", "val_accuracy")


def epoch_display(title: str, epochs: int):
    """A Keras callback showing the training called `title` over its `epochs` epochs."""
    import keras

    from pipeline.core.console import interactive, progress, say

    class EpochDisplay(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.bar = progress(epochs, title or "training", unit="epoch") if interactive() else None
            self.started = time.monotonic()

        def on_epoch_end(self, epoch, logs=None):
            scores = ", ".join(f"{key} {logs[key]:.4f}" for key in SHOWN if key in (logs or {}))
            if self.bar is not None:
                self.bar.set_postfix_str(scores, refresh=False)
                self.bar.update(1)
            else:
                say(f"{title or 'training'}: epoch {epoch + 1}/{epochs}, {scores} "
                    f"({time.monotonic() - self.started:.1f} s)")

        def on_train_end(self, logs=None):
            if self.bar is not None:
                self.bar.close()

    return EpochDisplay()

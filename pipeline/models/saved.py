"""Reading a saved model back (`model.keras`), as one place: always in Keras' safe mode, and every
refusal is one message naming the file.

Safe mode refuses to deserialize a `Lambda` layer (arbitrary Python code in a model file); a
model file that is truncated, not a `.keras` archive, or holds layers this Keras does not know is
refused the same way. The message says what to do: rerun the stage that wrote it.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

from pipeline.core.errors import PipelineError


def load_saved_model(path: Path):
    """The Keras model saved at `path`, loaded with `safe_mode=True` and not compiled (whoever trains it
    again compiles it with its own loss and optimizer; one that only predicts needs none).

    Raises:
        PipelineError: the file is missing, damaged, or holds what safe mode refuses (a Lambda layer).
    """
    import keras

    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: no saved model there; rerun the stage that writes it")
    if not zipfile.is_zipfile(path):  # Keras would say "File not found" of a truncated one
        raise PipelineError(f"{path}: not a readable .keras model file (truncated or damaged: not a zip archive); "
                            "rerun the stage that wrote it (kp STAGE --force)")
    try:
        return keras.models.load_model(path, safe_mode=True, compile=False)  # every user compiles its own
    except ValueError as exc:
        if "Lambda" in str(exc):
            raise PipelineError(f"{path}: holds a Lambda layer (arbitrary Python code), which kp refuses to load "
                                "(Keras safe mode); kp never writes one: rerun the stage that wrote this file") from None
        raise PipelineError(f"{path}: Keras cannot load this model ({_first_line(exc)}); rerun the stage that "
                            "wrote it (kp STAGE --force)") from None
    except (OSError, EOFError, KeyError, TypeError) as exc:  # zipfile and h5py errors of a damaged file
        raise PipelineError(f"{path}: not a readable .keras model file (truncated or damaged: {_first_line(exc)}); "
                            "rerun the stage that wrote it (kp STAGE --force)") from None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__

"""Every network in `keras.applications`, by its Keras name, with what building one needs: its
module (whose `preprocess_input` prepares images), its preprocessing family, its default and
minimum input size, whether it takes `alpha`, and its feature width.

The table is derived from Keras itself (`derive_applications`) and committed as
`applications.json` beside this module (`kp backbones --write` regenerates it; a test checks that
it equals what the installed Keras gives), so that the config can check a backbone's name and `kp
backbones` can list them without importing TensorFlow. Names are matched case-insensitively, and
the pipeline's earlier names (`vgg16`, `mobilenet`, `mobilenetv2`, `resnet50`) are the same names
in lower case.

How each fact is derived:
- names: the constructors `keras.applications` exports (capitalised callables);
- preprocessing: the module's `preprocess_input` applied to a test array and compared with
  `imagenet_utils.preprocess_input` in each mode (`caffe`, `tf`, `torch`); `none` when it returns
  its input unchanged (EfficientNet, EfficientNetV2, ConvNeXt, MobileNetV3 rescale inside the model);
- sizes: the `default_size` and `min_size` the constructor hands to Keras'
  `imagenet_utils.obtain_input_shape`, caught there before anything is built (MobileNetV3 does not
  call it: 224 and 32, the sizes its ImageNet weights and its strides give);
- feature width: the channels of the network without its top, built with random weights.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.core.errors import PipelineError

TABLE_FILE = Path(__file__).with_name("applications.json")
PREPROCESSING = ("caffe", "tf", "torch", "none")  # imagenet_utils' modes, or none (the model rescales itself)
UNCAUGHT_SIZES = (224, 32)  # a constructor that never asks obtain_input_shape (MobileNetV3)


@dataclass(frozen=True)
class Application:
    """One `keras.applications` network."""

    name: str  # the Keras name: EfficientNetV2B0
    module: str  # keras.applications.<module>: efficientnet_v2
    preprocessing: str  # one of PREPROCESSING
    default_size: int  # the size its ImageNet weights were trained at
    min_size: int  # the smallest input it accepts
    alpha: bool  # the constructor takes a width multiplier
    width: int  # channels of its last feature map (what `cut: pool` averages to)


def applications() -> dict[str, Application]:
    """The committed table, by Keras name (no TensorFlow import)."""
    try:
        rows = json.loads(TABLE_FILE.read_text())
    except (OSError, ValueError) as exc:
        raise PipelineError(f"{TABLE_FILE}: cannot read the table of Keras networks ({exc}); "
                            "regenerate it with kp backbones --write") from None
    return {row["name"]: Application(**row) for row in rows}


def application(name: str) -> Application:
    """The table's row for `name` (any case: `efficientnetv2b0`, `vgg16`); a PipelineError listing
    close names if none."""
    import difflib

    table = applications()
    by_lower = {known.lower(): row for known, row in table.items()}
    if name.lower() not in by_lower:
        names = list(table)
        close = difflib.get_close_matches(name, names + [n.lower() for n in names], n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise PipelineError(f"precompute.backbone {name!r}: not a keras.applications network{hint}; "
                            "kp backbones lists them (or use none, file with a saved model, or hub:PRESET for a KerasHub preset)")
    return by_lower[name.lower()]


def derive_applications(widths: bool = True) -> list[Application]:
    """The table from the installed Keras (imports it; building every network for its width takes
    about a minute on 2 cores, `widths=False` skips that and leaves 0)."""
    import inspect
    import sys

    import keras

    rows = []
    for name in sorted(n for n in dir(keras.applications) if n[:1].isupper()):
        constructor = getattr(keras.applications, name)
        if not callable(constructor) or "include_top" not in inspect.signature(constructor).parameters:
            continue
        module = sys.modules[constructor.__module__]
        default_size, min_size = _sizes(constructor)
        rows.append(Application(
            name=name,
            module=constructor.__module__.rsplit(".", 1)[-1],
            preprocessing=_preprocessing(module.preprocess_input),
            default_size=default_size,
            min_size=min_size,
            alpha="alpha" in inspect.signature(constructor).parameters,
            width=_width(constructor, min_size, default_size) if widths else 0,
        ))
    return rows


def write_table(rows: list[Application]) -> Path:
    """Commit `rows` as the table (`kp backbones --write`)."""
    from pipeline.core.cache import write_text_atomic

    write_text_atomic(TABLE_FILE, json.dumps([asdict(row) for row in rows], indent=1) + "\n")
    return TABLE_FILE


class _Asked(Exception):
    """Raised from inside `obtain_input_shape` to carry out the sizes a constructor asked for."""


def _sizes(constructor) -> tuple[int, int]:
    """(default_size, min_size) as the constructor passes them to `obtain_input_shape`, caught there
    before any layer is built; the module attribute is put back at once."""
    from keras.src.applications import imagenet_utils

    def ask(input_shape, default_size, min_size, *args, **kwargs):
        raise _Asked(default_size, min_size)

    original = imagenet_utils.obtain_input_shape
    imagenet_utils.obtain_input_shape = ask
    try:
        constructor(include_top=False, weights=None, input_shape=None)
    except _Asked as asked:
        return int(asked.args[0]), int(asked.args[1])
    finally:
        imagenet_utils.obtain_input_shape = original
    return UNCAUGHT_SIZES


def _preprocessing(preprocess_input) -> str:
    """Which of `PREPROCESSING` a module's `preprocess_input` does, found by applying it."""
    import numpy as np
    from keras.src.applications import imagenet_utils

    images = np.random.default_rng(0).uniform(0, 255, (2, 4, 4, 3)).astype("float32")
    out = np.asarray(preprocess_input(images.copy()))
    if np.allclose(out, images):
        return "none"
    for mode in ("caffe", "tf", "torch"):
        if np.allclose(out, np.asarray(imagenet_utils.preprocess_input(images.copy(), mode=mode)), atol=1e-4):
            return mode
    raise PipelineError(f"{preprocess_input.__module__}.preprocess_input matches none of {PREPROCESSING}")


def _width(constructor, min_size: int, default_size: int) -> int:
    import keras

    for size in (max(min_size, 32), default_size):
        try:
            model = constructor(include_top=False, weights=None, input_shape=(size, size, 3))
        except ValueError:  # a network that builds only at its own size (NASNet)
            continue
        width = int(model.output.shape[-1])
        keras.backend.clear_session()
        return width
    raise PipelineError(f"keras.applications.{constructor.__name__} builds at neither {min_size} nor {default_size}")

"""Frozen backbones for feature precomputation: any `keras.applications` network by name, a whole
saved model (`backbone: file`), or a KerasHub preset (`backbone: hub:PRESET`, `pipeline.models.hub`).

`build_feature_model` returns the network without its top, cut where the config says (`conv`: the
last feature map; `pool`: global average pooling, except for the VGG family, whose `pool` is the
course's cut, block5_pool), and the preprocessing its images need: the module's
`preprocess_input` (caffe, tf or torch modes), or none for networks that rescale inside themselves
(EfficientNet, EfficientNetV2, ConvNeXt, MobileNetV3), or what `precompute.preprocess` names. A
saved model file brings its own network (the preprocessing is then declared in the config).
`weights` is `imagenet` (Keras' download, for machines with a network), `none` (random: speed
tests and CI) or a path to a weights file. Constructors are always called with keyword arguments
(their positional orders differ). Imports Keras: call only from inside a stage's `run`.
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pipeline.core.errors import PipelineError
from pipeline.models.applications import application
from pipeline.models.hub import hub_feature_model, hub_preset

FILE_BACKBONE = "file"  # precompute.backbone: file -> precompute.weights is a whole .keras model
CUTS = ("conv", "pool")  # precompute.cut: the last feature map, or pooled
PREPROCESSING = ("backbone", "none", "tf", "caffe", "torch")  # precompute.preprocess: the network's own, none, a mode
VGG_FAMILY = ("VGG16", "VGG19")  # cut `pool` keeps block5_pool's map (the course's cut), `conv` the last conv


@dataclass
class FeatureModel:
    model: object  # keras.Model: images (preprocessed) -> features
    preprocess: Callable | None  # RGB 0..255 -> what the model expects; None: fed as they are
    name: str


def resolve_weights(weights: str, root: Path) -> str | None:
    """'imagenet' | 'none' | a path (relative to the project root) -> what keras.applications takes."""
    if weights == "imagenet":
        return "imagenet"
    if weights == "none":
        return None
    path = Path(weights).expanduser()
    path = path if path.is_absolute() else root / path
    if path.is_dir():
        raise PipelineError(f"precompute.weights {weights!r}: {path} is a folder; give the weights file in it (a .h5 "
                            "or .weights.h5 file; a whole .keras model with precompute.backbone: file)")
    if not path.is_file():
        raise PipelineError(f"precompute.weights {weights!r}: no such file {path} (or use imagenet / none)")
    return str(path)


def build_feature_model(backbone: str, weights: str | None, input_shape: tuple[int, int, int],
                        cut: str, alpha: float = 1.0, preprocess: str = "backbone", root: Path = Path(".")
                        ) -> FeatureModel:
    """The frozen network of a `precompute` section.

    Args:
        backbone: a `keras.applications` name (any case), `file`, or `hub:PRESET`.
        weights: `resolve_weights`' value: "imagenet", None (random) or a file path (for `file`, the
            saved model).
        input_shape: (height, width, 3).
        cut: `conv` | `pool`.
        alpha: the width multiplier, for the networks that take one.
        preprocess: `backbone` (the network's own), `none` (RGB 0..255), or a mode of
            `imagenet_utils.preprocess_input` (`caffe`, `tf`, `torch`).
        root: the project root, against which a relative KerasHub preset folder resolves.

    Returns:
        A `FeatureModel`.
    """
    preset = hub_preset(backbone)
    if preset is not None:
        if preprocess != "backbone":
            raise PipelineError(f"precompute.backbone {backbone}: the preset's image converter prepares its images; "
                                "leave precompute.preprocess at backbone")
        model, name = hub_feature_model(preset, root, input_shape, cut, random_weights=weights is None)
        return FeatureModel(model, None, name)
    if backbone == FILE_BACKBONE:
        return _saved_model(weights, input_shape, cut, preprocess)
    import keras

    app = application(backbone)
    if min(input_shape[:2]) < app.min_size:
        raise PipelineError(f"precompute.backbone {app.name} needs images of at least {app.min_size}x{app.min_size} "
                            f"(competition.image_size is {list(input_shape[:2])}; its own size is {app.default_size})")
    constructor = getattr(keras.applications, app.name)
    options = {"include_top": False, "weights": weights, "input_shape": input_shape}
    if app.alpha:
        options["alpha"] = alpha
    if app.name not in VGG_FAMILY:
        options["pooling"] = "avg" if cut == "pool" else None
    try:
        model = constructor(**options)
    except ValueError as exc:  # a weights file that does not fit the architecture, a bad alpha/size
        raise PipelineError(f"precompute: cannot build {app.name} with weights {weights!r}: {exc}") from None
    except zipfile.BadZipFile:  # a `.keras` file Keras opens as a zip archive
        raise PipelineError(f"precompute.weights {weights}: not a .keras file Keras can read (not a zip archive: "
                            "truncated, or another kind of file); give a .h5 / .weights.h5 weights file or a whole "
                            ".keras model") from None
    except OSError as exc:  # h5py's words for a damaged file carry no errno: "Unable to open file (truncated file ...)"
        if exc.errno is not None:
            raise
        raise PipelineError(f"precompute.weights {weights}: not an HDF5 weights file Keras can read (truncated or "
                            f"damaged: {str(exc).splitlines()[0][:200]}); download it again") from None
    except Exception as exc:  # Keras' download of the ImageNet weights, offline: urllib's errors
        if weights != "imagenet":
            raise
        raise PipelineError(f"precompute.weights imagenet: Keras could not download {app.name}'s ImageNet weights "
                            f"({type(exc).__name__}: {str(exc)[:200]}); on a machine without a network fetch the file "
                            "named there and put it in $KERAS_HOME/models (~/.keras/models), or set precompute.weights "
                            "to its path") from None
    if app.name in VGG_FAMILY and cut == "conv":
        last_conv = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)][-1]
        model = keras.Model(model.input, last_conv.output, name=f"{app.name.lower()}_features")
    return FeatureModel(model, _preprocessing(app, preprocess), _display_name(app, alpha))


def preprocessing_of(backbone: str, preprocess: str) -> Callable | None:
    """What `build_feature_model` prepares the images with, without building the network (a kernel's
    fine-tuned model holds its backbone; its images are prepared as precompute's were).

    Args:
        backbone, preprocess: as `build_feature_model` takes them.
    """
    if hub_preset(backbone) is not None:
        return None
    if backbone == FILE_BACKBONE:
        return _mode(preprocess)
    return _preprocessing(application(backbone), preprocess)


def _preprocessing(app, preprocess: str) -> Callable | None:
    """What the images go through before the network (None: RGB 0..255 as they are)."""
    if preprocess == "backbone":
        if app.preprocessing == "none":
            return None
        import keras

        return getattr(keras.applications, app.module).preprocess_input
    return _mode(preprocess)


def _mode(preprocess: str) -> Callable | None:
    """`imagenet_utils.preprocess_input` in one of its modes, or None for `none`."""
    if preprocess == "none":
        return None
    from keras.src.applications import imagenet_utils

    return lambda images: imagenet_utils.preprocess_input(images, mode=preprocess)


def _display_name(app, alpha: float) -> str:
    """The name precompute's headline and meta show: the earlier lower-case names where they exist
    (vgg16, mobilenet_0.25), the Keras name otherwise."""
    short = {"VGG16": "vgg16", "MobileNet": "mobilenet", "MobileNetV2": "mobilenetv2", "ResNet50": "resnet50"}
    name = short.get(app.name, app.name)
    return f"{name}_{alpha}" if app.alpha else name


def _saved_model(path: str | None, input_shape: tuple[int, int, int], cut: str, preprocess: str) -> FeatureModel:
    """`backbone: file`: a whole saved model (images -> a feature map or a vector) as the network,
    loaded in safe mode, at the competition's image size when it accepts any size."""
    import keras

    from pipeline.models.saved import load_saved_model

    if path is None or path == "imagenet":
        raise PipelineError("precompute.backbone file needs precompute.weights: the path of the .keras model to use")
    if preprocess == "backbone":
        raise PipelineError("precompute.backbone file: say how its images are prepared with precompute.preprocess "
                            "(tf | caffe | torch | none: RGB 0..255, for a model that rescales them itself)")
    saved = load_saved_model(Path(path))
    fixed = tuple(saved.input.shape[1:])
    if any(dim is not None and dim != want for dim, want in zip(fixed, input_shape)):
        raise PipelineError(f"precompute.weights {path}: the model takes images of {list(fixed)}, "
                            f"competition.image_size gives {list(input_shape)}; set it to the model's size")
    # the same layers and weights on an input of the competition's size: flat, so that tune can unfreeze its blocks
    model = keras.models.clone_model(saved, input_tensors=keras.Input(input_shape))
    model.set_weights(saved.get_weights())
    outputs = model.output
    if cut == "pool" and len(outputs.shape) == 4:
        outputs = keras.layers.GlobalAveragePooling2D()(outputs)
    return FeatureModel(keras.Model(model.input, outputs, name=f"{Path(path).stem}_features"), _mode(preprocess),
                        Path(path).stem)

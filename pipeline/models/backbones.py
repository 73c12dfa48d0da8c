"""Frozen ImageNet backbones for feature precomputation: VGG16 (the course's), MobileNet v1 and v2, ResNet50.

`build_feature_model` returns the conv base cut where the config says (`conv`: the last conv
layer's activations; `pool`: VGG16's block5_pool, the course's cut, or global average pooling for
the others) and the backbone's own `preprocess_input`. `weights` is `imagenet` (Keras' download,
for machines with a network), `none` (random: speed tests and CI) or a path to a weights file.
Imports Keras: call only from inside a stage's `run`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pipeline.core.errors import PipelineError

BACKBONES = ("vgg16", "mobilenet", "mobilenetv2", "resnet50")
VGG_LAST_CONV = "block5_conv3"


@dataclass
class FeatureModel:
    model: object  # keras.Model: images (preprocessed) -> features
    preprocess: Callable  # the backbone's preprocess_input: RGB 0..255 -> what the model expects
    name: str


def resolve_weights(weights: str, root: Path) -> str | None:
    """'imagenet' | 'none' | a path (relative to the project root) -> what keras.applications takes."""
    if weights == "imagenet":
        return "imagenet"
    if weights == "none":
        return None
    path = Path(weights).expanduser()
    path = path if path.is_absolute() else root / path
    if not path.is_file():
        raise PipelineError(f"precompute.weights {weights!r}: no such file {path} (or use imagenet / none)")
    return str(path)


def build_feature_model(backbone: str, weights: str | None, input_shape: tuple[int, int, int],
                        cut: str, alpha: float = 1.0) -> FeatureModel:
    import keras

    apps = keras.applications
    try:
        if backbone == "vgg16":
            base = apps.VGG16(include_top=False, weights=weights, input_shape=input_shape)
            output = base.get_layer(VGG_LAST_CONV).output if cut == "conv" else base.output
            model = keras.Model(base.input, output, name="vgg16_features")
            return FeatureModel(model, apps.vgg16.preprocess_input, "vgg16")
        if backbone == "mobilenet":
            base = apps.MobileNet(include_top=False, weights=weights, input_shape=input_shape, alpha=alpha,
                                  pooling="avg" if cut == "pool" else None)
            return FeatureModel(base, apps.mobilenet.preprocess_input, f"mobilenet_{alpha}")
        if backbone == "mobilenetv2":
            base = apps.MobileNetV2(include_top=False, weights=weights, input_shape=input_shape, alpha=alpha,
                                    pooling="avg" if cut == "pool" else None)
            return FeatureModel(base, apps.mobilenet_v2.preprocess_input, f"mobilenetv2_{alpha}")
        if backbone == "resnet50":
            base = apps.ResNet50(include_top=False, weights=weights, input_shape=input_shape,
                                 pooling="avg" if cut == "pool" else None)
            return FeatureModel(base, apps.resnet50.preprocess_input, "resnet50")
    except ValueError as exc:  # a weights file that does not fit the architecture, a bad alpha/size
        raise PipelineError(f"precompute: cannot build {backbone} with weights {weights!r}: {exc}") from None
    except OSError as exc:  # h5py's words for a damaged file carry no errno: "Unable to open file (truncated file ...)"
        if exc.errno is not None:
            raise
        raise PipelineError(f"precompute.weights {weights}: not an HDF5 weights file Keras can read (truncated or "
                            f"damaged: {str(exc).splitlines()[0][:200]}); download it again") from None
    raise PipelineError(f"precompute.backbone {backbone!r}: expected one of {BACKBONES}")

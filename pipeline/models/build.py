"""Which network the `model` config section builds: its schema, and the head or ladder model it names.

Heads (`fc`, `pool`, or `auto`) train on cached conv features; the from-scratch ladder (linear ...
cnn_bn_do, cnn_strided) trains on pixels. The allowed values come from the code that builds them (`HEADS`,
`LADDER`), never from a second hand-typed list. Keras is imported only inside `build_model`.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline.core.config_reader import ConfigReader
from pipeline.core.errors import PipelineError
from pipeline.core.settings import StrictModel
from pipeline.models.heads import HEAD_KINDS
from pipeline.models.scratch import LADDER

HEADS = ("auto", *HEAD_KINDS)


class Model(StrictModel):
    """The `model` section: the network finetune and every ensemble member train."""

    arch: Literal[HEADS + LADDER] = Field("auto", description=(
        "on cached features: auto (fc for vgg16, else pool) | fc | pool; from scratch: linear | hidden | cnn | "
        "cnn_bn | cnn_bn_do | cnn_strided"))
    hidden: list[int] = Field([4096, 4096], description=(
        "hidden dense layer sizes (the course's VGG16 head: 4096, 4096; cnn*: the dense layer before the output)"))
    dropout: list[float] = Field([0.5, 0.5], description=(
        "one dropout rate per hidden layer (inverted dropout: no weight rescaling); cnn and cnn_bn use none"))
    conv_dropout: float = Field(0.0, ge=0, lt=1, description=(
        "cnn_bn_do, cnn_strided: dropout after each conv block's downsampling"))
    l2: float = Field(0.0, ge=0, description="L2 weight penalty on every dense layer")
    imagenet_init: bool = Field(True, description=(
        "fc on vgg16 imagenet features: start fc1/fc2 from VGG16's ImageNet top"))

    @model_validator(mode="after")
    def _one_rate_per_layer(self):
        if len(self.dropout) != len(self.hidden):
            raise ValueError(f"dropout has {len(self.dropout)} rates for {len(self.hidden)} hidden layers")
        if any(not 0 <= r < 1 for r in self.dropout):
            raise ValueError(f"dropout rates must be in [0, 1), got {self.dropout}")
        return self


def resolve_arch(arch: str, backbone: str) -> str:
    """`auto` -> fc for VGG16 features (the course's head), pool for other backbones, cnn_bn_do on
    pixels; checks that heads get features and ladder models get pixels."""
    if arch == "auto":
        arch = "fc" if backbone.lower() in ("vgg16", "vgg19") else "pool" if backbone != "none" else "cnn_bn_do"
    if arch in HEADS and backbone == "none":
        raise PipelineError(f"model.arch {arch!r} is a head for cached conv features, but precompute.backbone "
                            f"is none (pixels); use one of {', '.join(LADDER)}")
    return arch


def build_model(config: ConfigReader, input_shape: tuple[int, ...], n_classes: int, warn=print):
    """The network of the config's `model` section for inputs of `input_shape`.

    Args:
        config: the config (or a stage's view of it) with `model`, `precompute.backbone` and
            `precompute.weights`.
        input_shape: one row's shape (features or pixels).
        n_classes: outputs of the softmax.
        warn: called with a message when a setting cannot be honoured.

    Returns:
        (the Keras model, the resolved arch name).
    """
    from pipeline.models.heads import build_head, init_from_vgg16_top
    from pipeline.models.scratch import build_scratch_model

    m, backbone = config.section("model"), config.get("precompute.backbone")
    arch = resolve_arch(m.arch, backbone)
    if arch in LADDER:
        return build_scratch_model(arch, input_shape, n_classes, m.hidden, m.dropout, m.conv_dropout, m.l2), arch
    model = build_head(input_shape, n_classes, arch, m.hidden, m.dropout, m.l2)
    if arch == "fc" and m.imagenet_init:
        if backbone.lower() == "vgg16" and config.get("precompute.weights") == "imagenet":
            init_from_vgg16_top(model)
        else:
            warn("model.imagenet_init needs precompute.backbone vgg16 with weights imagenet; "
                 "the head starts from random weights")
    return model, arch

"""A trained head put back on its backbone, with the backbone's top blocks unfrozen: the tune stage's network.

A backbone's layers fall into blocks by their Keras names (VGG16's `block3_*`, MobileNetV2's
`block_12_*`, MobileNet's `conv_dw_5`/`conv_pw_5`, ResNet50's `conv4_block2_*`; layers before the
first block form the stem, and unnamed layers such as pads, activations and pools belong to the
block before them). `unfreeze_top` makes the top N blocks trainable (or all of them) and leaves
every BatchNormalization layer of the backbone frozen: in Keras 3 a BatchNormalization layer with
`trainable = False` runs in inference mode, with its ImageNet moving statistics, even while the
model trains, which is what small batches of a few thousand images need. Imports Keras.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from pipeline.core.errors import PipelineError

BLOCK_PATTERNS = (
    r"^(block\d+)_",              # VGG16: block1 .. block5
    r"^(block_\d+)_",             # MobileNetV2: block_1 .. block_16
    r"^(expanded_conv)_",         # MobileNetV2's first inverted-residual block
    r"^(Conv_1)",                 # MobileNetV2's last 1x1 conv (and its batchnorm)
    r"^conv_(?:dw|pw|pad)_(\d+)",  # MobileNet v1: depthwise + pointwise pair n
    r"^(conv\d_block\d+)_",       # ResNet50
)
STEM = "stem"


def block_of(name: str) -> str | None:
    """The block a layer name starts, or None for a layer that belongs to the block before it."""
    for pattern in BLOCK_PATTERNS:
        match = re.match(pattern, name)
        if match:
            return match.group(1)
    return None


def backbone_blocks(backbone) -> list[tuple[str, list]]:
    """The backbone's blocks in order, bottom first, each (name, its layers), only blocks with weights."""
    blocks: list[tuple[str, list]] = [(STEM, [])]
    for layer in backbone.layers:
        name = block_of(layer.name)
        if name is not None and name != blocks[-1][0]:
            blocks.append((name, []))
        blocks[-1][1].append(layer)
    return [(name, layers) for name, layers in blocks if any(layer.weights for layer in layers)]


@dataclass
class Unfrozen:
    blocks: list[str]  # the unfrozen blocks, bottom first
    total_blocks: int
    trainable_backbone_weights: int  # parameters
    frozen_batchnorm: int  # BatchNormalization layers kept in inference mode


def unfreeze_top(backbone, count: int | str) -> Unfrozen:
    """Make the top `count` blocks of `backbone` trainable (`"all"`: every block), all others frozen,
    and every BatchNormalization layer frozen (inference mode)."""
    import keras

    blocks = backbone_blocks(backbone)
    chosen = blocks if count == "all" else blocks[len(blocks) - count:] if count else []
    backbone.trainable = True
    open_layers = {id(layer) for _, layers in chosen for layer in layers}
    batchnorm = 0
    for layer in backbone.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
            batchnorm += 1
        else:
            layer.trainable = id(layer) in open_layers
    weights = sum(math.prod(v.shape) for v in backbone.trainable_weights)
    return Unfrozen([name for name, _ in chosen], len(blocks), weights, batchnorm)


def stack(backbone, head):
    """One model: images -> backbone -> the trained head. Raises PipelineError when the head was trained
    on features of another shape (e.g. `cut: conv` features for a head that flattens them)."""
    import keras

    made, expected = tuple(backbone.output.shape[1:]), tuple(head.input.shape[1:])
    if made != expected:
        raise PipelineError(f"the backbone makes features of shape {made} at this image size, but the head was "
                            f"trained on {expected}: use precompute.cut pool (a pooled head fits any size) or "
                            "tune.image_size equal to precompute's size")
    return keras.Model(backbone.input, head(backbone.output), name="tuned")


def backbone_rate_factors(backbone, factor: float) -> dict[str, float]:
    """Variable path -> `factor` for every trainable variable of the backbone (discriminative rates)."""
    return {v.path: float(factor) for v in backbone.trainable_variables}

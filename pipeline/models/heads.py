"""Dense heads trained on cached conv features, and the dropout and ImageNet-init tools for them.

`fc` is the course's VGG16 head (pool if the features are pre-pool, Flatten, Dense 4096, Dropout,
Dense 4096, Dropout, Dense n), which can start from VGG16's own ImageNet fc1/fc2 weights; `pool`
is a global-average-pool head with configurable hidden layers for the other backbones.

Keras' Dropout is inverted: kept units are scaled by 1/(1 - rate) while training and nothing is
scaled at inference. So a model whose dropout rates change keeps its weights as they are (as
bnretrain's batchnorm insertion does; tests/test_transfer.py checks it); the course halved them,
which changed every prediction. Imports Keras.
"""
from __future__ import annotations

VGG_POOLED_SHAPE = (7, 7, 512)
HEAD_KINDS = ("fc", "pool")  # the heads `build_head` builds


def build_head(input_shape: tuple[int, ...], n_classes: int, kind: str, hidden: list[int],
               dropout: list[float], l2: float = 0.0, name: str = "head"):
    import keras
    from keras import layers

    if len(dropout) != len(hidden):
        raise ValueError(f"{len(dropout)} dropout rates for {len(hidden)} hidden layers")
    regularizer = keras.regularizers.L2(l2) if l2 else None
    inputs = keras.Input(shape=input_shape, name="features")
    x = inputs
    if len(input_shape) == 3:
        if kind == "fc":
            if input_shape[0] > VGG_POOLED_SHAPE[0]:  # last-conv features: pool as VGG16's block5_pool does
                x = layers.MaxPooling2D(2, name="block5_pool")(x)
            x = layers.Flatten(name="flatten")(x)
        else:
            x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    for i, (units, rate) in enumerate(zip(hidden, dropout), start=1):
        x = layers.Dense(units, activation="relu", kernel_regularizer=regularizer, name=f"fc{i}")(x)
        x = layers.Dropout(rate, name=f"dropout{i}")(x)
    outputs = layers.Dense(n_classes, activation="softmax", kernel_regularizer=regularizer, name="predictions")(x)
    return keras.Model(inputs, outputs, name=name)


def init_from_vgg16_top(head) -> list[str]:
    """Copy VGG16's ImageNet fc1/fc2 into the head's fc1/fc2 (needs Keras' ImageNet download)."""
    import keras

    top = keras.applications.VGG16(include_top=True, weights="imagenet")
    return copy_dense_weights(top, head, ["fc1", "fc2"])


def copy_dense_weights(source, target, names: list[str]) -> list[str]:
    """Copy the named layers' weights from `source` to `target` where both have them with equal shapes."""
    copied = []
    for name in names:
        try:
            src, dst = source.get_layer(name), target.get_layer(name)
        except ValueError:
            continue
        if [w.shape for w in src.get_weights()] == [w.shape for w in dst.get_weights()]:
            dst.set_weights(src.get_weights())
            copied.append(name)
    return copied

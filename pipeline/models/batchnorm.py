"""Batchnorm inserted into a trained dense head without changing a single prediction (the course's
Vgg16BN step, done right), and new dropout rates without rescaling a weight.

After each hidden Dense layer (its ReLU output `a`) a BatchNormalization layer is inserted with
moving mean / variance = the mean / variance of `a` over the training rows, gamma = sqrt(variance +
epsilon) and beta = mean. In inference mode it computes gamma * (a - mean) / sqrt(variance +
epsilon) + beta = a: the network's outputs are unchanged. (The course set gamma to the variance,
which changed its validation loss from 1.52 to 4.76.) Keras' Dropout is inverted, so changing its
rate needs no weight rescaling either. Imports Keras.
"""
from __future__ import annotations

import numpy as np

BN_EPSILON = 1e-3  # Keras' default


def activation_statistics(model, layer_name: str, x, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance (float64, per unit) of `layer_name`'s output over the rows of `x`."""
    import keras

    probe = keras.Model(model.input, model.get_layer(layer_name).output)
    total = total_sq = None
    for start in range(0, len(x), chunk):
        out = np.asarray(probe.predict_on_batch(np.asarray(x[start:start + chunk], dtype=np.float32)), np.float64)
        total = out.sum(axis=0) if total is None else total + out.sum(axis=0)
        total_sq = (out ** 2).sum(axis=0) if total_sq is None else total_sq + (out ** 2).sum(axis=0)
    mean = total / len(x)
    return mean, np.maximum(total_sq / len(x) - mean ** 2, 0.0)


def with_batchnorm(model, x_train, dropout: float | None = None, momentum: float = 0.99):
    """A copy of the dense head `model` with BatchNormalization after every hidden Dense layer,
    initialised so that its predictions equal the original's, and optionally new dropout rates.

    Args:
        model: a trained functional Keras model whose layers form one chain (the heads in `heads.py`).
        x_train: the training rows (features) whose activations set the batchnorm statistics.
        dropout: a new rate for every Dropout layer (None: keep them).
        momentum: the inserted layers' moving-average momentum for later training.

    Returns:
        The new model (uncompiled); weights copied, batchnorm set as above.
    """
    import keras
    from keras import layers

    hidden = [layer.name for layer in model.layers
              if isinstance(layer, layers.Dense) and layer is not model.layers[-1]]
    statistics = {name: activation_statistics(model, name, x_train) for name in hidden}
    inputs = keras.Input(shape=model.input.shape[1:], name=model.layers[0].name)
    x = inputs
    for layer in model.layers[1:]:
        config = layer.get_config()
        if isinstance(layer, layers.Dropout) and dropout is not None:
            config["rate"] = float(dropout)
        copy = layer.__class__.from_config(config)
        x = copy(x)
        copy.set_weights(layer.get_weights())
        if layer.name in statistics:
            mean, variance = statistics[layer.name]
            bn = layers.BatchNormalization(epsilon=BN_EPSILON, momentum=momentum, name=f"{layer.name}_bn")
            x = bn(x)
            bn.set_weights([np.sqrt(variance + BN_EPSILON).astype(np.float32), mean.astype(np.float32),
                            mean.astype(np.float32), variance.astype(np.float32)])
    return keras.Model(inputs, x, name=f"{model.name}_bn")

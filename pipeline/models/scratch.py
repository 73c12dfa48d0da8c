"""The MNIST lesson's ladder of from-scratch models, each a step up from the one before.

linear (softmax regression) -> hidden (one dense layer) -> cnn (conv32-conv32-pool-conv64-conv64-
pool-dense-out, 3x3 filters) -> cnn_bn (batchnorm after every conv and dense layer) -> cnn_bn_do
(plus dropout) -> cnn_strided (the digit-recognizer leaderboard's CNN: each block conv3-conv3 then a
5x5 stride-2 convolution instead of pooling, a downsampling it learns; batchnorm after every layer,
dropout after each block and the dense layer). Convolutions use the course's 'valid' padding (28 -> 26 -> 24 -> 12 -> 10 -> 8 -> 4, half
the work of 'same'), and 'same' padding for inputs under 16 pixels (8x8 digits) that would not
survive four valid convolutions. Imports Keras.
"""
from __future__ import annotations

LADDER = ("linear", "hidden", "cnn", "cnn_bn", "cnn_bn_do", "cnn_strided")
# Keras' default 0.99 keeps 15% of the initial (0, 1) statistics after 190 steps (10 epochs of the
# 1,197 digits): validation, which uses the moving statistics, then scores near chance. 0.9 forgets
# them within 50 steps.
BN_MOMENTUM = 0.9


def build_scratch_model(arch: str, input_shape: tuple[int, ...], n_classes: int, hidden: list[int],
                        dropout: list[float], conv_dropout: float = 0.0, l2: float = 0.0, name: str | None = None):
    import keras
    from keras import layers

    if arch not in LADDER:
        raise ValueError(f"unknown from-scratch arch {arch!r}; expected one of {LADDER}")
    regularizer = keras.regularizers.L2(l2) if l2 else None
    batchnorm, use_dropout = arch in ("cnn_bn", "cnn_bn_do", "cnn_strided"), arch in ("cnn_bn_do", "cnn_strided")
    inputs = keras.Input(shape=input_shape, name="pixels")
    x = inputs
    if arch.startswith("cnn"):
        padding = "valid" if min(input_shape[:2]) >= 16 else "same"
        for block, filters in enumerate((32, 64), start=1):
            for conv in (1, 2):
                x = layers.Conv2D(filters, 3, padding=padding, activation="relu", name=f"conv{block}_{conv}")(x)
                if batchnorm:
                    x = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"bn{block}_{conv}")(x)
            if arch == "cnn_strided":
                x = layers.Conv2D(filters, 5, strides=2, padding="same", activation="relu", name=f"conv{block}_down")(x)
                x = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"bn{block}_down")(x)
            else:
                x = layers.MaxPooling2D(2, name=f"pool{block}")(x)
            if use_dropout and conv_dropout:
                x = layers.Dropout(conv_dropout, name=f"conv_dropout{block}")(x)
    x = layers.Flatten(name="flatten")(x)
    dense_layers = [] if arch == "linear" else hidden
    for i, units in enumerate(dense_layers, start=1):
        x = layers.Dense(units, activation="relu", kernel_regularizer=regularizer, name=f"fc{i}")(x)
        if batchnorm:
            x = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"fc{i}_bn")(x)
        if use_dropout and dropout[i - 1]:
            x = layers.Dropout(dropout[i - 1], name=f"dropout{i}")(x)
    outputs = layers.Dense(n_classes, activation="softmax", kernel_regularizer=regularizer, name="predictions")(x)
    return keras.Model(inputs, outputs, name=name or arch)

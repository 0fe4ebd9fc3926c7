"""The Keras example network and the shipped MNIST digits in Keras's layout (NHWC, numpy).

Plain Keras 3, no dependency on bncal; Keras is imported inside the functions, so the backend
is whatever the caller chose (bncal's scripts and tests use ``KERAS_BACKEND=torch``).

- :func:`mnist_keras_cnn` -- the CNN of ``mnist_keras_stale.keras`` (see README.md).
- :func:`mnist_nhwc` -- ``(x, y)`` numpy arrays of a split of ``mnist5k.npz``, images
  ``(N, 28, 28, 1)`` float32 normalised as :func:`models.zoo.mnist_arrays` does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import zoo

__all__ = ["MNIST_KERAS_STALE", "mnist_keras_cnn", "mnist_nhwc", "mnist_keras_stale"]

MNIST_KERAS_STALE = Path(__file__).resolve().parent / "mnist_keras_stale.keras"


def mnist_nhwc(split: str = "calib") -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` for ``split`` (``calib``/``train``, ``test``, ``all``) in file order (sorted by
    class): ``x`` float32 ``(N, 28, 28, 1)``, ``(pixel/255 - 0.1307) / 0.3081``; ``y`` int64."""
    x, y = zoo.mnist_arrays(split)
    return np.ascontiguousarray(x.numpy().transpose(0, 2, 3, 1)), y.numpy()


def mnist_keras_cnn(momentum: float = 0.99):
    """Functional Keras CNN for 28x28x1 digits, 42,970 parameters, 5 BatchNormalization layers.

    Four blocks ``Conv2D(3x3, same, no bias) -> BatchNormalization -> ReLU`` with 16, 32, 32, 32
    filters, a 2x2 max-pool after the first three (28 -> 14 -> 7 -> 3), then ``Flatten ->
    Dense(64, no bias) -> BatchNormalization -> ReLU -> Dropout(0.5) -> Dense(10)`` (logits).
    Every BN keeps Keras's defaults (epsilon 1e-3) with the given ``momentum`` (Keras's
    default 0.99).
    """
    import keras
    from keras import layers

    inputs = keras.Input((28, 28, 1), name="digits")
    h = inputs
    for block, filters in enumerate((16, 32, 32, 32), start=1):
        h = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv{block}")(h)
        h = layers.BatchNormalization(momentum=momentum, name=f"bn{block}")(h)
        h = layers.ReLU(name=f"relu{block}")(h)
        if block < 4:
            h = layers.MaxPooling2D(name=f"pool{block}")(h)
    h = layers.Flatten(name="flatten")(h)
    h = layers.Dense(64, use_bias=False, name="fc")(h)
    h = layers.BatchNormalization(momentum=momentum, name="bn_fc")(h)
    h = layers.ReLU(name="relu_fc")(h)
    h = layers.Dropout(0.5, name="dropout")(h)
    outputs = layers.Dense(10, name="logits")(h)
    return keras.Model(inputs, outputs, name="mnist_keras_cnn")


def mnist_keras_stale():
    """The shipped ``mnist_keras_stale.keras`` (safe mode: the file holds no Lambda layers)."""
    import keras

    return keras.saving.load_model(MNIST_KERAS_STALE, compile=False)

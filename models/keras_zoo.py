"""The Keras example network and the shipped MNIST digits in Keras's layout (NHWC, numpy).

Plain Keras 3, no dependency on bncal; Keras is imported inside the functions, so the backend
is whatever the caller chose (bncal's scripts and tests use ``KERAS_BACKEND=torch``).

- :func:`mnist_keras_cnn` -- the CNN of ``mnist_keras_stale.keras`` (see README.md).
- :func:`mnist_nhwc` -- ``(x, y)`` numpy arrays of a split of ``mnist5k.npz``, images
  ``(N, 28, 28, 1)`` float32 normalised as :func:`models.mnist_data.mnist_numpy` does (no torch needed).
- :func:`calibration_nhwc`, :func:`heldout_nhwc` -- data functions for ``bncal --data``:
  lists of NHWC numpy batches, shuffled with a fixed seed (the split files are sorted by class).
- :func:`export_onnx` -- the shipped model through Keras's own ``model.export(format="onnx")``:
  the ONNX file a stranger would hand over, every BatchNormalization lowered to arithmetic.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

try:
    from .mnist_data import mnist_numpy
except ImportError:  # loaded as a file (a spec such as models/keras_zoo.py:...): read its neighbour by path
    import importlib.util as _util

    _spec = _util.spec_from_file_location("_bncal_models_mnist_data", Path(__file__).with_name("mnist_data.py"))
    _mnist_data = _util.module_from_spec(_spec)
    _spec.loader.exec_module(_mnist_data)
    mnist_numpy = _mnist_data.mnist_numpy

__all__ = ["MNIST_KERAS_STALE", "mnist_keras_cnn", "mnist_nhwc", "mnist_keras_stale", "calibration_nhwc",
           "heldout_nhwc", "export_onnx"]

MNIST_KERAS_STALE = Path(__file__).resolve().parent / "mnist_keras_stale.keras"


def mnist_nhwc(split: str = "calib") -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` for ``split`` (``calib``/``train``, ``test``, ``all``) in file order (sorted by
    class): ``x`` float32 ``(N, 28, 28, 1)``, ``(pixel/255 - 0.1307) / 0.3081``; ``y`` int64."""
    x, y = mnist_numpy(split)
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1)), y


def _shuffled_batches(split: str, batch_size: int, seed: int) -> list[np.ndarray]:
    x, _ = mnist_nhwc(split)
    x = x[np.random.default_rng(seed).permutation(len(x))]
    return [x[i:i + batch_size] for i in range(0, len(x), batch_size)]


def calibration_nhwc(batch_size: int = 200, seed: int = 0) -> list[np.ndarray]:
    """The 4000 calibration digits as NHWC batches, shuffled with ``seed`` (README: ``--data``)."""
    return _shuffled_batches("calib", batch_size, seed)


def heldout_nhwc(batch_size: int = 100, seed: int = 1) -> list[np.ndarray]:
    """The 1000 held-out digits as NHWC batches, shuffled with ``seed``."""
    return _shuffled_batches("test", batch_size, seed)


def mnist_keras_cnn(momentum: float = 0.99, keras_module=None):
    """Functional Keras CNN for 28x28x1 digits, 42,970 parameters, 5 BatchNormalization layers.

    Four blocks ``Conv2D(3x3, same, no bias) -> BatchNormalization -> ReLU`` with 16, 32, 32, 32
    filters, a 2x2 max-pool after the first three (28 -> 14 -> 7 -> 3), then ``Flatten ->
    Dense(64, no bias) -> BatchNormalization -> ReLU -> Dropout(0.5) -> Dense(10)`` (logits).
    Every BN keeps Keras's defaults (epsilon 1e-3) with the given ``momentum`` (Keras's
    default 0.99). ``keras_module``: another Keras API to build it with (``tf_keras``, Keras 2),
    default Keras 3.
    """
    if keras_module is None:
        import keras as keras_module
    keras, layers = keras_module, keras_module.layers

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


def export_onnx(path, model=None) -> None:
    """Write ``model`` (default: the shipped stale model) to ``path`` with Keras's own
    ``model.export(path, format="onnx")`` (on the torch backend it runs torch.onnx)."""
    model = mnist_keras_stale() if model is None else model
    model(np.zeros((1, 28, 28, 1), np.float32))  # Keras exports only a model that has been called
    model.export(str(path), format="onnx", verbose=False)

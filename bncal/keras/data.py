"""Calibration data in a Keras model's layout.

bncal's data readers (:mod:`bncal.data`) give image folders as ``(N, C, H, W)`` arrays, the
PyTorch and ONNX layout. A Keras model usually takes images channels-last, ``(N, H, W, C)``
(Keras's default ``image_data_format``): :func:`in_model_layout` transposes image batches
for such a model. Which layout a model takes is read from its first input's shape
(:func:`takes_channels_last`); arrays and data functions are given to the model as they are.
"""

from __future__ import annotations

import numpy as np

from .backend import import_keras

__all__ = ["takes_channels_last", "in_model_layout"]


def takes_channels_last(model, channels: int) -> bool:
    """Whether ``model`` takes ``channels``-channel images as ``(N, H, W, C)``.

    From the first model input's shape: rank 4 with ``channels`` last (and not second) is
    channels-last, ``channels`` second (and not last) channels-first. A model without a known
    input shape (subclassed, or ambiguous like ``(N, 3, 8, 3)``) follows
    ``keras.config.image_data_format()``.
    """
    keras = import_keras()
    inputs = getattr(model, "inputs", None) or []
    shape = tuple(getattr(inputs[0], "shape", ())) if inputs else ()
    if len(shape) == 4:
        if shape[-1] == channels and shape[1] != channels:
            return True
        if shape[1] == channels and shape[-1] != channels:
            return False
    return keras.config.image_data_format() == "channels_last"


class _ChannelsLast:
    """Re-iterable view of batches with every 4-D array moved from NCHW to NHWC."""

    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        keras = import_keras()
        for batch in self.batches:
            yield keras.tree.map_structure(_to_nhwc, batch)


def _to_nhwc(x):
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if isinstance(x, np.ndarray) and x.ndim == 4 else x


def in_model_layout(batches, model, *, images: bool, channels: int):
    """``batches`` as ``model`` takes them: image batches (``images``, NCHW from an image
    folder) transposed to NHWC when :func:`takes_channels_last`; anything else unchanged."""
    if images and takes_channels_last(model, channels):
        return _ChannelsLast(batches)
    return batches

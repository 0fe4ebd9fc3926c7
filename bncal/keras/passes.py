"""Passes over calibration data through a Keras model, seeing every BatchNormalization's input.

:class:`BatchNormTap` wraps each BN layer's ``call`` for the duration of a ``with`` block
(instance attribute, put back on exit, also on error). Each call then

1. reduces its input to float64 ``(count, mean, biased variance)`` per channel with
   :func:`bncal.stats.batch_moments`: every axis but the layer's ``axis`` counts as samples
   (NHWC, NCHW, Dense, Conv1D/3D alike), masked positions left out as Keras leaves them out;
2. asks ``statistics(name, call, count, mean, var)`` which statistics to normalise with
   (the batch's own for a train-mode pass, given ones for an eval pass; None keeps the
   layer's current moving statistics), writes them into the moving variables, and
3. runs the layer's own inference computation (``training=False``) on them.

So Dropout and every other layer run in inference mode, no weight changes, and nothing
depends on a backend's graph tracing: the model is called eagerly. The moving statistics
are restored when the block ends; callers write the final ones explicitly.
"""

from __future__ import annotations

import contextlib
import inspect
import math

import numpy as np

from ..calibration import NONFINITE_DATA, data_source
from ..errors import BncalError
from ..stats import ChannelMoments, batch_moments
from .backend import import_keras, inference_context
from .layers import channel_axis, replaced_calls, statistics_put_back

__all__ = ["BatchNormTap", "calibration_data", "default_forward", "run_forward", "prepare_batch", "merge_calls"]

def default_forward(model, inputs):
    """``model(inputs, training=False)``: every layer in inference mode."""
    return model(inputs, training=False)


class BatchNormTap:
    """Wraps the ``call`` of ``layers`` (``[(name, bn)]``) while the ``with`` block runs.

    ``records[name]`` lists ``(count, mean, var)`` per call.
    """

    def __init__(self, layers, statistics=None):
        self.layers = list(layers)
        self.statistics = statistics
        self.records: dict[str, list] = {name: [] for name, _ in self.layers}
        self._stack: contextlib.ExitStack | None = None

    def __enter__(self) -> "BatchNormTap":
        stack = contextlib.ExitStack()
        try:
            stack.enter_context(statistics_put_back([bn for _, bn in self.layers]))
            stack.enter_context(replaced_calls((bn, self._wrap(name, bn, bn.call)) for name, bn in self.layers))
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def __exit__(self, *exc) -> None:
        if self._stack is not None:
            self._stack.close()  # the calls first, then the statistics
            self._stack = None

    def moments(self) -> dict[str, ChannelMoments]:
        """The recorded calls of each layer merged (layers never called are left out)."""
        return merge_calls(self.records)

    def _wrap(self, name, bn, original):
        keras = import_keras()
        signature = inspect.signature(original)
        takes_training = "training" in signature.parameters

        def call(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            inputs = next(iter(bound.arguments.values()))
            mask = bound.arguments.get("mask")
            if takes_training:
                bound.arguments["training"] = False
            x = np.asarray(keras.ops.convert_to_numpy(inputs))
            axis = channel_axis(bn, x.ndim)
            if mask is not None:
                if axis != x.ndim - 1:
                    raise BncalError(f"BatchNormalization {name} gets a mask with axis={bn.axis}; bncal handles "
                                     "masks only for the last axis, as Keras applies them")
                x = x[np.asarray(keras.ops.convert_to_numpy(mask)).astype(bool)]
                axis = x.ndim - 1
            count, mean, var = batch_moments(x, axis)
            calls = self.records[name]
            calls.append((count, mean, var))
            stats = self.statistics(name, len(calls) - 1, count, mean, var) if self.statistics else None
            if stats is not None:
                bn.moving_mean.assign(keras.ops.cast(stats[0], bn.moving_mean.dtype))
                bn.moving_variance.assign(keras.ops.cast(stats[1], bn.moving_variance.dtype))
            return original(*bound.args, **bound.kwargs)

        return call


def merge_calls(records: dict[str, list]) -> dict[str, ChannelMoments]:
    """Every recorded ``(count, mean, var)`` call of each layer merged (layers never called left out)."""
    out = {}
    for name, calls in records.items():
        if calls:
            moments = ChannelMoments.empty(calls[0][1].shape[0])
            for count, mean, var in calls:
                moments.add_batch(count, mean, var)
            out[name] = moments
    return out


class _ArrayBatches:
    """Rows of an array (or of a dict of arrays) in batches of ``batch_size``; re-iterable."""

    def __init__(self, data, batch_size: int):
        keras = import_keras()
        self.data, self.batch_size = data, int(batch_size)
        self.rows = len(keras.tree.flatten(data)[0])

    def __iter__(self):
        keras = import_keras()
        for start in range(0, self.rows, self.batch_size):
            yield keras.tree.map_structure(lambda a: a[start:start + self.batch_size], self.data)


def calibration_data(data, batch_size: int | None, *, reiterable: bool, chunk_bytes: int | None = None):
    """``data`` as a zero-argument callable returning one fresh pass of batches
    (:func:`bncal.calibration.data_source`, the policy of every path): an array, or a dict of
    arrays (one per named model input), is cut into batches of ``batch_size`` rows; an iterable
    is taken as batches already; a zero-argument function returning one is called per pass.

    ``chunk_bytes``: for passes whose statistics do not depend on the batching (eval mode), cut
    arrays into as few equal batches of at most this many bytes of input as cover them, where
    those hold more than ``batch_size`` rows: fewer, larger calls (on TensorFlow each depth
    step of the sweep is a dispatch per batch).

    Raises BncalError for a bad batch size, or a one-shot iterator when ``reiterable``.
    """
    if batch_size is not None and (int(batch_size) != batch_size or batch_size < 1):
        raise BncalError(f"batch_size must be a positive integer, not {batch_size!r}")
    if isinstance(data, np.ndarray) or isinstance(data, dict) and all(isinstance(v, np.ndarray) for v in data.values()):
        if batch_size is None:
            raise BncalError("data given as arrays needs a batch_size")
        data = _ArrayBatches(data, _chunk_rows(data, batch_size, chunk_bytes))
    return data_source(data, reread=reiterable)


def _chunk_rows(data, batch_size: int, chunk_bytes: int | None) -> int:
    leaves = import_keras().tree.flatten(data)
    rows = len(leaves[0])
    row_bytes = sum(leaf[:1].nbytes for leaf in leaves)
    if chunk_bytes is None or rows == 0 or row_bytes == 0:
        return int(batch_size)
    fitting = max(1, chunk_bytes // row_bytes)
    chunks = -(-rows // fitting)
    return max(int(batch_size), -(-rows // chunks))


def prepare_batch(batch, remaining):
    """``((inputs, first), size)`` for one batch: its model inputs (Keras convention: ``(x,)``,
    ``(x, y)``, ``(x, y, sample_weight)`` tuples give ``x``), cut to ``remaining`` rows, checked
    finite; ``first`` the first floating input as a numpy array (else the first input), what
    the driver fingerprints and tests the composition on (:mod:`bncal.driver`)."""
    keras = import_keras()
    if isinstance(batch, (tuple, list)):
        batch = keras.utils.unpack_x_y_sample_weight(tuple(batch))[0]
    leaves = keras.tree.flatten(batch)
    if not leaves:
        raise BncalError("a calibration batch holds no inputs")
    if remaining is not None and len(leaves[0]) > remaining:
        batch = keras.tree.map_structure(lambda a: a[:remaining], batch)
        leaves = keras.tree.flatten(batch)
    first = None
    for leaf in leaves:
        array = leaf if isinstance(leaf, np.ndarray) else np.asarray(keras.ops.convert_to_numpy(leaf))
        if np.issubdtype(array.dtype, np.floating) or array.dtype.kind == "V":
            if not math.isfinite(float(np.sum(array))) and not np.isfinite(array.astype(np.float64)).all():
                raise BncalError(NONFINITE_DATA)
            first = array if first is None else first
    if first is None:  # integer inputs only (token ids)
        first = np.asarray(keras.ops.convert_to_numpy(leaves[0]))
    return (batch, first), len(leaves[0])


def run_forward(forward_fn, model, inputs, index):
    """``forward_fn(model, inputs)`` without gradients; the model's errors as one-line BncalErrors
    (a batch missing its batch axis, as an unbatched ``tf.data`` dataset gives, is named as such)."""
    shapes = [tuple(getattr(leaf, "shape", ())) for leaf in import_keras().tree.flatten(inputs)]
    _require_batch_axis(model, shapes, index)
    try:
        with inference_context():
            return forward_fn(model, inputs)
    except BncalError as exc:  # raised by a BN tap, and rewrapped by Keras on its way out
        raise BncalError(error_text(exc)) from None
    except Exception as exc:  # noqa: BLE001 -- TensorFlow's OpErrors are none of Python's own kinds
        if not isinstance(exc, (RuntimeError, ValueError, TypeError, IndexError, KeyError)) and \
                not type(exc).__module__.startswith(("tensorflow", "jax", "jaxlib")):
            raise
        raise BncalError(f"the model failed on calibration batch {index} (input shape "
                         f"{', '.join(map(str, shapes))}): {error_text(exc)}") from exc


def _require_batch_axis(model, shapes, index) -> None:
    """Refuse a batch whose inputs have one axis fewer than the model's inputs (one sample, not a batch)."""
    expected = [tuple(t.shape) for t in getattr(model, "inputs", None) or []]
    if len(expected) != len(shapes):
        return
    for shape, model_shape in zip(shapes, expected):
        if len(shape) == len(model_shape) - 1 and tuple(shape) == tuple(
                d if d is not None else s for d, s in zip(model_shape[1:], shape)):
            raise BncalError(f"calibration batch {index} has shape {shape} where the model takes "
                             f"{('batch',) + tuple(model_shape[1:])}: it is one sample, not a batch; batch the data "
                             "(a tf.data dataset: dataset.batch(64))")


def error_text(exc: BaseException) -> str:
    """The first line of the error a layer raised: Keras re-raises it as ``Exception
    encountered when calling <layer>`` with the original message set in bold inside."""
    text = str(exc)
    if getattr(exc, "_keras_call_info_injected", False) and "\x1b[1m" in text:
        text = text.split("\x1b[1m", 1)[1].split("\x1b[0m", 1)[0]
    text = text.strip()
    return text.splitlines()[0] if text else type(exc).__name__

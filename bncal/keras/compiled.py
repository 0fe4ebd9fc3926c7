"""Recalibration passes of a Keras model as one compiled forward per batch.

Where :class:`bncal.keras.passes.BatchNormTap` runs the model eagerly and copies every BN's
input to numpy, this module traces the forward once (``tf.function`` on the TensorFlow backend;
the other backends call the same function eagerly) with every BatchNormalization's ``call``
replaced, for the trace only, by one that

1. reduces its input to ``(count, mean, biased variance)`` per channel in float64 inside the
   graph (every axis but the layer's ``axis`` counts as samples; two passes, the variance taken
   around the float64 mean), so the batches merge in :class:`bncal.stats.ChannelMoments` as
   exactly as the eager path's numpy reduction;
2. normalises with those batch statistics (``"batch"``: a train-mode pass, PreciseBN) or with the
   layer's moving variables (``"moving"``: an eval pass, the caller writing the statistics to
   test into them first), through Keras's own ``ops.batch_normalization``, and
3. hands the moments out as extra outputs of the traced function.

Every other layer runs in inference mode (``training=False``), no variable is written, and the
trace is kept per model, BN set and normalisation (a second call, and the next recalibration of
the same model, reuse it; a batch of another shape, like a short last one, retraces once).

:func:`compiled_refusal` says when this route does not apply, and the caller then keeps the
eager tap: a custom ``forward_fn``, batch renormalisation layers (their training forward is
:mod:`bncal.renorm`'s, modelled in numpy), Keras 2 (``tf_keras``) layers or BN subclasses with
their own ``call``, and (found while tracing, :class:`CompiledRefused`) a BN given a mask.
"""

from __future__ import annotations

import weakref

import numpy as np

from .backend import import_keras, inference_context
from .layers import channel_axis, replaced_calls

__all__ = ["CompiledRefused", "compiled_refusal", "CompiledForward", "compiled_forward", "channel_moments"]

NORMALISATIONS = ("batch", "moving")


class CompiledRefused(Exception):
    """Raised while tracing when the compiled route cannot model a BN call; ``str()`` says why."""


def compiled_refusal(layers, *, custom_forward: bool, renorm: bool) -> str | None:
    """Why the compiled passes do not apply to ``layers`` (``[(name, bn)]``), or None when they do."""
    keras = import_keras()
    if custom_forward:
        return "a custom forward_fn"
    if renorm:
        return "batch renormalisation layers, whose training forward is modelled in numpy"
    own_call = keras.layers.BatchNormalization.call
    for name, bn in layers:
        if not isinstance(bn, keras.layers.BatchNormalization):
            return f"{name} is not a Keras 3 BatchNormalization (a tf_keras layer)"
        if getattr(type(bn), "call", None) is not own_call:
            return f"{name} ({type(bn).__name__}) has its own call"
    return None


class CompiledForward:
    """``forward(inputs) -> {name: [(count, mean, var), ...]}``: one batch through ``model`` with
    the BNs of ``layers`` normalising as ``normalisation`` says, the moments of each call of each
    BN's input as float64 numpy arrays (a layer never called maps to an empty list).

    Raises :class:`CompiledRefused` (while tracing) where a BN call cannot be modelled.
    """

    def __init__(self, model, layers, normalisation: str):
        if normalisation not in NORMALISATIONS:
            raise ValueError(f"normalisation must be one of {NORMALISATIONS}, not {normalisation!r}")
        keras = import_keras()
        self.model_ref = weakref.ref(model)
        self.layers, self.normalisation = list(layers), normalisation
        self.traces = 0  # how many times the forward was traced (TensorFlow) or 0 (eager backends)
        self._function = self._traced
        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            self._function = tf.function(self._traced, reduce_retracing=True)

    def __call__(self, inputs) -> dict[str, list]:
        keras = import_keras()
        with inference_context():
            found = self._function(inputs)
        return {name: [(int(round(float(keras.ops.convert_to_numpy(count)))),
                        np.asarray(keras.ops.convert_to_numpy(mean), np.float64),
                        np.asarray(keras.ops.convert_to_numpy(var), np.float64)) for count, mean, var in calls]
                for name, calls in found.items()}

    def _traced(self, inputs):
        keras = import_keras()
        if keras.backend.backend() == "tensorflow":
            self.traces += 1
        collected: dict[str, list] = {name: [] for name, _ in self.layers}
        with replaced_calls((bn, self._call(name, bn, collected[name])) for name, bn in self.layers):
            self.model_ref()(inputs, training=False)
        return collected

    def _call(self, name, bn, calls):
        keras = import_keras()
        ops, standardize_dtype = keras.ops, keras.backend.standardize_dtype
        moving = self.normalisation == "moving"

        def call(inputs, training=None, mask=None):
            if mask is not None:
                raise CompiledRefused(f"{name} is given a mask")
            x = ops.cast(inputs, "float32") if standardize_dtype(inputs.dtype) in ("float16", "bfloat16") else inputs
            count, mean, var = channel_moments(bn, x)
            calls.append((count, mean, var))
            if moving:
                use_mean, use_var = bn.moving_mean, bn.moving_variance
            else:
                use_mean, use_var = mean, var
            outputs = ops.batch_normalization(
                x, ops.cast(use_mean, x.dtype), ops.cast(use_var, x.dtype), axis=channel_axis(bn, len(x.shape)),
                offset=ops.cast(bn.beta, x.dtype) if bn.center else None,
                scale=ops.cast(bn.gamma, x.dtype) if bn.scale else None, epsilon=bn.epsilon)
            return ops.cast(outputs, bn.compute_dtype)

        return call


PARTIAL_SUM_LIMIT = 128  # float32 partial sums over at most this many values (error ~ sqrt(n) * 6e-8)


def channel_moments(bn, x):
    """``(count, mean, biased variance)`` per channel of BN ``bn``'s input ``x`` as backend
    tensors, float64, ``count`` the values per channel as a float64 scalar. Two passes (the
    variance taken around the mean rounded to ``x``'s dtype, the rounding then taken out) of sums
    over every axis but the channel's: the values along
    one short spatial axis (at most :data:`PARTIAL_SUM_LIMIT`) are summed in ``x``'s own dtype,
    those partial sums in float64, so the float64 copy is that axis's length times smaller
    than ``x`` (without such an axis, as for a Dense BN, everything is summed in float64)."""
    ops = import_keras().ops
    ndim = len(x.shape)
    axis = channel_axis(bn, ndim)
    count = ops.cast(ops.size(x), "float64") / int(x.shape[axis])
    short = [a for a in range(1, ndim) if a != axis and x.shape[a] is not None and x.shape[a] <= PARTIAL_SUM_LIMIT]
    inner = min(short, key=lambda a: -x.shape[a]) if short else None  # the longest short axis

    def total(t):
        """Float64 per-channel sums of ``t`` (shaped like ``x``)."""
        if inner is None:
            wide, left = ops.cast(t, "float64"), [a for a in range(ndim) if a != axis]
        else:
            wide = ops.cast(ops.sum(t, axis=inner), "float64")
            kept_axis = axis - (inner < axis)
            left = [a for a in range(ndim - 1) if a != kept_axis]
        return ops.sum(wide, axis=left)

    shape = [1] * ndim
    shape[axis] = -1
    mean = total(x) / count
    rounded = ops.cast(mean, x.dtype)  # the centre, in x's dtype; off the mean by what rounding left
    centred = x - ops.reshape(rounded, shape)
    var = ops.maximum(total(ops.square(centred)) / count - ops.square(mean - ops.cast(rounded, "float64")), 0.0)
    return count, mean, var


_FORWARDS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def compiled_forward(model, layers, normalisation: str) -> CompiledForward:
    """The :class:`CompiledForward` of ``model`` for these layers and normalisation, kept with the
    model (weakly) so the next pass or recalibration reuses its trace."""
    key = (normalisation, tuple((name, id(bn)) for name, bn in layers))
    kept = _FORWARDS.setdefault(model, {})
    if key not in kept:
        kept[key] = CompiledForward(model, layers, normalisation)
    return kept[key]

"""Recalibration passes of a Keras model as one compiled forward per batch.

Where :class:`bncal.keras.passes.BatchNormTap` runs the model eagerly and copies every BN's
input to numpy, this module traces the forward once (``tf.function`` on the TensorFlow backend;
the other backends call the same function eagerly) with every BatchNormalization's ``call``
replaced, for the trace only, by one that

1. reduces its input to ``(count, mean, biased variance)`` per channel in float64 inside the
   graph (every axis but the layer's ``axis`` counts as samples; two passes, float32 partial sums
   of at most 128 values, float64 beyond; :func:`channel_moments`), so the batches merge in
   :class:`bncal.stats.ChannelMoments` as exactly as the eager path's numpy reduction;
2. normalises with those batch statistics (``"batch"``: a train-mode pass, PreciseBN) or with the
   layer's moving variables (``"moving"``: an eval pass, the caller writing the statistics to
   test into them first), as Keras's inference forward does (:func:`normalise`), and
3. hands the moments out, packed into one float64 output of the traced function.

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
from typing import NamedTuple

import numpy as np

from .backend import import_keras, inference_context
from .layers import channel_axis, replaced_calls

__all__ = ["CompiledRefused", "compiled_refusal", "CompiledForward", "compiled_forward", "channel_moments",
           "Moments", "pool_window", "normalise", "pack_moments", "unpack_moments"]

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
        self.layout: list[tuple] = []  # the packing's layout, set when traced (pack_moments)
        self._function = self._traced
        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            self._function = tf.function(self._traced, reduce_retracing=True)

    def __call__(self, inputs) -> dict[str, list]:
        keras = import_keras()
        with inference_context():
            packed = self._function(inputs)
        return unpack_moments(keras.ops.convert_to_numpy(packed), self.layout)

    def _traced(self, inputs):
        keras = import_keras()
        if keras.backend.backend() == "tensorflow":
            self.traces += 1
        collected: list[tuple[str, Moments]] = []
        with replaced_calls((bn, self._call(name, bn, collected)) for name, bn in self.layers):
            self.model_ref()(inputs, training=False)
        packed, self.layout = pack_moments(collected)
        return packed

    def _call(self, name, bn, collected):
        moving = self.normalisation == "moving"

        def call(inputs, training=None, mask=None):
            if mask is not None:
                raise CompiledRefused(f"{name} is given a mask")
            moments = channel_moments(bn, inputs)
            collected.append((name, moments))
            if moving:
                return normalise(bn, inputs, bn.moving_mean, bn.moving_variance)
            # The batch statistics as float32 holds them (the centre is the mean rounded to it).
            return normalise(bn, inputs, moments.centre, moments.spread)

        return call


PARTIAL_SUM_LIMIT = 128  # float32 partial sums over at most this many values (error ~ sqrt(n) * 6e-8)


class Moments(NamedTuple):
    """A BN input's moments per channel as backend tensors (see :func:`channel_moments`)."""

    size: object  # values in the input (an integer scalar); per channel: size / channels
    mean: object  # float64
    spread: object  # float64: the mean square deviation from ``centre``
    centre: object  # ``mean`` rounded to the dtype the input is reduced in (float32 or float64)


def channel_moments(bn, x) -> Moments:
    """The moments of BN ``bn``'s input ``x`` per channel (every axis but the layer's ``axis``
    counts as samples). Two passes of sums, each in two stages: blocks of at most
    :data:`PARTIAL_SUM_LIMIT` values summed in ``x``'s own dtype, the block sums in float64 (the
    float64 copy is the block size times smaller than ``x``). The variance is
    ``spread - (mean - centre) ** 2``, which :func:`unpack_moments` takes on the host.

    The blocks are average-pooling windows over the spatial axes on TensorFlow with channels last
    (one pooling kernel per pass, :func:`pool_window`), else one short spatial axis (without
    one, as for a Dense BN, everything is summed in float64). Few graph operations per BN on
    purpose: on networks of many small BN inputs (DenseNet121) each operation's dispatch costs
    about as much as its arithmetic. Float16 and bfloat16 inputs are taken in float32, as Keras
    normalises them."""
    ops = import_keras().ops
    x = _widened(x)
    ndim = len(x.shape)
    axis = channel_axis(bn, ndim)
    size = ops.size(x)
    window = pool_window(list(x.shape[1:-1])) if _poolable(x, axis) else None
    if window is not None:
        import tensorflow as tf

        samples = list(range(ndim - 1))
        pooled_mean = lambda t: ops.mean(ops.cast(tf.nn.avg_pool(t, window, window, "VALID"), "float64"), axis=samples)
        mean = pooled_mean(x)
        centre = ops.cast(mean, x.dtype)
        return Moments(size, mean, pooled_mean(tf.math.squared_difference(x, centre)), centre)
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
    count = ops.cast(size, "float64") / int(x.shape[axis])
    mean = total(x) / count
    centre = ops.cast(mean, x.dtype)
    return Moments(size, mean, total(ops.square(x - ops.reshape(centre, shape))) / count, centre)


def pool_window(spatial) -> list[int] | None:
    """The average-pooling window whose block sums :func:`channel_moments` takes on TensorFlow,
    for spatial axes of these lengths: per axis a divisor of its length, innermost axis first, at
    most :data:`PARTIAL_SUM_LIMIT` values in all (an exact tiling, so every block holds as many
    values and the block means average to the mean); None for a window of 1."""
    window, room = [1] * len(spatial), PARTIAL_SUM_LIMIT
    for index in reversed(range(len(spatial))):
        window[index] = max(d for d in range(1, min(spatial[index], room) + 1) if spatial[index] % d == 0)
        room //= window[index]
    return window if int(np.prod(window)) > 1 else None


def _poolable(x, axis: int) -> bool:
    """Whether TensorFlow's pooling kernels can take ``x``'s block sums: channels last, rank 3 to
    5 (1 to 3 spatial axes), float32 or float64, every spatial length known when tracing."""
    keras = import_keras()
    ndim = len(x.shape)
    return (keras.backend.backend() == "tensorflow" and 3 <= ndim <= 5 and axis == ndim - 1
            and keras.backend.standardize_dtype(x.dtype) in ("float32", "float64")
            and all(length is not None for length in x.shape[1:-1]))


def pack_moments(moments: "list[tuple[str, Moments]]"):
    """``(packed, layout)``: the ``(name, Moments)`` of a forward's BN calls as one float64 tensor
    (the sizes, then every mean, then every spread; one transfer per batch instead of three per
    BN call, in few graph operations) and what :func:`unpack_moments` needs to read it back."""
    keras = import_keras()
    ops = keras.ops
    if not moments:
        return ops.zeros((0,), "float64"), []
    sizes = ops.cast(ops.stack([ops.cast(m.size, "int64") for _, m in moments]), "float64")
    packed = ops.concatenate([sizes] + [m.mean for _, m in moments] + [m.spread for _, m in moments])
    layout = [(name, int(m.mean.shape[0]), keras.backend.standardize_dtype(m.centre.dtype)) for name, m in moments]
    return packed, layout


def unpack_moments(packed, layout) -> dict[str, list]:
    """:func:`pack_moments`'s array back as ``{name: [(count, mean, biased variance)]}`` in
    float64 numpy (names repeat in ``layout`` for a BN called twice); the variance is the spread
    less the square of what rounding the mean to the centre's dtype left."""
    packed = np.asarray(packed, np.float64)
    calls = len(layout)
    channels = [width for _, width, _ in layout]
    starts = np.cumsum([0] + channels)
    means = packed[calls:calls + starts[-1]]
    centres = np.empty_like(means)
    for dtype in {dtype for _, _, dtype in layout}:  # one vector operation per dtype (usually one)
        rows = np.concatenate([np.arange(starts[i], starts[i + 1]) for i, (_, _, d) in enumerate(layout) if d == dtype])
        centres[rows] = means[rows].astype(dtype)
    variances = np.maximum(packed[calls + starts[-1]:] - np.square(means - centres), 0.0)
    found: dict[str, list] = {}
    for index, (name, width, _) in enumerate(layout):
        start, stop = starts[index], starts[index + 1]
        found.setdefault(name, []).append((int(round(packed[index])) // width, means[start:stop],
                                           variances[start:stop]))
    return found


def normalise(bn, x, mean, variance):
    """BN ``bn`` applied to ``x`` with the given statistics, as Keras's inference forward does
    (float16 and bfloat16 inputs normalised in float32; the output in the layer's compute dtype).
    On TensorFlow with channels last, one ``FusedBatchNormV3`` kernel in inference mode (a single
    pass over ``x``; ``ops.batch_normalization`` takes two there)."""
    keras = import_keras()
    return keras.ops.cast(_normalised(keras, bn, _widened(x), mean, variance), bn.compute_dtype)


def _widened(x):
    """``x`` in float32 where it is float16 or bfloat16 (as Keras's BatchNormalization takes it)."""
    keras = import_keras()
    if keras.backend.standardize_dtype(x.dtype) in ("float16", "bfloat16"):
        return keras.ops.cast(x, "float32")
    return x


def _normalised(keras, bn, x, mean, variance):
    ops = keras.ops
    ndim = len(x.shape)
    cast = lambda v: ops.cast(v, x.dtype)
    scale = cast(bn.gamma) if bn.scale else None
    offset = cast(bn.beta) if bn.center else None
    axis = channel_axis(bn, ndim)
    if (keras.backend.backend() != "tensorflow" or axis != ndim - 1
            or keras.backend.standardize_dtype(x.dtype) != "float32"):
        return ops.batch_normalization(x, cast(mean), cast(variance), axis=axis, offset=offset, scale=scale,
                                       epsilon=bn.epsilon)
    import tensorflow as tf

    channels = int(x.shape[-1])
    flat = x if ndim == 4 else tf.reshape(x, [-1, 1, 1, channels])
    y = tf.raw_ops.FusedBatchNormV3(
        x=flat, scale=tf.ones([channels]) if scale is None else scale,
        offset=tf.zeros([channels]) if offset is None else offset, mean=cast(mean), variance=cast(variance),
        epsilon=float(bn.epsilon), is_training=False)[0]
    return y if ndim == 4 else tf.reshape(y, tf.shape(x))


_FORWARDS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def compiled_forward(model, layers, normalisation: str) -> CompiledForward:
    """The :class:`CompiledForward` of ``model`` for these layers and normalisation, kept with the
    model (weakly) so the next pass or recalibration reuses its trace."""
    key = (normalisation, tuple((name, id(bn)) for name, bn in layers))
    kept = _FORWARDS.setdefault(model, {})
    if key not in kept:
        kept[key] = CompiledForward(model, layers, normalisation)
    return kept[key]

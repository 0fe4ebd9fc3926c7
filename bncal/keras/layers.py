"""The BatchNormalization layers of a Keras model, named as every bncal report names them.

A layer is named by its ``name`` (unique within a functional model; Keras gives automatic
names like ``batch_normalization_3``), prefixed with the names of the layers and models that
contain it (``backbone/bn_1``). A layer reached twice (shared) is listed once; two layers with
one name get ``#2``, ``#3``, ... (:func:`bncal.names.fresh_name`).
"""

from __future__ import annotations

import contextlib
import weakref

import numpy as np

from ..errors import BncalError
from ..names import fresh_name
from ..report import LayerStats
from .backend import import_keras, keras_classes

__all__ = ["sublayers", "named_layers", "batchnorm_layers", "is_batchnorm", "channel_axis", "moving_statistics",
           "statistics_variables", "require_model", "renorm_reference", "trainable_batchnorms", "replaced_calls",
           "statistics_put_back", "variable_values", "assign_values", "every_moving_statistics", "FROZEN_REASON"]

FROZEN_REASON = ("trainable=False: Keras ran it in inference mode during training, so the network was trained "
                 "against its moving statistics; left as they were")


def sublayers(layer) -> list:
    """The layers directly inside ``layer``, in the order Keras tracks them."""
    flatten = getattr(layer, "_flatten_layers", None)  # every Keras 3 layer has it
    if flatten is not None:
        return list(flatten(include_self=False, recursive=False))
    return list(getattr(layer, "layers", []))


def named_layers(model) -> list[tuple[str, object]]:
    """Every layer inside ``model`` (depth first, each object once) with its report name."""
    found, seen, taken = [], set(), set()

    def walk(layer, prefix):
        for sub in sublayers(layer):
            if id(sub) in seen:
                continue
            seen.add(id(sub))
            name = fresh_name(prefix + sub.name, taken, separator="#")
            found.append((name, sub))
            walk(sub, name + "/")

    walk(model, "")
    return found


def is_batchnorm(layer) -> bool:
    """A BatchNormalization of Keras 3 or of Keras 2 (``tf_keras``), subclasses included."""
    return isinstance(layer, keras_classes("layers.BatchNormalization"))


def channel_axis(bn, ndim: int) -> int:
    """The axis ``bn`` normalises per channel, in ``[0, ndim)`` (Keras 2 keeps ``axis`` as a list)."""
    axis = bn.axis
    if isinstance(axis, (list, tuple)):
        if len(axis) != 1:
            raise BncalError(f"BatchNormalization {bn.name} normalises over axes {list(axis)}; bncal handles one "
                             "channel axis")
        axis = axis[0]
    return int(axis) % ndim


def batchnorm_layers(model) -> list[tuple[str, object]]:
    """Every ``keras.layers.BatchNormalization`` (subclasses included) in ``model``, named."""
    return [(name, layer) for name, layer in named_layers(model) if is_batchnorm(layer)]


def trainable_batchnorms(model, what: str):
    """``(modules, BNLayers, skipped)`` for the BN layers a run handles: every trainable one
    (``trainable=False`` ones are skipped, :data:`FROZEN_REASON`); refuses a model with none
    (``what``: "recalibrate" or "check")."""
    from ..calibration import require_layers
    from ..driver import BNLayer
    from ..report import SkippedLayer

    modules, skipped = [], []
    for name, bn in batchnorm_layers(model):
        (modules if bn.trainable else skipped).append((name, bn))
    skipped = [SkippedLayer(name, FROZEN_REASON) for name, _ in skipped]
    require_layers(modules, skipped, what)
    moving = every_moving_statistics([bn for _, bn in modules])
    layers = [BNLayer(name, float(bn.epsilon), stats, renorm_reference(bn))
              for (name, bn), stats in zip(modules, moving)]
    return modules, layers, skipped


_MISSING = object()


@contextlib.contextmanager
def replaced_calls(replacements):
    """Within the block each layer's ``call`` is the function given with it (``replacements``:
    ``(layer, call)`` pairs, an iterable read one pair at a time, so a replacement may wrap the
    layer's ``call`` as it was); put back afterwards, also on error."""
    restore = []
    try:
        for layer, call in replacements:
            restore.append((layer, layer.__dict__.get("call", _MISSING)))
            layer.call = call
        yield
    finally:
        for layer, call in reversed(restore):
            if call is _MISSING:
                del layer.call
            else:
                layer.call = call


@contextlib.contextmanager
def statistics_put_back(layers):
    """Within the block the statistics variables of the BN ``layers`` may be written; on exit
    (also on error) they hold their values from before again."""
    variables = [variable for bn in layers for variable in statistics_variables(bn)]
    saved = variable_values(variables)
    try:
        yield
    finally:
        assign_values(variables, saved)


def variable_values(variables) -> list[np.ndarray]:
    """The values of Keras (or tf_keras) ``variables`` as numpy arrays, copies. On TensorFlow a
    long list is read by one traced call (a model's BN statistics are a hundred or more small
    variables, and each eager read is a dispatch: about 4 ms against 0.5 ms for 104 of them)."""
    variables = list(variables)
    keras = import_keras()
    io = _bulk_io(variables)
    if io is None:
        return [np.array(keras.ops.convert_to_numpy(variable)) for variable in variables]
    flat = io.read().numpy()
    values, start = [], 0
    for variable in variables:
        size = int(np.prod(variable.shape))
        dtype = np.dtype(keras.backend.standardize_dtype(variable.dtype))
        values.append(flat[start:start + size].astype(dtype).reshape(tuple(variable.shape)))
        start += size
    return values


def assign_values(variables, values) -> None:
    """Assign each of ``values`` (arrays, shaped like the variables or flat) to its variable of
    ``variables``, cast to the variable's dtype (a long list on TensorFlow by one traced call, see
    :func:`variable_values`)."""
    variables = list(variables)
    keras = import_keras()
    dtype = lambda variable: np.dtype(keras.backend.standardize_dtype(variable.dtype))
    values = [np.asarray(value, dtype(variable)).reshape(tuple(variable.shape))
              for variable, value in zip(variables, values, strict=True)]
    io = _bulk_io(variables)
    if io is None:
        for variable, value in zip(variables, values):
            variable.assign(value)
        return
    io.assign(np.concatenate([value.astype(np.float64).reshape(-1) for value in values]))


BULK_IO_MIN_VARIABLES = 16  # below this, eager reads and assigns cost less than tracing a function


class _BulkIO:
    """A read and an assign of one list of ``tf.Variable``s, each one ``tf.function`` (the values
    as one float64 vector, which holds every float32, float16 and bfloat16 value exactly). The
    functions hold the variables weakly (TensorFlow's own captures do too): a dead model's
    variables are freed, and :meth:`serves` then says no."""

    def __init__(self, variables):
        import tensorflow as tf

        self.refs = [weakref.ref(variable) for variable in variables]
        sizes = [int(np.prod(variable.shape)) for variable in variables]

        def read():
            return tf.concat([tf.reshape(tf.cast(ref().read_value(), tf.float64), [-1]) for ref in self.refs], 0)

        def assign(flat):
            for ref, piece in zip(self.refs, tf.split(flat, sizes)):
                variable = ref()
                variable.assign(tf.reshape(tf.cast(piece, variable.dtype), variable.shape))

        self.read = tf.function(read, autograph=False)
        self.assign = tf.function(assign, autograph=False)

    def serves(self, variables) -> bool:
        return len(variables) == len(self.refs) and all(ref() is v for ref, v in zip(self.refs, variables))


_BULK: dict[tuple, _BulkIO] = {}


def _bulk_io(variables) -> "_BulkIO | None":
    """The :class:`_BulkIO` of ``variables`` (kept for the next call on the same list), or None
    where eager reads and assigns serve: another backend, a short list."""
    if len(variables) < BULK_IO_MIN_VARIABLES or import_keras().backend.backend() != "tensorflow":
        return None
    from tensorflow.python.ops.resource_variable_ops import BaseResourceVariable

    held = [getattr(variable, "value", None) if not isinstance(variable, BaseResourceVariable) else variable
            for variable in variables]  # a Keras 3 variable holds one; a tf_keras variable is one
    if not all(isinstance(variable, BaseResourceVariable) for variable in held):
        return None  # distributed or auto-cast variables: assigned one by one, as Keras does
    key = tuple(id(variable) for variable in held)
    io = _BULK.get(key)
    if io is None or not io.serves(held):
        for stale in [k for k, kept in _BULK.items() if kept.refs[0]() is None]:
            del _BULK[stale]
        io = _BULK[key] = _BulkIO(held)
    return io


def statistics_variables(bn) -> list:
    """The variables bncal writes: moving mean and variance, and a renorm layer's moving stddev
    (from which Keras derives the moving variance at each renorm training step)."""
    variables = [bn.moving_mean, bn.moving_variance]
    if getattr(bn, "renorm", False) and getattr(bn, "moving_stddev", None) is not None:
        variables.append(bn.moving_stddev)
    return variables


def renorm_reference(bn):
    """A ``renorm=True`` layer's :class:`bncal.renorm.RenormReference` (``renorm_mean``,
    ``renorm_stddev`` floored at ``sqrt(epsilon)`` as Keras's training forward floors it, the
    ``renorm_clipping`` bounds); None for any other layer."""
    if not getattr(bn, "renorm", False) or getattr(bn, "renorm_mean", None) is None:
        return None
    from ..renorm import RenormReference

    keras = import_keras()
    value = lambda v: np.asarray(keras.ops.convert_to_numpy(v), np.float64).reshape(-1)
    eps = float(bn.epsilon)
    clipping = bn.renorm_clipping or {}
    bound = lambda key, default: default if clipping.get(key) is None else float(clipping[key])
    return RenormReference(mean=value(bn.renorm_mean), std=np.maximum(value(bn.renorm_stddev), np.sqrt(eps)),
                           eps=eps, rmin=bound("rmin", 0.0), rmax=bound("rmax", np.inf), dmax=bound("dmax", np.inf))


def moving_statistics(bn) -> LayerStats:
    """A built layer's moving mean and variance in float64."""
    return every_moving_statistics([bn])[0]


def every_moving_statistics(layers) -> list[LayerStats]:
    """:func:`moving_statistics` of each of the built BN ``layers``, read in one go."""
    values = variable_values([variable for bn in layers for variable in (bn.moving_mean, bn.moving_variance)])
    as_float64 = lambda value: np.asarray(value, np.float64).reshape(-1)
    return [LayerStats(as_float64(mean), as_float64(variance)) for mean, variance in zip(values[::2], values[1::2])]


def require_model(model) -> None:
    """Refuse what is not a built Keras layer or model, with the fix."""
    if not isinstance(model, keras_classes("layers.Layer")):
        raise BncalError(f"expected a keras.Model, got {type(model).__name__}; load a .keras file with "
                         "bncal.keras.load_model")
    unbuilt = [name for name, bn in batchnorm_layers(model) if getattr(bn, "moving_mean", None) is None]
    if unbuilt:
        raise BncalError(f"the model is not built ({unbuilt[0]} has no statistics yet); call it once on a "
                         "batch, or model.build(input_shape), first")

"""The BatchNormalization layers of a Keras model, named as every bncal report names them.

A layer is named by its ``name`` (unique within a functional model; Keras gives automatic
names like ``batch_normalization_3``), prefixed with the names of the layers and models that
contain it (``backbone/bn_1``). A layer reached twice (shared) is listed once; two layers with
one name get ``#2``, ``#3``, ... (:func:`bncal.names.fresh_name`).
"""

from __future__ import annotations

import contextlib

import numpy as np

from ..errors import BncalError
from ..names import fresh_name
from ..report import LayerStats
from .backend import import_keras, keras_classes

__all__ = ["sublayers", "named_layers", "batchnorm_layers", "is_batchnorm", "channel_axis", "moving_statistics",
           "statistics_variables", "require_model", "renorm_reference", "trainable_batchnorms", "replaced_calls",
           "statistics_put_back", "FROZEN_REASON"]

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
    layers = [BNLayer(name, float(bn.epsilon), moving_statistics(bn), renorm_reference(bn)) for name, bn in modules]
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
    keras = import_keras()
    saved = [(variable, keras.ops.convert_to_numpy(variable).copy())
             for bn in layers for variable in statistics_variables(bn)]
    try:
        yield
    finally:
        for variable, value in saved:
            variable.assign(value)


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
    keras = import_keras()
    return LayerStats(np.asarray(keras.ops.convert_to_numpy(bn.moving_mean), np.float64).reshape(-1),
                      np.asarray(keras.ops.convert_to_numpy(bn.moving_variance), np.float64).reshape(-1))


def require_model(model) -> None:
    """Refuse what is not a built Keras layer or model, with the fix."""
    if not isinstance(model, keras_classes("layers.Layer")):
        raise BncalError(f"expected a keras.Model, got {type(model).__name__}; load a .keras file with "
                         "bncal.keras.load_model")
    unbuilt = [name for name, bn in batchnorm_layers(model) if getattr(bn, "moving_mean", None) is None]
    if unbuilt:
        raise BncalError(f"the model is not built ({unbuilt[0]} has no statistics yet); call it once on a "
                         "batch, or model.build(input_shape), first")

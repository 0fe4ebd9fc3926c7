"""``bncal inspect`` for Keras models: the same rules on Keras layers.

The model is reduced to the rows and the graph every front end produces
(:class:`bncal.inspect.model.BNLayer`, :class:`bncal.inspect.model.Graph`) and handed to
:func:`bncal.inspect.model.inspect_graph`, so rule ids, severities and evidence are those of the
PyTorch and ONNX paths; fixes are worded for Keras (``BatchNormalization(momentum=...)``,
``renorm=True``, ``center=``). Momentum is reported in the Keras convention (the report's
``momentum_tf`` is ``BatchNormalization.momentum``; ``momentum_torch`` is ``1 - momentum``).

Where the graph comes from (``InspectReport.graph``):

- ``"keras functional"``: a functional model's own graph of layer calls and ``keras.ops``
  operations; nested functional and Sequential models are inlined.
- ``"keras sequential"``: a Sequential model's layers in order (nested models inlined).
- ``"execution order"`` / ``"layer order"``: a subclassed model has no graph; its leaf layers
  are chained in the order one inference forward of ``example_inputs`` calls them, or else in
  the order Keras tracks them (the report's notes say so).

A layer with a built-in ``activation`` (``Conv2D(..., activation="relu")``) counts as the
layer followed by that nonlinearity. Flatten, Reshape, Permute, Identity and linear
activations count as shape-only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import BncalError, one_line
from ..inspect.model import DEGENERATE, NEVER_UPDATED, BNLayer, Graph, InspectReport, Node, statistics_status
from ..inspect.rules import inspect_graph
from ..names import fresh_name
from .backend import import_keras, inference_context
from .layers import (batchnorm_layers, is_batchnorm, moving_statistics, named_layers, renorm_reference, replaced_calls,
                     sublayers)

__all__ = ["inspect"]


# keras.ops operations in functional graphs, by class name.
_ACT_OPS = {"Relu", "Relu6", "Sigmoid", "Softplus", "Softsign", "Silu", "Swish", "LeakyRelu", "HardSigmoid",
            "HardSilu", "HardSwish", "Elu", "Selu", "Gelu", "Celu", "Glu", "Tanh", "HardTanh", "Mish",
            "LogSigmoid", "Softmax", "LogSoftmax", "SoftShrink", "HardShrink", "TanhShrink", "SparsePlus",
            "Squareplus", "SparseSigmoid", "Threshold"}
_PASS_OPS = {"Reshape", "Transpose", "Squeeze", "ExpandDims", "Flatten"}


def inspect(model, *, batch_size: int | None = None, dataset_size: int | None = None, epochs: float = 1,
            example_inputs=None, safe_mode: bool = True) -> InspectReport:
    """Inspect the BatchNormalization layers of a Keras ``model`` (or a ``.keras`` path, loaded
    with :func:`bncal.keras.load_model` and ``safe_mode``).

    ``batch_size`` (per device) enables BN040, and with ``dataset_size`` and ``epochs`` BN010.
    ``example_inputs`` is used for subclassed models only: one inference forward records the
    order in which the layers are called. The model is not modified.
    """
    keras = import_keras()
    if isinstance(model, (str, Path)):
        from .loading import load_model

        model = load_model(model, safe_mode=safe_mode)
    if not isinstance(model, keras.layers.Layer):
        raise BncalError(f"cannot inspect a {type(model).__name__} as a Keras model; give a keras.Model or a .keras file")
    bns = batchnorm_layers(model)
    names = {id(bn): name for name, bn in bns}
    layers = [_row(name, bn) for name, bn in bns]
    notes = [f"{name} has trainable=False: Keras runs it in inference mode in training too, so its moving "
             "statistics are what the network was trained with (bncal.keras.recalibrate leaves it alone)"
             for name, bn in bns if not bn.trainable]
    builder = _GraphBuilder(names)
    if not bns:
        graph, source = Graph([]), "layer order"
    elif isinstance(model, keras.Sequential) or _is_functional(model):
        source = "keras sequential" if isinstance(model, keras.Sequential) else "keras functional"
        graph = builder.whole(model)
    else:
        graph, source = builder.chain(model, example_inputs, notes)
    notes += builder.notes
    return inspect_graph("keras", graph, layers, graph_source=source, batch_size=batch_size,
                         dataset_size=dataset_size, epochs=epochs, notes=notes)


def _row(name: str, bn) -> BNLayer:
    if bn.moving_mean is None:
        stats, detail, channels = "not built", "the layer is not built yet, so it holds no statistics", None
    else:
        moving = moving_statistics(bn)
        stats, detail = statistics_status(moving.mean, moving.var, None)
        if stats == NEVER_UPDATED:
            detail = "moving mean all 0 and moving variance all 1 (initial values)"
        reference = renorm_reference(bn)
        if reference is not None and stats != DEGENERATE and _initial_renorm(bn):
            # A renorm training step rewrites the variance from an unmoved moving stddev of 1: 1 - epsilon.
            stats, detail = NEVER_UPDATED, "moving mean all 0 and moving stddev all 1 (initial values)"
        renorm_moved = reference is not None and not (np.all(reference.mean == 0) and np.all(reference.std == 1))
        channels = int(moving.mean.shape[0])
    momentum = float(bn.momentum)
    return BNLayer(name=name, type=type(bn).__name__, channels=channels, momentum_torch=1.0 - momentum,
                   momentum_tf=momentum, affine=bool(bn.center), track_running_stats=True, eps=float(bn.epsilon),
                   stats=stats, stats_detail=detail, renorm=bool(getattr(bn, "renorm", False)),
                   renorm_averages_moved=bool(renorm_moved))


def _initial_renorm(bn) -> bool:
    """A renorm layer's moving statistics at their initial values: mean 0, stddev 1."""
    keras = import_keras()
    value = lambda v: np.asarray(keras.ops.convert_to_numpy(v), np.float64)
    return bool(np.all(value(bn.moving_mean) == 0) and np.all(value(bn.moving_stddev) == 1))


def _is_functional(model) -> bool:
    try:
        from keras.src.models.functional import Functional
    except ImportError:  # pragma: no cover - another Keras layout: fall back to the layer chain
        return False
    return isinstance(model, Functional)


def _activation_name(fn) -> str | None:
    """The name of a layer's built-in activation, None when linear or absent."""
    if fn is None:
        return None
    keras = import_keras()
    try:
        name = keras.activations.serialize(fn)
    except (ValueError, TypeError, AttributeError):
        name = None
    if not isinstance(name, str):
        name = getattr(fn, "__name__", type(fn).__name__)
    return None if name == "linear" else name


# Layers that can absorb a per-channel affine of their input (their own activation comes after).
_LINEAR_LAYERS = ("Dense", "EinsumDense", "Conv1D", "Conv2D", "Conv3D", "Conv1DTranspose", "Conv2DTranspose",
                  "Conv3DTranspose", "DepthwiseConv1D", "DepthwiseConv2D", "SeparableConv1D", "SeparableConv2D")


def _kind(layer) -> str:
    keras = import_keras()
    L = keras.layers
    if is_batchnorm(layer):
        return "bn"
    dropouts = tuple(getattr(L, n) for n in ("Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D",
                                             "AlphaDropout", "GaussianDropout") if hasattr(L, n))
    if isinstance(layer, dropouts):
        return "dropout" if float(getattr(layer, "rate", 0.5)) > 0 else "pass"
    if isinstance(layer, L.Activation):
        return "act" if _activation_name(layer.activation) else "pass"
    if isinstance(layer, (L.ReLU, L.LeakyReLU, L.PReLU, L.ELU, L.Softmax)):
        return "act"
    if isinstance(layer, (L.Flatten, L.Reshape, L.Permute, L.Identity)):
        return "pass"
    linear = tuple(getattr(L, n) for n in _LINEAR_LAYERS if hasattr(L, n))
    if isinstance(layer, linear):
        return "linear"
    if not isinstance(layer, L.Layer):  # a keras.ops operation in a functional graph
        name = type(layer).__name__
        return "act" if name in _ACT_OPS else "pass" if name in _PASS_OPS else "other"
    return "other"


class _GraphBuilder:
    """Builds :class:`bncal.inspect.model.Graph` nodes from Keras layers; ``names`` maps
    ``id(bn)`` to the BN's report name."""

    def __init__(self, names: dict[int, str]):
        self.names = names
        self.nodes: list[Node] = []
        self.taken: set[str] = set()
        self.notes: list[str] = []

    def _add(self, base: str, kind: str, label: str, inputs: list[str], layer: str | None = None) -> str:
        key = fresh_name(base, self.taken, separator="#")
        self.nodes.append(Node(key, kind, label, list(inputs), layer))
        return key

    def whole(self, model) -> Graph:
        """A Sequential or functional model, inputs to output."""
        keras = import_keras()
        if isinstance(model, keras.Sequential):
            start = self._add("input", "other", "model input", [])
            outputs = [self.call(model, [start], "", inline=True)]
        else:
            outputs = self.functional(model, None, "")
        self._add("__output__", "output", "model output", outputs)
        return Graph(self.nodes)

    def call(self, layer, inputs: list[str], prefix: str, inline: bool = False) -> str:
        """Nodes for one call of ``layer`` on ``inputs``; returns the key of its output."""
        keras = import_keras()
        label = prefix + layer.name
        inner = "" if inline else label + "/"
        if isinstance(layer, keras.Sequential):
            out = inputs
            for sub in layer.layers:
                out = [self.call(sub, out, inner)]
            return out[0] if inline else self._add(label, "pass", label, out)
        if _is_functional(layer):
            return self._add(label, "pass", label, self.functional(layer, inputs, inner))
        kind = _kind(layer)
        key = self._add(label, kind, label, inputs, self.names.get(id(layer)) if kind == "bn" else None)
        activation = None if kind not in ("other", "linear") else _activation_name(getattr(layer, "activation", None))
        if activation:
            key = self._add(f"{label}:{activation}", "act", f"{label} (activation={activation!r})", [key])
        if kind == "other" and isinstance(layer, keras.layers.Layer) and any(
                is_batchnorm(sub) for _, sub in named_layers(layer)):
            self.notes.append(f"{label} holds BatchNormalization layers inside its own call, which the graph rules "
                              "(BN020, BN021, BN030) cannot see into")
        return key

    def functional(self, model, inputs: list[str] | None, prefix: str) -> list[str]:
        """Inline a functional model's graph; ``inputs`` are the keys feeding its inputs
        (None: it is the model being inspected). Returns the keys of its outputs."""
        keras = import_keras()
        model_inputs = [kt._keras_history.operation for kt in model.inputs]
        out_of: dict[int, str] = {}

        def producer(kt) -> str:
            history = kt._keras_history
            return out_of[id(history.operation._inbound_nodes[history.node_index])]

        for depth in sorted(model._nodes_by_depth, reverse=True):  # inputs first
            for node in model._nodes_by_depth[depth]:
                op = node.operation
                if isinstance(op, keras.layers.InputLayer):
                    if inputs is None:
                        out_of[id(node)] = self._add(prefix + op.name, "other", "model input", [])
                    else:
                        i = next((k for k, o in enumerate(model_inputs) if o is op), 0)
                        feed = inputs[i:i + 1] if i < len(inputs) else inputs
                        out_of[id(node)] = self._add(prefix + op.name, "pass", prefix + op.name, feed)
                    continue
                parents = [producer(kt) for kt in node.arguments.keras_tensors]
                out_of[id(node)] = self.call(op, parents, prefix)
        return [producer(kt) for kt in model.outputs]

    def chain(self, model, example_inputs, notes: list[str]) -> tuple[Graph, str]:
        """A subclassed model: its leaf layers in execution order (with ``example_inputs``) or
        in the order Keras tracks them."""
        leaves = _leaf_layers(model)
        source, order = "layer order", [layer for _, layer in leaves]
        if example_inputs is not None:
            try:
                order, source = _execution_order(model, leaves, example_inputs), "execution order"
                notes.append("a subclassed model has no graph: producer/consumer relations are guessed from the "
                             "order one forward pass calls the layers, so graph rules (BN020, BN021, BN030) can "
                             "miss keras.ops calls and branches")
            except Exception as error:  # the user's model code may raise anything
                notes.append(f"running example_inputs failed ({one_line(error)}); relations follow the order "
                             "Keras tracks the layers, so graph rules (BN020, BN021, BN030) can be wrong")
        else:
            notes.append("a subclassed model has no graph: relations follow the order Keras tracks the layers, so "
                         "graph rules (BN020, BN021, BN030) can be wrong; pass example_inputs for the execution order")
        names = {id(layer): name for name, layer in leaves}
        previous = [self._add("input", "other", "model input", [])]
        for layer in order:
            label = names[id(layer)]
            kind = _kind(layer)
            key = self._add(label, kind, label, previous, self.names.get(id(layer)) if kind == "bn" else None)
            activation = (None if kind not in ("other", "linear")
                          else _activation_name(getattr(layer, "activation", None)))
            if activation:
                key = self._add(f"{label}:{activation}", "act", f"{label} (activation={activation!r})", [key])
            previous = [key]
        self._add("__output__", "output", "model output", previous)
        return Graph(self.nodes), source


def _leaf_layers(model) -> list[tuple[str, object]]:
    """Layers without sublayers, and BN/dropout/activation layers kept whole, named, in order."""
    leaves, inside = [], None
    for name, layer in named_layers(model):
        if inside is not None and name.startswith(inside):
            continue
        kept_whole = _kind(layer) not in ("other", "linear")
        if kept_whole or not sublayers(layer):
            leaves.append((name, layer))
            if kept_whole:
                inside = name + "/"
    return leaves


def _execution_order(model, leaves, example_inputs) -> list:
    """The leaf layers in the order one inference forward (no gradients) calls them."""
    order = []
    with replaced_calls((layer, _recording(layer, layer.call, order)) for _, layer in leaves), inference_context():
        model(example_inputs, training=False)
    return order


def _recording(layer, original, order):
    def call(*args, **kwargs):
        order.append(layer)
        return original(*args, **kwargs)
    return call

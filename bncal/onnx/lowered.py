"""Normalisation a converter lowered to arithmetic: recognised in an ONNX graph (no torch here).

Many converters emit no ``BatchNormalization`` at all. Keras 3's BatchNormalization lowers to
arithmetic; tf2onnx (its back-to-back optimizer) and Keras's own ``model.export(format="onnx")``
fold conv BNs into the Conv weights and leave a Dense BN as ``MatMul -> Mul -> Add``;
``torch.onnx.export`` of a Keras model on the torch backend leaves every BN as ``Sub(mean) ->
Mul -> Add`` with per-channel constants. The moving statistics are then folded into
constants: they can be neither checked nor recalibrated in the file, only at the source.

:func:`find_lowered_normalisations` recognises what is left of them, on the top-level graph:

- a *per-channel affine chain*: consecutive Add/Sub/Mul/Div nodes, each combining the chain's
  data with a constant (an initializer, a Constant, or a constant expression of them) that has
  one value per channel (one axis longer than 1), at least one scaling (Mul/Div) and one shift
  (Add/Sub). Such a chain is a lowered normalisation when

  * it follows a Conv, ConvTranspose, MatMul or Gemm (through shape-only ops and Casts): the
    BN of a ``Dense -> BN`` or ``Conv -> BN`` pair, its statistics folded into the constants;
  * or it centres, scales and shifts (``Sub(mean)``, then ``Mul``/``Div``, then ``Add``):
    ``(x - mean) * gamma / sqrt(var + eps) + beta`` with the factors folded, anywhere;
  * or its constants are still computed from ``Sqrt``/``Reciprocal`` of constants (the
    statistics ``1 / sqrt(var + eps)`` in the graph, unfolded);
  * or a node of it is named in a BatchNorm name scope (``*/batchnorm/*``,
    ``batch_normalization``, ``FusedBatchNormV3``, ``bn1``: the names TF and Keras give);

- *a BN folded into a linear op*: a Conv, ConvTranspose, MatMul or Gemm whose output or constant
  inputs are named in a BatchNorm scope (tf2onnx names a conv's folded bias ``model/bn1/batchnorm/sub``
  and its output ``model/bn1/FusedBatchNormV3``) or whose weights carry tf2onnx's ``_fused_bn``
  suffix: the statistics are in its weights, one entry per BN;

- *a name scope alone*: compute nodes named in a BatchNorm scope that holds no
  BatchNormalization node and no recognised chain. A BN folded into a Conv's weights leaves no
  other trace: it is reported by its scope's name where the converter kept one.

A learned per-channel affine layer directly after a linear layer (rare) looks the same as a
folded BN; the reports say "looks like". Preprocessing on a graph input (``(x - mean) / std``,
no shift after the scaling) is not reported. Chains computed from the data itself (LayerNorm,
InstanceNorm written as arithmetic) have non-constant factors and are not chains here.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from ..frozen import FROZEN_IN_GRAPH, frozen_origin
from ..names import fresh_name

__all__ = ["LoweredNormalisation", "find_lowered_normalisations", "describe_lowered", "LOWERED_FIX",
           "no_batchnorm_hint"]

#: How to fix it at the source, worded once for every report (inspect's BN060, check, recalibrate).
LOWERED_FIX = ("recalibrate the model before converting it (bncal recalibrate model.keras or model.h5 "
               "--data DATA -o fixed.keras; a PyTorch factory spec with --weights) and convert the recalibrated "
               "model again: converters fold the statistics into constants (tf2onnx and Keras's export have no "
               "option that keeps BatchNormalization; bncal fold-export of a PyTorch model folds it and proves "
               "the file in onnxruntime)")

_PASS = {"Transpose", "Reshape", "Flatten", "Identity", "Squeeze", "Unsqueeze", "Cast"}
_LINEAR = {"Conv", "ConvTranspose", "MatMul", "Gemm"}
_ARITHMETIC = {"Add", "Sub", "Mul", "Div"}
_SCALE, _SHIFT = {"Mul", "Div"}, {"Add", "Sub"}
#: One path component of a TF/Keras/PyTorch name that says "batch norm".
_SCOPE = re.compile(r"batch_?norm|(^|[_.:])bn\d*([_.:]|$)", re.IGNORECASE)
#: Components that name the operation, not the layer: the scope is what precedes them.
_OP_SCOPE = re.compile(r"^(batchnorm|fused_?batch_?norm\w*)$", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class LoweredNormalisation:
    """One normalisation a converter lowered to arithmetic.

    ``name``: the BatchNorm name scope when the converter kept one (``model/bn1``), else the
    first node's name. ``ops``: the op types left of it (``("Sub", "Mul", "Add")``; for a scope
    alone, the op types named in it). ``after``: the linear op it follows (``"Conv conv1"``),
    if any. ``reason``: what gave it away. ``channels``: the constants' length (None for a
    scope alone). ``nodes``: the node names (or first outputs) involved. ``frozen``: the class
    of the PyTorch frozen BN the chain was exported from (:func:`bncal.frozen.frozen_origin`;
    ``name`` is then its module path): no converter's lowering, but a fixed affine by design.
    """

    name: str
    ops: tuple[str, ...]
    reason: str
    channels: int | None = None
    after: str | None = None
    nodes: tuple[str, ...] = ()
    frozen: str | None = None

    def describe(self) -> str:
        """``"bn1 (Sub -> Mul -> Add after Conv conv1)"``."""
        where = f" after {self.after}" if self.after else ""
        return f"{self.name} ({' -> '.join(self.ops)}{where})"


def describe_lowered(found: list[LoweredNormalisation], limit: int = 4) -> str:
    """The first few as ``name (ops after op)``, comma-separated, ``and N more``."""
    shown = ", ".join(f.describe() for f in found[:limit])
    return shown + (f" and {len(found) - limit} more" if len(found) > limit else "")


def no_batchnorm_hint(model, done: str) -> str:
    """For the error of a command that found no BatchNormalization to work on (``done``:
    "checked", "recalibrated"): ``"; it holds N normalisation layers ... fix it at the source: ..."``
    and, for a PyTorch export, ``"; its N frozen BatchNorm layers (...) hold fixed statistics ..."``;
    for a graph with no BatchNormalization node and neither of those, whether it was already
    folded; else ``""``."""
    everything = find_lowered_normalisations(model)
    found = [f for f in everything if not f.frozen]
    frozen = [f.name for f in everything if f.frozen] + [
        origin[1] for node in model.graph.node
        if node.op_type == "BatchNormalization" and (origin := frozen_origin(node)) is not None]
    hint = ""
    if frozen:
        shown = ", ".join(frozen[:4]) + (f" and {len(frozen) - 4} more" if len(frozen) > 4 else "")
        hint += (f"; its {len(frozen)} frozen BatchNorm layer{'s' if len(frozen) != 1 else ''} ({shown}) hold fixed "
                 f"statistics, the same in training and inference, which need not and cannot be {done}")
    if found:
        n = len(found)
        hint += (f"; it holds {n} normalisation layer{'s' if n != 1 else ''} that the converter lowered to arithmetic "
                 f"({describe_lowered(found, 2)}), whose statistics are folded into constants and cannot be {done} "
                 f"in this file; fix it at the source: {LOWERED_FIX}")
    if not hint and not any(node.op_type == "BatchNormalization" for node in model.graph.node):
        hint = (f"; the graph holds no BatchNormalization node at all: was it already folded (bncal fold-export, or "
                f"an exporter that folds BN)? The statistics are {done} on the model before folding: give that "
                "model (or an export with its BatchNorms kept), then fold it")
    return hint


def _node_label(node) -> str:
    return node.name or (node.output[0] if node.output else node.op_type)


def _scope(name: str) -> str | None:
    """The BatchNorm name scope of a node name (``model/bn1/batchnorm/mul`` -> ``model/bn1``)."""
    parts = [p for p in name.split("/") if p]
    for i, part in enumerate(parts):
        if _SCOPE.search(part):
            if _OP_SCOPE.match(part) and i > 0:
                return "/".join(parts[:i])
            return "/".join(parts[:i + 1])
    return None


class _Constants:
    """Values of the graph's small constant tensors: initializers (not graph inputs), Constant
    outputs, and elementwise/shape expressions of them, evaluated with numpy in one sweep in
    graph order (no recursion; tensors above :attr:`LIMIT` elements, weights, are never
    converted). ``from_statistics`` holds the tensors computed through a Sqrt or Reciprocal."""

    LIMIT = 1 << 16
    _EVALUATED = {"Identity", "Cast", "Reshape", "Unsqueeze", "Squeeze", "Add", "Sub", "Mul", "Div", "Sqrt",
                  "Reciprocal", "Neg", "Pow"}

    def __init__(self, graph):
        inputs = {i.name for i in graph.input}
        self._tensors = {init.name: init for init in graph.initializer if init.name not in inputs}
        self._values: dict[str, np.ndarray | None] = {}
        self.producers = {out: node for node in graph.node for out in node.output if out}
        self.from_statistics: set[str] = set()
        for node in graph.node:  # ONNX keeps nodes in topological order
            if not node.output or node.domain not in ("", "ai.onnx"):
                continue
            if node.op_type == "Constant":
                value = _constant_value(node)
                self._values[node.output[0]] = value if value is not None and value.size <= self.LIMIT else None
            elif node.op_type in self._EVALUATED and node.input:
                args = [self.value(i) if i else None for i in node.input]
                if args[0] is None or any(a is None for i, a in zip(node.input, args) if i):
                    continue
                try:
                    with np.errstate(all="ignore"):
                        value = _evaluate(node, args)
                except (ValueError, TypeError, IndexError, KeyError, ZeroDivisionError):
                    continue
                if value is None or value.size > self.LIMIT:
                    continue
                self._values[node.output[0]] = value
                if node.op_type in ("Sqrt", "Reciprocal") or any(i in self.from_statistics for i in node.input):
                    self.from_statistics.add(node.output[0])

    def is_constant(self, name: str) -> bool:
        """Whether ``name`` is an initializer (not a graph input) or a constant expression."""
        return name in self._tensors or self.value(name) is not None

    def value(self, name: str) -> np.ndarray | None:
        """The value of constant tensor ``name``, or None (not constant, or too large)."""
        if name in self._values:
            return self._values[name]
        tensor = self._tensors.get(name)
        value = None
        if tensor is not None and int(np.prod(tensor.dims, dtype=np.int64)) <= self.LIMIT:
            from onnx import numpy_helper

            value = numpy_helper.to_array(tensor)
        self._values[name] = value
        return value


def _constant_value(node) -> np.ndarray | None:
    from onnx import helper, numpy_helper

    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name in ("value_float", "value_floats", "value_int", "value_ints"):
            return np.asarray(helper.get_attribute_value(attr))
    return None


def _evaluate(node, args) -> np.ndarray | None:
    from onnx import helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    op, x = node.op_type, np.asarray(args[0])
    if op == "Identity":
        return x
    if op == "Cast":
        return x.astype(helper.tensor_dtype_to_np_dtype(attrs["to"]))
    if op == "Neg":
        return -x
    if op == "Sqrt":
        return np.sqrt(x)
    if op == "Reciprocal":
        return 1.0 / x
    if op in ("Add", "Sub", "Mul", "Div", "Pow"):
        y = np.asarray(args[1])
        return {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide, "Pow": np.power}[op](x, y)
    if op == "Reshape":
        shape = [int(d) for d in np.asarray(args[1]).reshape(-1)]
        shape = [x.shape[i] if d == 0 and not attrs.get("allowzero", 0) else d for i, d in enumerate(shape)]
        return x.reshape(shape)
    axes = attrs.get("axes")
    if axes is None and len(args) > 1 and args[1] is not None:
        axes = [int(a) for a in np.asarray(args[1]).reshape(-1)]
    if op == "Unsqueeze":
        if axes is None:
            return None
        return np.expand_dims(x, tuple(a % (x.ndim + len(axes)) for a in axes))
    if op == "Squeeze":
        return np.squeeze(x) if axes is None else np.squeeze(x, tuple(a % x.ndim for a in axes))
    return None


def _per_channel(value: np.ndarray) -> int | None:
    """The channel count of a per-channel constant: floating, more than one value, one axis
    longer than 1; else None."""
    if not np.issubdtype(value.dtype, np.floating) or value.size < 2:
        return None
    return int(value.size) if sum(d > 1 for d in value.shape) == 1 else None


@dataclasses.dataclass
class _Step:
    node: object
    data: str        # the chain's tensor this step reads
    constant: str    # its constant operand
    channels: int


def _step(node, constants: _Constants) -> _Step | None:
    """``node`` as a step of a per-channel affine chain, or None."""
    if node.op_type not in _ARITHMETIC or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
        return None
    a, b = node.input
    va, vb = constants.value(a), constants.value(b)
    if (va is None) == (vb is None):
        return None
    if va is not None:
        if node.op_type in ("Sub", "Div"):  # c - x, c / x: no normalisation step
            return None
        data, constant, value = b, a, va
    else:
        data, constant, value = a, b, vb
    channels = _per_channel(value)
    return None if channels is None else _Step(node, data, constant, channels)


def find_lowered_normalisations(model) -> list[LoweredNormalisation]:
    """The normalisation layers of ``model`` (an ``onnx.ModelProto``) that a converter lowered
    to arithmetic, in graph order (see the module docstring for what is recognised)."""
    graph = model.graph
    constants = _Constants(graph)
    producers = constants.producers
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_inputs = {i.name for i in graph.input} - {init.name for init in graph.initializer}

    steps = {id(node): step for node in graph.node if (step := _step(node, constants)) is not None}

    def next_step(step: _Step) -> _Step | None:
        users = consumers.get(step.node.output[0], []) if step.node.output else []
        if len(users) != 1:
            return None
        following = steps.get(id(users[0]))
        if following is None or following.data != step.node.output[0] or following.channels != step.channels:
            return None
        return following

    followed = {id(s.node) for s in map(next_step, steps.values()) if s is not None}
    found: list[LoweredNormalisation] = []
    claimed_scopes: set[str] = set()
    in_chains: set[int] = set()
    taken: set[str] = set()
    for node in graph.node:  # chains, in graph order of their first step
        step = steps.get(id(node))
        if step is None or id(node) in followed:
            continue
        chain = [step]
        while (following := next_step(chain[-1])) is not None:
            chain.append(following)
        ops = tuple(s.node.op_type for s in chain)
        if not (set(ops) & _SCALE and set(ops) & _SHIFT):
            continue
        source = _source(chain[0].data, producers)
        scope = next((sc for s in chain if (sc := _scope(_node_label(s.node))) is not None), None)
        centred = ops[0] == "Sub" and any(op in _SCALE for op in ops[1:]) and "Add" in ops[1:]
        statistics = any(s.constant in constants.from_statistics for s in chain)
        linear = source is not None and source.op_type in _LINEAR
        on_input = source is None and _unwrap(chain[0].data, producers) in graph_inputs
        if linear:
            reason = "a per-channel scale and shift right after a linear layer"
        elif scope is not None:
            reason = "a per-channel scale and shift in a BatchNorm name scope"
        elif statistics:
            reason = "a per-channel scale and shift computed from 1/sqrt(var + eps)"
        elif centred and not on_input:
            reason = "(x - mean) * scale + shift with per-channel constants"
        else:
            continue
        label = scope or _node_label(chain[0].node)
        origin = next((o for s in chain if (o := frozen_origin(s.node)) is not None), None)
        if origin is not None:
            label, reason = origin[1], FROZEN_IN_GRAPH.format(cls=origin[0])
        found.append(LoweredNormalisation(
            name=fresh_name(label, taken, separator="#"), ops=ops, reason=reason, channels=chain[0].channels,
            after=f"{source.op_type} {_node_label(source)}" if linear else None,
            nodes=tuple(_node_label(s.node) for s in chain), frozen=origin[0] if origin else None))
        in_chains.update(id(s.node) for s in chain)
        if scope is not None:
            claimed_scopes.add(scope)
    found += _folded_into_linear(graph, constants, in_chains, claimed_scopes, taken)
    found += _named_scopes(graph, constants, in_chains, claimed_scopes, taken)
    order = {_node_label(node): i for i, node in enumerate(graph.node)}
    return sorted(found, key=lambda f: min((order.get(n, len(order)) for n in f.nodes), default=len(order)))


def _folded_into_linear(graph, constants, in_chains, claimed, taken) -> list[LoweredNormalisation]:
    """Linear ops whose weights a converter folded a BN into, recognised by the names it left:
    the BN's scope on the op's output or constant inputs, or tf2onnx's ``_fused_bn`` suffix."""
    found = []
    for node in graph.node:
        if node.op_type not in _LINEAR or id(node) in in_chains:
            continue
        weights = [name for name in node.input[1:] if name and constants.is_constant(name)]
        named = [*node.output, *weights]
        scope = next((sc for name in named if (sc := _scope(name)) is not None), None)
        fused = any(name.endswith("_fused_bn") for name in weights)
        if scope is None and not fused or scope in claimed:
            continue
        if scope is not None:
            claimed.add(scope)
        label = scope or f"{_node_label(node)} (fused BN)"
        found.append(LoweredNormalisation(
            name=fresh_name(label, taken, separator="#"), ops=(node.op_type,),
            reason=f"folded into the weights of {node.op_type} {_node_label(node)} (the names the converter left)",
            nodes=(_node_label(node),)))
    return found


def _unwrap(name: str, producers) -> str:
    """Follow shape-only ops and Casts up from tensor ``name``; the first other tensor."""
    node = producers.get(name)
    while node is not None and node.op_type in _PASS and node.input:
        name = node.input[0]
        node = producers.get(name)
    return name


def _source(name: str, producers):
    """The node producing ``name``, looking through shape-only ops and Casts (None: an input)."""
    return producers.get(_unwrap(name, producers))


def _named_scopes(graph, constants, in_chains, claimed, taken) -> list[LoweredNormalisation]:
    """Compute nodes in a BatchNorm name scope not accounted for otherwise, one entry per scope."""
    bn_names = [n.strip("/") for node in graph.node if node.op_type == "BatchNormalization"
                for n in (node.name, *node.output) if n]
    bn_scopes = {_scope(n) for n in bn_names}
    scopes: dict[str, list] = {}
    for node in graph.node:
        if (id(node) in in_chains or node.op_type in ("Constant", "BatchNormalization") or node.op_type in _PASS
                or not node.output or all(constants.value(o) is not None for o in node.output if o)):
            continue
        scope = _scope(_node_label(node))
        if scope is None or scope in claimed or scope in bn_scopes or any(n.startswith(scope + "/") for n in bn_names):
            continue
        scopes.setdefault(scope, []).append(node)
    found = []
    for scope, nodes in scopes.items():
        ops = tuple(dict.fromkeys(n.op_type for n in nodes))
        found.append(LoweredNormalisation(
            name=fresh_name(scope, taken, separator="#"), ops=ops,
            reason="only a BatchNorm name scope is left (folded into " + "/".join(ops) + ")",
            nodes=tuple(_node_label(n) for n in nodes)))
    return found

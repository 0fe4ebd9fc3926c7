"""Fold inference BatchNormalization nodes of an ONNX graph into neighbouring linear ops.

An inference BN is a per-channel affine map (channel axis 1)::

    BN(y) = s * y + t,    s = gamma / sqrt(var + eps),    t = beta - mean * s

**Into the preceding op** ``y = W x + b`` (Conv, ConvTranspose, Gemm, MatMul with a constant
2-D weight and a 2-D (N, C) output), scale each output channel's weights and shift its bias::

    W' = W * s  (along the output-channel axis),    b' = s * b + t = (b - mean) * s + beta

Conv weights are (C_out, C_in/g, k...): output channel o is ``W[o]``. ConvTranspose weights are
(C_in, C_out/g, k...): output channel ``o = g_i * (C_out/g) + j`` is ``W[g_i*(C_in/g):(g_i+1)*(C_in/g), j]``.
Gemm ``alpha * op(A) op(B) + beta * C`` keeps alpha, scales the columns of op(B) by s and takes
``C' = s * beta * C + t`` with beta 1. MatMul becomes ``Gemm(x, W * s, t)``.

**Into the following op** ``z = W y + b`` where ``y = s * x + t`` is the BN's output::

    W' = W * s  (along the input-channel axis),    b' = b + sum over inputs of W * t

This is exact for a Conv only without padding: a padded Conv pads the BN's *output* with zeros,
which are not ``s * 0 + t``. For Gemm (transA=0) the input features are the BN's channels,
directly or through Flatten(axis=1)/Reshape(N, -1), which repeats each channel's (s, t) over its
spatial positions (feature ``f`` belongs to channel ``f // spatial_size``); ``C' = beta * C +
alpha * t @ B`` with beta 1.

**To affine** (``bn_to_affine=True``), a BN that fits neither becomes ``Mul(x, s) -> Add(t)``
with constants shaped (C, 1, ...) to broadcast over the input's rank.

**Refused**, with the reason in the BN's :class:`FoldDecision`: ``training_mode=1`` (or used
training outputs); parameters or weights that are not constant initializers, or that are also
graph inputs (overridable at run time); a neighbour whose connecting output also feeds other
nodes or is a graph output; shapes that do not line up (channel counts, MatMul rank, a Reshape
that may mix batch and features).

The math runs in float64; results are cast back to the weight's (or the input's) dtype. New
parameters get new initializers with fresh names (shared initializers are never changed in
place); initializers that folding leaves unused are removed. The BN's output name survives on the
op that now produces it, so graph outputs keep their names. Only the main graph is folded;
BNs in subgraphs (If/Loop/Scan bodies) and model-local functions are left alone.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import onnx
import onnx_ir as ir

from .report import FoldDecision

__all__ = ["fold_onnx", "strip_initializer_inputs", "op_counts"]

_ONNX_DOMAINS = ("", "ai.onnx")
_TRAINING = "training-mode BatchNormalization"


def fold_onnx(
    model: onnx.ModelProto,
    *,
    bn_to_affine: bool = False,
    treat_initializer_inputs_as_constant: bool = False,
) -> tuple[onnx.ModelProto, list[FoldDecision]]:
    """Fold every foldable inference BatchNormalization; return the new model and decisions.

    ``model`` is not modified. There is one :class:`FoldDecision` per BatchNormalization node (in
    graph order, unnamed nodes named ``<op>_<index>``); a refused fold carries the reason. A BN is
    folded into its preceding op if possible, else into its following op, else (with
    ``bn_to_affine``) rewritten as Mul + Add. ``training_mode=1`` BNs are never touched.

    An initializer that is also a graph input (every initializer of an IR < 4 model) can be
    overridden at run time, so a fold that needs it is refused, unless
    ``treat_initializer_inputs_as_constant``; then the inputs that folding leaves unused are
    removed from the graph's inputs too (see also :func:`strip_initializer_inputs`).
    """
    folder = _Folder(
        ir.from_proto(model), _tensor_types(model),
        bn_to_affine=bn_to_affine, trust_initializer_inputs=treat_initializer_inputs_as_constant,
    )
    decisions = folder.run()
    folded = ir.to_proto(folder.model)
    _drop_added_initializer_value_info(folded, model)
    return folded, decisions


def strip_initializer_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return a copy of ``model`` whose graph inputs no longer list its initializers.

    IR < 4 models must list every initializer as a graph input, which makes each one overridable
    at run time; the copy is raised to IR version 4, where initializers are constants.
    """
    stripped = onnx.ModelProto()
    stripped.CopyFrom(model)
    initializer_names = {init.name for init in stripped.graph.initializer}
    kept = [inp for inp in stripped.graph.input if inp.name not in initializer_names]
    del stripped.graph.input[:]
    stripped.graph.input.extend(kept)
    stripped.ir_version = max(stripped.ir_version, 4)
    return stripped


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Count the main graph's nodes by op type (``domain::op`` outside the default domain)."""
    counts: dict[str, int] = {}
    for node in model.graph.node:
        key = node.op_type if node.domain in _ONNX_DOMAINS else f"{node.domain}::{node.op_type}"
        counts[key] = counts.get(key, 0) + 1
    return counts


def _drop_added_initializer_value_info(folded: onnx.ModelProto, original: onnx.ModelProto) -> None:
    """onnx_ir writes a value_info for every initializer; keep only those the input model had."""
    had = {info.name for info in original.graph.value_info}
    initializers = {init.name for init in folded.graph.initializer}
    kept = [info for info in folded.graph.value_info if info.name not in initializers or info.name in had]
    del folded.graph.value_info[:]
    folded.graph.value_info.extend(kept)


class _Refused(Exception):
    """A fold that does not apply; the message is the reason shown to the user."""


@dataclasses.dataclass(frozen=True)
class _Affine:
    """An inference BN as ``scale * x + shift`` per channel (float64), with its parameter values."""

    scale: np.ndarray
    shift: np.ndarray
    params: tuple[ir.Value, ...]

    @property
    def channels(self) -> int:
        return self.scale.shape[0]


@dataclasses.dataclass(frozen=True)
class _Rewrite:
    """A linear op to emit in place of an old one: same data input, new weight and bias."""

    op_type: str
    weight: np.ndarray
    bias: np.ndarray
    attributes: list[ir.Attr]


def _tensor_types(model: onnx.ModelProto) -> dict[str, tuple[int, tuple[int | None, ...] | None]]:
    """``name -> (elem_type, dims or None)`` from ONNX shape inference; empty if inference fails."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # shapes are optional: folds that need them refuse instead
        return {}
    types = {}
    graph = inferred.graph
    for info in [*graph.input, *graph.value_info, *graph.output]:
        tensor_type = info.type.tensor_type
        dims = None
        if tensor_type.HasField("shape"):
            dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim)
        types[info.name] = (tensor_type.elem_type, dims)
    return types


def _attributes_except(attributes, *names: str) -> list[ir.Attr]:
    return [attr for name, attr in attributes.items() if name not in names]


def _scale_output_channels(op_type: str, weight: np.ndarray, scale: np.ndarray, group: int) -> np.ndarray:
    """``weight * scale`` along the output channels of a Conv/ConvTranspose/Gemm-like weight."""
    w = weight.astype(np.float64)
    if op_type == "ConvTranspose":
        c_in, c_out_per_group, *kernel = w.shape
        ones = [1] * len(kernel)
        grouped = w.reshape(group, c_in // group, c_out_per_group, *kernel)
        return (grouped * scale.reshape(group, 1, c_out_per_group, *ones)).reshape(w.shape)
    return w * scale.reshape(-1, *[1] * (w.ndim - 1))


class _Folder:
    def __init__(self, model: ir.Model, types, *, bn_to_affine: bool, trust_initializer_inputs: bool):
        self.model = model
        self.graph = model.graph
        self.types = types
        self.opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
        self.bn_to_affine = bn_to_affine
        self.trust_initializer_inputs = trust_initializer_inputs
        self.value_names = set(ir.convenience.create_value_mapping(self.graph))
        self.names = self._display_names()
        self.node_names = set(self.names.values())
        self.displaced: list[ir.Value] = []  # initializers a fold stopped using

    def _display_names(self) -> dict[ir.Node, str]:
        nodes = list(ir.traversal.RecursiveGraphIterator(self.graph))
        taken = {node.name for node in nodes if node.name}
        names, index_in_graph = {}, {}
        for node in nodes:
            index = index_in_graph[node.graph] = index_in_graph.get(node.graph, -1) + 1
            if node.name:
                names[node] = node.name
                continue
            prefix = "" if node.graph is self.graph else f"{node.graph.name or 'subgraph'}/"
            name = base = f"{prefix}{node.op_type}_{index}"
            suffix = 0
            while name in taken:
                suffix += 1
                name = f"{base}_{suffix}"
            taken.add(name)
            names[node] = name
        return names

    def run(self) -> list[FoldDecision]:
        decisions = []
        batch_norms = [
            node for node in ir.traversal.RecursiveGraphIterator(self.graph)
            if node.op_type == "BatchNormalization" and node.domain in _ONNX_DOMAINS
        ]
        for bn in batch_norms:
            decisions.append(self._fold(bn))
        self._remove_displaced_initializers()
        return decisions

    def _fold(self, bn: ir.Node) -> FoldDecision:
        name = self.names[bn]
        if bn.graph is not self.graph:
            return FoldDecision(name, None, None, "inside a subgraph; only the main graph is folded")
        try:
            affine = self._affine(bn)
        except _Refused as refusal:
            return FoldDecision(name, None, None, str(refusal))
        attempts = [("into-preceding", self._into_preceding), ("into-following", self._into_following)]
        if self.bn_to_affine:
            attempts.append(("to-affine", self._to_affine))
        reasons = []
        for direction, attempt in attempts:
            try:
                target = attempt(bn, affine)
            except _Refused as refusal:
                reasons.append(f"{direction.removeprefix('into-')}: {refusal}")
                continue
            self.displaced.extend(affine.params)
            return FoldDecision(name, target, direction)
        return FoldDecision(name, None, None, "; ".join(reasons))

    # -- the BN itself ------------------------------------------------------------------------

    def _affine(self, bn: ir.Node) -> _Affine:
        attributes = bn.attributes
        if attributes.get_int("training_mode", 0) or (self.opset < 7 and not attributes.get_int("is_test", 0)):
            raise _Refused(_TRAINING)
        if any(out is not None and (out.uses() or out.is_graph_output()) for out in bn.outputs[1:]):
            raise _Refused("its running mean/variance outputs are used (training outputs)")
        if attributes.get_int("spatial", 1) == 0:
            raise _Refused("spatial=0 (per-activation statistics) is not supported")
        roles = ("scale", "bias", "mean", "var")
        gamma, beta, mean, var = (self._constant(bn, i, role) for i, role in enumerate(roles, 1))
        if len({p.shape for p in (gamma, beta, mean, var)}) != 1 or gamma.ndim != 1:
            raise _Refused("scale, bias, mean and var are not per-channel vectors of one length")
        denominator = var.astype(np.float64) + attributes.get_float("epsilon", 1e-5)
        if not np.all(denominator > 0):  # also catches NaN
            raise _Refused("var + epsilon is not positive for every channel")
        scale = gamma.astype(np.float64) / np.sqrt(denominator)
        shift = beta.astype(np.float64) - mean.astype(np.float64) * scale
        if not (np.all(np.isfinite(scale)) and np.all(np.isfinite(shift))):
            raise _Refused("its parameters are not finite")
        return _Affine(scale, shift, tuple(bn.inputs[1:5]))

    def _constant(self, node: ir.Node, index: int, role: str) -> np.ndarray:
        """The constant initializer at ``node.inputs[index]``, or refuse saying why it is not one."""
        value = node.inputs[index] if index < len(node.inputs) else None
        if value is None:
            raise _Refused(f"{node.op_type} {role} input is missing")
        if not value.is_initializer() or value.const_value is None:
            raise _Refused(f"{node.op_type} {role} '{value.name}' is not a constant initializer")
        if value.is_graph_input() and not self.trust_initializer_inputs:
            old_ir = " (IR < 4 model)" if self.model.ir_version < 4 else ""
            raise _Refused(
                f"parameter '{value.name}' is also a graph input{old_ir}, so it can be overridden at run time; "
                "if it never is, treat such inputs as constants (fold-export --constant-initializer-inputs, "
                "treat_initializer_inputs_as_constant=True) or re-save without them (strip_initializer_inputs)"
            )
        return value.const_value.numpy()

    def _optional_constant(self, node: ir.Node, index: int, role: str) -> np.ndarray | None:
        if index < len(node.inputs) and node.inputs[index] is not None:
            return self._constant(node, index, role)
        return None

    # -- into the preceding op ----------------------------------------------------------------

    def _into_preceding(self, bn: ir.Node, affine: _Affine) -> str:
        x = bn.inputs[0]
        producer = x.producer()
        if producer is None:
            raise _Refused(f"its input '{x.name}' is not produced by an op")
        op_type = producer.op_type
        if producer.domain not in _ONNX_DOMAINS or op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            raise _Refused(f"its input comes from {op_type}, not Conv, ConvTranspose, Gemm or MatMul")
        self._require_sole_use(x, bn, f"{op_type} output")
        if op_type == "Gemm":
            rewrite = self._gemm_then_bn(producer, affine)
        elif op_type == "MatMul":
            rewrite = self._matmul_then_bn(producer, affine)
        else:
            rewrite = self._conv_then_bn(producer, affine)
        return self._emit(producer, producer.inputs[0], rewrite, takes_output_of=bn)

    def _conv_then_bn(self, conv: ir.Node, affine: _Affine) -> _Rewrite:
        weight = self._constant(conv, 1, "weight")
        bias = self._optional_constant(conv, 2, "bias")
        group = conv.attributes.get_int("group", 1)
        if conv.op_type == "ConvTranspose":
            if weight.shape[0] % group:
                raise _Refused(f"ConvTranspose: {weight.shape[0]} input channels do not split into {group} groups")
            out_channels = weight.shape[1] * group
        else:
            out_channels = weight.shape[0]
        if out_channels != affine.channels:
            raise _Refused(f"{conv.op_type} has {out_channels} output channels, the BN {affine.channels}")
        if bias is not None and bias.shape != (out_channels,):
            raise _Refused(f"{conv.op_type} bias has shape {bias.shape}, not ({out_channels},)")
        new_weight = _scale_output_channels(conv.op_type, weight, affine.scale, group)
        new_bias = (0.0 if bias is None else bias.astype(np.float64)) * affine.scale + affine.shift
        return _Rewrite(conv.op_type, new_weight.astype(weight.dtype), new_bias.astype(weight.dtype),
                        _attributes_except(conv.attributes))

    def _gemm_then_bn(self, gemm: ir.Node, affine: _Affine) -> _Rewrite:
        b = self._constant(gemm, 1, "B")
        c = self._optional_constant(gemm, 2, "C")
        trans_b = gemm.attributes.get_int("transB", 0)
        if b.ndim != 2 or b.shape[0 if trans_b else 1] != affine.channels:
            raise _Refused(f"Gemm B of shape {b.shape} (transB={trans_b}) does not give {affine.channels} outputs")
        beta = gemm.attributes.get_float("beta", 1.0)
        column_scale = affine.scale[:, None] if trans_b else affine.scale[None, :]
        new_b = b.astype(np.float64) * column_scale
        new_c = (0.0 if c is None else beta * c.astype(np.float64)) * affine.scale + affine.shift
        return _Rewrite("Gemm", new_b.astype(b.dtype), new_c.astype(b.dtype),
                        _attributes_except(gemm.attributes, "beta"))

    def _matmul_then_bn(self, matmul: ir.Node, affine: _Affine) -> _Rewrite:
        weight = self._constant(matmul, 1, "weight (second input)")
        if weight.ndim != 2 or weight.shape[1] != affine.channels:
            raise _Refused(f"MatMul weight of shape {weight.shape} is not (K, {affine.channels})")
        rank = self._rank(matmul.inputs[0])
        if rank != 2:
            found = "unknown" if rank is None else f"{rank}-D"
            raise _Refused(
                f"MatMul input rank is {found}; the BN's channel axis 1 is the weight's output axis "
                "only for a 2-D (N, C) output"
            )
        new_weight = weight.astype(np.float64) * affine.scale[None, :]
        return _Rewrite("Gemm", new_weight.astype(weight.dtype), affine.shift.astype(weight.dtype), [])

    # -- into the following op ----------------------------------------------------------------

    def _into_following(self, bn: ir.Node, affine: _Affine) -> str:
        y = bn.outputs[0]
        if y.is_graph_output():
            raise _Refused(f"its output '{y.name}' is a graph output")
        uses = y.uses()
        if len(uses) != 1:
            raise _Refused(f"its output '{y.name}' feeds {len(uses)} inputs")
        consumer, index = uses[0]
        op_type = consumer.op_type
        if consumer.domain not in _ONNX_DOMAINS or op_type not in ("Conv", "Gemm", "Flatten", "Reshape"):
            raise _Refused(f"its output feeds {op_type}, not Conv, Gemm or Flatten/Reshape -> Gemm")
        if index != 0:
            raise _Refused(f"its output is input {index} of {op_type}, not the data input")
        if op_type == "Conv":
            rewrite = self._bn_then_conv(consumer, affine)
            target = self._emit(consumer, bn.inputs[0], rewrite, takes_output_of=consumer)
        elif op_type == "Gemm":
            rewrite = self._bn_then_gemm(consumer, affine, spatial_size=1)
            target = self._emit(consumer, bn.inputs[0], rewrite, takes_output_of=consumer)
        else:
            gemm, spatial_size = self._gemm_after_flatten(bn, consumer, affine.channels)
            rewrite = self._bn_then_gemm(gemm, affine, spatial_size=spatial_size)
            consumer.replace_input_with(0, bn.inputs[0])
            target = self._emit(gemm, gemm.inputs[0], rewrite, takes_output_of=gemm)
        self.graph.remove(bn, safe=True)
        return target

    def _bn_then_conv(self, conv: ir.Node, affine: _Affine) -> _Rewrite:
        pads = conv.attributes.get_ints("pads", ())
        auto_pad = conv.attributes.get_string("auto_pad", "NOTSET")
        if any(pads) or auto_pad not in ("NOTSET", "VALID"):
            raise _Refused(
                "the Conv pads its input with zeros, which would then skip the BN's shift "
                "(exact only without padding)"
            )
        weight = self._constant(conv, 1, "weight")
        bias = self._optional_constant(conv, 2, "bias")
        group = conv.attributes.get_int("group", 1)
        out_channels, in_per_group = weight.shape[:2]
        if in_per_group * group != affine.channels or out_channels % group:
            raise _Refused(f"Conv weight {weight.shape} with {group} groups does not read {affine.channels} channels")
        # Output channel o reads input channels of group o // (out_channels / group).
        group_of_output = np.arange(out_channels) // (out_channels // group)
        expand = (...,) + (None,) * (weight.ndim - 2)
        scale = affine.scale.reshape(group, in_per_group)[group_of_output][expand]
        shift = affine.shift.reshape(group, in_per_group)[group_of_output][expand]
        w = weight.astype(np.float64)
        new_bias = (w * shift).sum(axis=tuple(range(1, w.ndim)))
        if bias is not None:
            new_bias += bias.astype(np.float64)
        return _Rewrite("Conv", (w * scale).astype(weight.dtype), new_bias.astype(weight.dtype),
                        _attributes_except(conv.attributes))

    def _gemm_after_flatten(self, bn: ir.Node, reshape: ir.Node, channels: int) -> tuple[ir.Node, int | None]:
        """The Gemm fed by a Flatten/Reshape that keeps the batch axis, and the spatial size if known."""
        dims = self._dims(bn.inputs[0])
        spatial_size = math.prod(dims[2:]) if dims is not None and None not in dims[2:] else None
        if reshape.op_type == "Flatten":
            axis = reshape.attributes.get_int("axis", 1)
            if axis < 0 and dims is not None:
                axis += len(dims)
            if axis != 1:
                raise _Refused(f"Flatten has axis {axis}, not 1")
        else:
            target = ir.convenience.get_const_tensor(reshape.inputs[1]) if len(reshape.inputs) > 1 else None
            shape = [] if target is None else [int(d) for d in target.numpy().reshape(-1)]
            if len(shape) != 2:
                raise _Refused("Reshape target is not a constant 2-D shape")
            features = None if spatial_size is None else channels * spatial_size
            keeps_batch = (
                (shape[0] == 0 and not reshape.attributes.get_int("allowzero", 0))
                or (features is not None and shape[1] == features)
                or (dims is not None and dims[0] is not None and shape[0] == dims[0])
            )
            if not keeps_batch:
                raise _Refused(f"Reshape to {shape} may not keep the batch axis")
        flat = reshape.outputs[0]
        uses = flat.uses()
        if flat.is_graph_output() or len(uses) != 1:
            raise _Refused(f"{reshape.op_type} output '{flat.name}' is a graph output or feeds several ops")
        gemm, index = uses[0]
        if gemm.op_type != "Gemm" or gemm.domain not in _ONNX_DOMAINS or index != 0:
            raise _Refused(f"{reshape.op_type} output feeds {gemm.op_type}, not Gemm's input A")
        return gemm, spatial_size

    def _bn_then_gemm(self, gemm: ir.Node, affine: _Affine, *, spatial_size: int | None) -> _Rewrite:
        if gemm.attributes.get_int("transA", 0):
            raise _Refused("Gemm has transA=1, so the BN's channels are not its input features")
        b = self._constant(gemm, 1, "B")
        c = self._optional_constant(gemm, 2, "C")
        trans_b = gemm.attributes.get_int("transB", 0)
        if b.ndim != 2:
            raise _Refused(f"Gemm B has shape {b.shape}, not 2-D")
        b_kn = b.astype(np.float64).T if trans_b else b.astype(np.float64)
        features = b_kn.shape[0]
        if spatial_size is None:
            spatial_size = features // affine.channels  # exact when the product check below holds
        if affine.channels * spatial_size != features:
            raise _Refused(f"Gemm takes {features} features, not {affine.channels} channels x {spatial_size}")
        # Flatten puts channel c's spatial positions at features c*spatial_size ... (c+1)*spatial_size-1.
        scale = np.repeat(affine.scale, spatial_size)
        shift = np.repeat(affine.shift, spatial_size)
        alpha = gemm.attributes.get_float("alpha", 1.0)
        beta = gemm.attributes.get_float("beta", 1.0)
        new_b = b_kn * scale[:, None]
        new_c = alpha * (shift @ b_kn)
        if c is not None:
            new_c = new_c + beta * c.astype(np.float64)
        return _Rewrite("Gemm", (new_b.T if trans_b else new_b).astype(b.dtype), new_c.astype(b.dtype),
                        _attributes_except(gemm.attributes, "beta"))

    # -- to Mul + Add -------------------------------------------------------------------------

    def _to_affine(self, bn: ir.Node, affine: _Affine) -> str:
        x = bn.inputs[0]
        elem_type, dims = self.types.get(x.name, (0, None))
        if dims is None or not elem_type:
            raise _Refused(f"the rank or type of its input '{x.name}' is unknown (shape inference gave none)")
        if len(dims) < 2:
            raise _Refused(f"its input '{x.name}' has rank {len(dims)}, below 2")
        if self.opset < 7:
            raise _Refused("opset < 7 has no broadcasting Mul/Add")
        dtype = ir.DataType(elem_type).numpy()
        broadcast = (affine.channels,) + (1,) * (len(dims) - 2)
        name = self.names[bn]
        scale = self._initializer(affine.scale.reshape(broadcast).astype(dtype), f"{name}_scale")
        shift = self._initializer(affine.shift.reshape(broadcast).astype(dtype), f"{name}_shift")
        mul = ir.Node("", "Mul", [x, scale], name=self._fresh_node_name(f"{name}_mul"))
        add = ir.Node("", "Add", [mul.outputs[0], shift], name=self._fresh_node_name(f"{name}_add"))
        self.graph.insert_before(bn, [mul, add])
        self._take_over_output(bn.outputs[0], add.outputs[0])
        self.graph.remove(bn, safe=True)
        return mul.name

    # -- graph edits --------------------------------------------------------------------------

    def _require_sole_use(self, value: ir.Value, user: ir.Node, what: str) -> None:
        if value.is_graph_output():
            raise _Refused(f"{what} '{value.name}' is also a graph output")
        others = sorted({self.names.get(u.node, u.node.op_type) for u in value.uses() if u.node is not user})
        if others:
            raise _Refused(f"{what} '{value.name}' also feeds {', '.join(others)}")

    def _emit(self, node: ir.Node, data: ir.Value, rewrite: _Rewrite, *, takes_output_of: ir.Node) -> str:
        """Replace ``node`` by ``rewrite`` reading ``data``; it produces ``takes_output_of``'s output."""
        weight_name = node.inputs[1].name
        has_bias = len(node.inputs) > 2 and node.inputs[2] is not None
        weight = self._initializer(rewrite.weight, weight_name)
        bias = self._initializer(rewrite.bias, node.inputs[2].name if has_bias else f"{weight_name}_bias")
        name = self.names[node]
        new = ir.Node(node.domain, rewrite.op_type, [data, weight, bias], attributes=rewrite.attributes, name=name)
        self.graph.insert_before(takes_output_of, new)
        self.displaced.extend(v for v in node.inputs[1:] if v is not None)
        self._take_over_output(takes_output_of.outputs[0], new.outputs[0])
        self.graph.remove({node, takes_output_of}, safe=True)
        self.names[new] = name
        return name

    def _take_over_output(self, old: ir.Value, new: ir.Value) -> None:
        """Point every user (graph outputs included) of ``old`` at ``new``, under ``old``'s name."""
        name, old_type, old_shape = old.name, old.type, old.shape
        old.replace_all_uses_with(new, replace_graph_outputs=True)
        old.name = None
        new.name = name
        new.type = old_type
        new.shape = old_shape

    def _initializer(self, array: np.ndarray, base: str) -> ir.Value:
        """A new initializer under a name not used anywhere in the graph."""
        base = re.sub(r"_bnfold(_\d+)?$", "", base or "bn") + "_bnfold"
        name, suffix = base, 0
        while name in self.value_names:
            suffix += 1
            name = f"{base}_{suffix}"
        self.value_names.add(name)
        value = ir.Value(
            name=name, type=ir.TensorType(ir.DataType.from_numpy(array.dtype)), shape=ir.Shape(array.shape),
            const_value=ir.tensor(array, name=name),
        )
        self.graph.register_initializer(value)
        # IR < 4 requires every initializer to be a graph input; IR 4 lets the new ones be constants.
        self.model.ir_version = max(self.model.ir_version, 4)
        return value

    def _fresh_node_name(self, base: str) -> str:
        name, suffix = base, 0
        while name in self.node_names:
            suffix += 1
            name = f"{base}_{suffix}"
        self.node_names.add(name)
        return name

    def _remove_displaced_initializers(self) -> None:
        for value in self.displaced:
            if value.is_initializer() and not value.uses() and not value.is_graph_output():
                self.graph.initializers.pop(value.name)
                if value.is_graph_input():  # only reached with trust_initializer_inputs
                    self.graph.inputs.remove(value)

    def _dims(self, value: ir.Value) -> tuple[int | None, ...] | None:
        return self.types.get(value.name, (0, None))[1]

    def _rank(self, value: ir.Value) -> int | None:
        dims = self._dims(value)
        return None if dims is None else len(dims)

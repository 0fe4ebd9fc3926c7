"""BN folding on ONNX graphs: the rulebook (:mod:`.rules`) over a view of an onnx_ir graph.

The view (:func:`_view`) normalises what the rules read: Flatten is a Reshape that keeps axis 0,
an inference Dropout is an Identity, Pad's pads (attribute or constant input, with ``axes``)
become ``{axis: (begin, end)}``, dims come from ONNX shape inference. The edits
(:class:`_Editor`) keep the graph valid: a removed node's output name survives on the value that
replaces it (so graph outputs keep their names), folded weights are new initializers with fresh
names (an initializer shared with other nodes is never changed in place), initializers a fold
left unused are removed. Only the main graph is folded; BNs in subgraphs (If/Loop/Scan bodies)
are reported and left alone. Needs no torch.
"""

from __future__ import annotations

import re

import numpy as np
import onnx
import onnx_ir as ir

from ..names import ONNX_DOMAINS, fresh_name, onnx_batchnorm_names
from ..onnx.view import constant_array, constant_source
from ..report import FoldDecision
from .graph import Graph, Node, Param
from .planner import plan
from .rules import TO_AFFINE

__all__ = ["fold_onnx", "strip_initializer_inputs", "op_counts"]

def fold_onnx(
    model: onnx.ModelProto,
    *,
    bn_to_affine: bool = False,
    treat_initializer_inputs_as_constant: bool = False,
) -> tuple[onnx.ModelProto, list[FoldDecision]]:
    """Fold every foldable inference BatchNormalization; return the new model and decisions.

    ``model`` is not modified. There is one :class:`FoldDecision` per BatchNormalization node
    (named by :func:`bncal.names.onnx_batchnorm_names`, main graph first); a refused fold carries
    the reason. A BN is folded into its preceding op if possible, else into its following op,
    else (with ``bn_to_affine``) rewritten as Mul + Add. ``training_mode=1`` BNs are never touched.

    An initializer that is also a graph input (every initializer of an IR < 4 model) can be
    overridden at run time, so a fold that needs it is refused, unless
    ``treat_initializer_inputs_as_constant``; then the inputs that folding leaves unused are
    removed from the graph's inputs too (see also :func:`strip_initializer_inputs`).
    """
    names = onnx_batchnorm_names(model.graph)
    ir_model = ir.from_proto(model)
    main_nodes = list(ir_model.graph)
    view = _view(ir_model, _tensor_types(model), names, trust=treat_initializer_inputs_as_constant)
    steps = plan(view, bn_to_affine=bn_to_affine)
    editor = _Editor(ir_model, view)
    by_node = {step.bn.handle: editor.apply(step) for step in steps}
    editor.write_changed(view)
    editor.remove_displaced_initializers()
    folded = ir.to_proto(ir_model)
    _drop_added_initializer_value_info(folded, model)
    nested = "inside a subgraph; only the main graph is folded"
    return folded, [by_node[main_nodes[path[0]]] if len(path) == 1 else FoldDecision(name, None, None, nested)
                    for path, name in names.items()]


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


def op_counts(model) -> dict[str, int]:
    """Count the main graph's nodes by op type (``domain::op`` outside the default domain) of a
    ``ModelProto`` or an ``onnx_ir.Model``."""
    counts: dict[str, int] = {}
    for node in model.graph if isinstance(model, ir.Model) else model.graph.node:
        key = node.op_type if node.domain in ONNX_DOMAINS else f"{node.domain}::{node.op_type}"
        counts[key] = counts.get(key, 0) + 1
    return counts


def _drop_added_initializer_value_info(folded: onnx.ModelProto, original: onnx.ModelProto) -> None:
    """onnx_ir writes a value_info for every initializer; keep only those the input model had."""
    had = {info.name for info in original.graph.value_info}
    initializers = {init.name for init in folded.graph.initializer}
    kept = [info for info in folded.graph.value_info if info.name not in initializers or info.name in had]
    del folded.graph.value_info[:]
    folded.graph.value_info.extend(kept)


def _tensor_types(model: onnx.ModelProto) -> dict[str, tuple[int, tuple | None]]:
    """``name -> (elem_type, dims or None)`` from ONNX shape inference (symbolic dims as their
    names); empty if inference fails."""
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
            dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                         for d in tensor_type.shape.dim)
        types[info.name] = (tensor_type.elem_type, dims)
    return types


# --------------------------------------------------------------------------- the view

def _view(model: ir.Model, types, bn_names, *, trust: bool) -> Graph:
    graph = model.graph
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))

    def dims(value):
        return types.get(value.name, (0, None))[1] if value is not None else None

    def dtype(value):
        return _dtype_name(types.get(value.name, (0, None))[0]) if value is not None else None

    producers: dict[ir.Value, Node] = {
        value: Node("Input", value.name, value.name, [], shape=dims(value), dtype=dtype(value))
        for value in graph.inputs if not value.is_initializer()}
    taken = {n.name for n in ir.traversal.RecursiveGraphIterator(graph) if n.name}
    nodes = []
    for index, node in enumerate(graph):
        inputs, params = _inputs_and_params(node, producers, trust)
        out = node.outputs[0] if node.outputs else None
        if node.op_type == "BatchNormalization" and node.domain in ONNX_DOMAINS:
            name = bn_names[(index,)]
        else:
            name = node.name or fresh_name(f"{node.op_type}_{index}", taken, separator="_")
        op, attrs = _normalise(node, opset, dims)
        view_node = Node(op, name, out.name if out is not None else name, inputs, params, attrs,
                         shape=dims(out), dtype=dtype(out), graph_output=out is not None and out.is_graph_output(),
                         handle=node)
        producers.update((value, view_node) for value in node.outputs)
        nodes.append(view_node)
    nodes += _subgraph_users(graph, producers)
    return Graph(nodes, opset=opset, old_ir=model.ir_version < 4)


def _inputs_and_params(node: ir.Node, producers: dict, trust: bool) -> tuple[list, dict[int, Param]]:
    """Per input: the producing view node, or (for an initializer) None and a :class:`Param`."""
    inputs, params = [], {}
    for index, value in enumerate(node.inputs):
        constant = constant_source(value)  # initializers, Constant nodes, and either behind Identity chains
        if constant is not None:
            array = constant_array(constant)
            params[index] = Param(value.name, array, None if array is None else str(array.dtype),
                                  overridable=constant.is_graph_input() and not trust, handle=value)
            inputs.append(None)
        else:
            inputs.append(producers.get(value) if value is not None else None)
    return inputs, params


def _dtype_name(elem_type: int) -> str | None:
    try:
        return str(ir.DataType(elem_type).numpy()) if elem_type else None
    except (TypeError, ValueError):  # no numpy counterpart (e.g. strings)
        return None


def _subgraph_users(graph: ir.Graph, producers: dict) -> list[Node]:
    """Stand-ins for nodes inside subgraphs that read main-graph values (so those values count
    as used elsewhere)."""
    stand_ins = []
    for value, producer in producers.items():
        for user, _ in value.uses():
            if user.graph is not graph:
                stand_ins.append(Node("subgraph", f"subgraph node {user.name or user.op_type}", "", [producer]))
    return stand_ins


def _normalise(node: ir.Node, opset: int, dims) -> tuple[str, dict]:
    """The op type and attributes the rules read (see :mod:`.graph`)."""
    a, op = node.attributes, node.op_type
    if node.domain not in ONNX_DOMAINS:
        return f"{node.domain}::{op}", {}
    if op == "BatchNormalization":
        training_outputs = any(v is not None and (v.uses() or v.is_graph_output()) for v in node.outputs[1:])
        training = a.get_int("training_mode", 0) or (opset < 7 and not a.get_int("is_test", 0))
        return op, {"epsilon": a.get_float("epsilon", 1e-5), "training_mode": bool(training),
                    "spatial": a.get_int("spatial", 1), "training_outputs_used": training_outputs}
    if op in ("Conv", "ConvTranspose"):
        return op, {"group": a.get_int("group", 1), "pads": list(a.get_ints("pads", ())),
                    "auto_pad": a.get_string("auto_pad", "NOTSET")}
    if op == "Gemm":
        return op, {"alpha": a.get_float("alpha", 1.0), "beta": a.get_float("beta", 1.0),
                    "transA": a.get_int("transA", 0), "transB": a.get_int("transB", 0)}
    if op == "Transpose":
        rank = len(dims(node.inputs[0]) or ()) or None
        perm = a.get_ints("perm", None)
        return op, {"perm": list(perm) if perm is not None else (list(range(rank))[::-1] if rank else None)}
    if op == "Cast":
        return op, {"to": _dtype_name(a.get_int("to", 0))}
    if op == "Pad":
        return op, {"mode": a.get_string("mode", "constant"), "pads": _pads(node, opset, dims)}
    if op == "Dropout" and _is_inference_dropout(node, opset):
        return "Identity", {}
    if op == "Flatten":
        axis = a.get_int("axis", 1)
        rank = len(dims(node.inputs[0]) or ()) or None
        axis = axis + rank if axis < 0 and rank else axis
        return "Reshape", {"keeps_axis0": axis == 1, "rank": 2, "target": f"Flatten(axis={axis})"}
    if op == "Reshape":
        target = _constant_ints(node.inputs[1] if len(node.inputs) > 1 else None)
        keeps = target is not None and len(target) > 0 and target[0] == 0 and not a.get_int("allowzero", 0)
        return op, {"keeps_axis0": keeps, "rank": None if target is None else len(target), "target": target}
    return op, {}


def _constant_ints(value) -> list[int] | None:
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    return None if tensor is None else [int(d) for d in tensor.numpy().reshape(-1)]


def _pads(node: ir.Node, opset: int, dims) -> dict[int, tuple[int, int]] | None:
    """Pad's pads as ``{axis: (begin, end)}``, or None if they are not constant."""
    if opset < 11:
        pads = list(node.attributes.get_ints("pads", ())) or None
    else:
        pads = _constant_ints(node.inputs[1] if len(node.inputs) > 1 else None)
    if pads is None or len(pads) % 2:
        return None
    count = len(pads) // 2
    axes = _constant_ints(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else list(range(count))
    if axes is None or len(axes) != count:
        return None
    if any(axis < 0 for axis in axes):
        rank = len(dims(node.inputs[0]) or ())
        if not rank:
            return None
        axes = [axis % rank for axis in axes]
    return {axis: (pads[i], pads[i + count]) for i, axis in enumerate(axes) if pads[i] or pads[i + count]}


def _is_inference_dropout(node: ir.Node, opset: int) -> bool:
    mask = node.outputs[1] if len(node.outputs) > 1 else None
    if mask is not None and (mask.uses() or mask.is_graph_output()):
        return False
    if opset < 7:
        return bool(node.attributes.get_int("is_test", 0))
    training = node.inputs[2] if len(node.inputs) > 2 else None
    if training is None:
        return True
    value = ir.convenience.get_const_tensor(training)
    return value is not None and not bool(value.numpy().reshape(-1)[0])


# --------------------------------------------------------------------------- the edits

class _Editor:
    """Applies the planner's steps to the onnx_ir graph, in the planner's order."""

    def __init__(self, model: ir.Model, view: Graph):
        self.model, self.graph = model, model.graph
        self.value_names = set(ir.convenience.create_value_mapping(self.graph))
        self.node_names = {n.name for n in ir.traversal.RecursiveGraphIterator(self.graph) if n.name}
        self.node_names |= {n.name for n in view.nodes}
        self.displaced: list[ir.Value] = []  # initializers a fold stopped using
        self.dropped_attrs: dict[ir.Node, set[str]] = {}

    def apply(self, step) -> FoldDecision:
        name = step.bn.name
        if step.direction is None:
            return FoldDecision(name, None, None, step.reason)
        if step.direction == TO_AFFINE:
            return FoldDecision(name, self._to_affine(step), TO_AFFINE, step.reason)
        for node, data in step.bypassed:
            self._bypass(node.handle, data)
        self.dropped_attrs.setdefault(step.target.handle, set()).update(step.dropped_attrs)
        return FoldDecision(name, step.target.name, step.direction)

    def _bypass(self, node: ir.Node, data: int) -> None:
        source, out = node.inputs[data], node.outputs[0]
        if source.producer() is not None and all(user is node for user, _ in source.uses()) \
                and not source.is_graph_output():
            self._take_over_output(out, source)
        else:
            out.replace_all_uses_with(source)
        self.displaced.extend(v for i, v in enumerate(node.inputs) if i != data and v is not None)
        self.graph.remove(node, safe=True)

    def write_changed(self, view: Graph) -> None:
        """Emit each folded neighbour once, with its final (float64-computed) parameters."""
        for node in view.nodes:
            if not node.changed:
                continue
            old = node.handle
            weight, bias = node.params[1], node.params[2]
            dtype = np.dtype(weight.dtype)
            inputs = [old.inputs[0], self._initializer(weight.array.astype(dtype), weight.name),
                      self._initializer(bias.array.astype(dtype), bias.name)]
            drop = self.dropped_attrs.get(old, set())
            attributes = [] if node.op != old.op_type else [a for n, a in old.attributes.items() if n not in drop]
            new = ir.Node(old.domain, node.op, inputs, attributes=attributes, name=node.name)
            self.graph.insert_before(old, new)
            self.displaced.extend(v for v in old.inputs[1:] if v is not None)
            self._take_over_output(old.outputs[0], new.outputs[0])
            self.graph.remove(old, safe=True)

    def _to_affine(self, step) -> str:
        bn, (scale, shift) = step.bn.handle, step.scale_shift
        x, rank = bn.inputs[0], len(step.bn.inputs[0].shape)
        dtype = np.dtype(step.bn.inputs[0].dtype)
        broadcast = (scale.shape[0],) + (1,) * (rank - 2)
        name = step.bn.name
        scale_value = self._initializer(scale.reshape(broadcast).astype(dtype), f"{name}_scale")
        shift_value = self._initializer(shift.reshape(broadcast).astype(dtype), f"{name}_shift")
        mul = ir.Node("", "Mul", [x, scale_value], name=fresh_name(f"{name}_mul", self.node_names, separator="_"))
        add = ir.Node("", "Add", [mul.outputs[0], shift_value],
                      name=fresh_name(f"{name}_add", self.node_names, separator="_"))
        self.graph.insert_before(bn, [mul, add])
        self._take_over_output(bn.outputs[0], add.outputs[0])
        self.displaced.extend(v for v in bn.inputs[1:] if v is not None)
        self.graph.remove(bn, safe=True)
        return mul.name

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
        name = fresh_name(base, self.value_names, separator="_")
        value = ir.Value(name=name, type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                         shape=ir.Shape(array.shape), const_value=ir.tensor(array, name=name))
        self.graph.register_initializer(value)
        # IR < 4 requires every initializer to be a graph input; IR 4 lets the new ones be constants.
        self.model.ir_version = max(self.model.ir_version, 4)
        return value

    def remove_displaced_initializers(self) -> None:
        """Drop what folds left unused: initializers, Constant nodes, and Identity nodes that only passed one on."""
        pending = list(self.displaced)
        while pending:
            value = pending.pop()
            producer = value.producer()
            if producer is None or producer.graph is not self.graph or value.uses() or value.is_graph_output():
                continue
            if producer.op_type == "Identity":
                pending.append(producer.inputs[0])
                self.displaced.append(producer.inputs[0])
                self.graph.remove(producer, safe=True)
            elif producer.op_type == "Constant":
                self.graph.remove(producer, safe=True)
        for value in self.displaced:
            if value.is_initializer() and not value.uses() and not value.is_graph_output() \
                    and value.name in self.graph.initializers:
                self.graph.initializers.pop(value.name)
                if value.is_graph_input():  # only reached with treat_initializer_inputs_as_constant
                    self.graph.inputs.remove(value)

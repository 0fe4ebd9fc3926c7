"""The one reading of an ONNX model's BatchNormalization nodes that every ONNX path consumes.

``recalibrate``, ``check``, ``inspect`` and ``fold-export`` of an ONNX file all ask
:func:`find_batchnorms`, so they agree on which BNs exist, what each is called
(:func:`bncal.names.onnx_batchnorm_names`), what its parameters and moving statistics are, and
why one is left alone. The model is read through onnx_ir (``ir.from_proto`` wraps the
protobuf's tensors without copying them).

A parameter is *constant* (:func:`constant_source`) when it is an initializer, the output of a
``Constant`` node, or either of those behind a chain of ``Identity`` nodes. The chains matter:
the TorchScript exporter deduplicates equal initializers, so BNs whose statistics were never
updated (all 0, all 1) read one shared tensor through ``Identity`` nodes, often the scale or
shift of another BN. A reader that stops at the ``Identity`` calls them "not constant" and
misses that they were never updated.

Which BNs bncal handles (:attr:`BNInfo.skip_reason` is None): top-level BNs in inference mode
whose moving statistics are initializers (possibly shared, possibly behind ``Identity`` nodes).
The others are listed with the reason: exported from a frozen BN (:mod:`bncal.frozen`), training mode, statistics computed by a node, held in a
``Constant`` node, or a graph input without a default value, and BNs inside subgraphs (If/Loop
bodies). Their values are still read where they are constant, so ``inspect`` can judge them.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_ir as ir

from ..errors import BncalError
from ..frozen import FROZEN_IN_GRAPH, frozen_origin
from ..names import ONNX_DOMAINS, onnx_batchnorm_names

__all__ = ["BNInfo", "find_batchnorms", "constant_source", "constant_array", "as_ir", "default_opset",
           "node_attribute", "ONNX_DOMAINS", "TRAINING_MODE_OPSET"]

TRAINING_MODE_OPSET = 14  # the `training_mode` attribute appears in BatchNormalization-14


@dataclasses.dataclass(frozen=True)
class BNInfo:
    """One BatchNormalization node and the names bncal uses around it.

    ``name`` is its report name (see :func:`find_batchnorms`); ``node_index`` its index in the
    top-level graph (-1 for a BN inside a subgraph, which is only named and skipped).

    ``scale``, ``bias``, ``mean``, ``var`` are the node's input tensor names in the given model;
    ``mean_initializer``/``var_initializer`` the initializers holding its moving statistics
    (reached through Identity nodes if need be; possibly shared, see
    :func:`bncal.onnx.graphs.write_statistics`). ``skip_reason`` is None for a BN bncal
    handles, else why the BN is left as it is. ``momentum`` is the attribute as the file
    stores it (ONNX convention), None when absent; ``training_mode`` whether the node
    normalises with batch statistics. ``frozen_class`` names the frozen BatchNorm class torch's
    exporter says the node came from (:func:`bncal.frozen.frozen_origin`), else None. ``scale_value`` ... ``var_value`` are the constant
    values of its inputs (float64, flat; :func:`constant_source`), None where not constant.

    In a derived graph: ``mean_output``/``var_output`` (batch mean and biased variance of the
    BN's input, shape ``(channels,)``) and ``count_output`` (``Size`` of the input, int64
    scalar) are graph outputs when exposed; ``mean_feed``/``var_feed`` (and, in an anchored
    statistics graph, ``previous_mean_feed``/``previous_var_feed``) are the graph inputs
    that override the moving statistics (stats graph only).
    """

    name: str
    node_index: int
    input: str
    output: str
    channels: int
    epsilon: float
    scale: str
    bias: str
    mean: str
    var: str
    mean_initializer: str | None = None
    var_initializer: str | None = None
    skip_reason: str | None = None
    mean_output: str | None = None
    var_output: str | None = None
    count_output: str | None = None
    mean_feed: str | None = None
    var_feed: str | None = None
    previous_mean_feed: str | None = None
    previous_var_feed: str | None = None
    momentum: float | None = None
    training_mode: bool = False
    frozen_class: str | None = None
    scale_value: np.ndarray | None = dataclasses.field(default=None, compare=False, repr=False)
    bias_value: np.ndarray | None = dataclasses.field(default=None, compare=False, repr=False)
    mean_value: np.ndarray | None = dataclasses.field(default=None, compare=False, repr=False)
    var_value: np.ndarray | None = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def handled(self) -> bool:
        """True when bncal measures and may rewrite this BN's statistics."""
        return self.skip_reason is None


def as_ir(model: onnx.ModelProto | ir.Model) -> ir.Model:
    """``model`` as an onnx_ir model (a protobuf is wrapped; its tensors are not copied)."""
    return model if isinstance(model, ir.Model) else ir.from_proto(model)


def default_opset(model: onnx.ModelProto | ir.Model) -> int:
    """The version of the default (``ai.onnx``) operator set the model imports (0 if none)."""
    if isinstance(model, ir.Model):
        return int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0)))
    for entry in model.opset_import:
        if entry.domain in ONNX_DOMAINS:
            return int(entry.version)
    return 0


def node_attribute(node, name, default):
    """The value of attribute ``name`` of an ONNX node (protobuf or onnx_ir), or ``default``."""
    if isinstance(node, ir.Node):
        attr = node.attributes.get(name)
        if attr is None:
            return default
        value = attr.value
        return value.numpy() if isinstance(value, ir.TensorProtocol) else value
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def constant_source(value: ir.Value | None) -> ir.Value | None:
    """The value that holds ``value``'s constant data, else None.

    That is ``value`` itself when it is an initializer or a ``Constant`` node's output, or the
    first such value behind a chain of main-graph ``Identity`` nodes.
    """
    while value is not None:
        if value.is_initializer():
            return value
        producer = value.producer()
        if producer is None or producer.domain not in ONNX_DOMAINS:
            return None
        if producer.op_type == "Constant":
            return value if _constant_node_tensor(producer) is not None else None
        if producer.op_type != "Identity":
            return None
        value = producer.inputs[0]
    return None


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The constant data behind ``value`` (:func:`constant_source`) as a numpy array, else None
    (also for external data that was not loaded)."""
    source = constant_source(value)
    if source is None:
        return None
    tensor = source.const_value
    if tensor is None:
        producer = source.producer()
        tensor = _constant_node_tensor(producer) if producer is not None else None
    if tensor is None or isinstance(tensor, ir.ExternalTensor):
        return None
    return tensor.numpy()


def _constant_node_tensor(node: ir.Node):
    attr = node.attributes.get("value")
    return attr.value if attr is not None and isinstance(attr.value, ir.TensorProtocol) else None


def find_batchnorms(model: onnx.ModelProto | ir.Model) -> list[BNInfo]:
    """Every BatchNormalization node of ``model`` (top level first, then those in subgraphs).

    ``BNInfo.name`` is the report name of :func:`bncal.names.onnx_batchnorm_names` (node name,
    else first output name; ``#2``, ``#3`` for repeats; subgraph BNs prefixed by their owner),
    the name every command gives the node.

    Raises:
        BncalError: a handled BN's statistics are external data that was not loaded.
    """
    ir_model = as_ir(model)
    graph = ir_model.graph
    opset = default_opset(ir_model)
    nodes = list(graph)
    infos = []
    for path, name in onnx_batchnorm_names(graph).items():  # top level first, in graph order
        if len(path) == 1:
            infos.append(_describe(nodes[path[0]], path[0], name, opset))
        else:
            infos.append(BNInfo(name, -1, "", "", 0, 0.0, "", "", "", "", skip_reason=(
                "inside a subgraph (If/Loop/Scan body); only top-level BatchNorms are handled")))
    return infos


def _is_training_mode(node: ir.Node, opset: int) -> bool:
    if opset >= TRAINING_MODE_OPSET:
        return int(node_attribute(node, "training_mode", 0)) == 1
    return sum(1 for out in node.outputs if out.name) > 1


def _describe(node: ir.Node, index: int, name: str, opset: int) -> BNInfo:
    inputs = list(node.inputs) + [None] * (5 - len(node.inputs))
    x, scale, bias, mean, var = inputs[:5]
    values = [_flat(constant_array(v)) for v in (scale, bias, mean, var)]
    channels = next((v.size for v in values if v is not None), 0)
    momentum = node_attribute(node, "momentum", None)
    training = _is_training_mode(node, opset)
    info = BNInfo(name, index, _name(x), _name(node.outputs[0]), channels, float(node_attribute(node, "epsilon", 1e-5)),
                  _name(scale), _name(bias), _name(mean), _name(var), momentum=None if momentum is None else float(momentum),
                  training_mode=training, scale_value=values[0], bias_value=values[1], mean_value=values[2],
                  var_value=values[3])

    def skip(reason):
        return dataclasses.replace(info, skip_reason=reason)

    origin = frozen_origin(node)
    if origin is not None:
        return dataclasses.replace(info, frozen_class=origin[0], skip_reason=FROZEN_IN_GRAPH.format(cls=origin[0]))
    if training:
        return skip("already in training mode: it normalises with batch statistics and never uses moving ones")
    if x is None or mean is None or var is None:
        return skip("malformed node: an input is missing")
    sources = []
    for value, role in ((mean, "running mean"), (var, "running variance")):
        source, reason = _statistics_initializer(value, role)
        if reason:
            return skip(reason)
        sources.append(source)
    mean_size, var_size = (source.const_value.size for source in sources)
    if mean_size != var_size:
        return skip(f"its running mean has {mean_size} values but its running variance {var_size}")
    if any(isinstance(source.const_value, ir.ExternalTensor) for source in sources):
        raise BncalError(f"the statistics of BatchNorm {name} are stored as external data that is not loaded; "
                         "load the model with onnx.load(path) (load_external_data=True)")
    return dataclasses.replace(info, channels=int(mean_size), mean_initializer=sources[0].name,
                               var_initializer=sources[1].name)


def _statistics_initializer(value: ir.Value, role: str) -> tuple[ir.Value | None, str | None]:
    """``(initializer, None)`` when ``value`` is an initializer, possibly behind Identity nodes
    (shared or not), else ``(None, reason)``: what bncal can rewrite in place."""
    source = constant_source(value)
    if source is not None and source.is_initializer():
        return source, None
    if source is not None:
        return None, f"its {role} comes from a Constant node; turn Constant nodes into initializers first"
    origin = value
    while origin.producer() is not None and origin.producer().op_type == "Identity":
        origin = origin.producer().inputs[0]
    producer = origin.producer()
    if producer is not None:
        return None, f"its {role} is computed by a {producer.op_type} node, not stored in an initializer"
    if origin.is_graph_input():
        return None, (f"its {role} is the graph input {origin.name!r}, which has no initializer; "
                      "store the statistics as initializers")
    return None, f"its {role} {origin.name!r} is not defined in the graph"


def _name(value: ir.Value | None) -> str:
    return "" if value is None else (value.name or "")


def _flat(array: np.ndarray | None) -> np.ndarray | None:
    return None if array is None else np.asarray(array, np.float64).reshape(-1)

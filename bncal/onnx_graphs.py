"""Graphs derived from an inference ONNX model for measuring BatchNorm statistics in onnxruntime.

The model given is never mutated; each function returns a modified copy and one
:class:`BNInfo` per top-level ``BatchNormalization`` node.

:func:`make_train_graph` makes every inference BN normalise with the batch's own mean and
biased variance, like a PyTorch BN in train mode, and :func:`make_stats_graph` keeps every BN
in inference mode (its moving mean and variance become graph inputs, defaulting to the model's
values, so one session serves every pass of an eval-mode recalibration, fed new statistics
per run) and exposes the batch mean and biased variance of its input. Both expose, per BN,
``Size(X)`` as an int64 scalar: the number of values per channel is ``Size(X) / channels``,
which changes with the spatial size of each batch. The batch statistics come in one of two
forms (:data:`FORMS`), the same numbers to float32 rounding:

- ``"batchnorm"``: the training form of the op itself::

      BatchNormalization(X, scale, B, zeros, ones, training_mode=1, momentum=0)
          -> Y, running_mean, running_var

  Its statistics outputs are ``input_mean * momentum + batch_mean * (1 - momentum)`` (ONNX
  spec; onnxruntime's CPU kernel uses the biased variance), i.e. exactly the batch mean and
  biased variance at momentum 0: the reduction the op does anyway yields the statistics. The
  moving statistics fed to it are multiplied by 0 only, so they are replaced by zeros and
  ones, which keeps a NaN/Inf in stale statistics out (0 * inf = nan). Opsets 9-13 have no
  ``training_mode`` attribute; there a BN with five outputs is the training form. The stats
  graph adds such a BN beside the inference one and discards its ``Y``. onnxruntime's CUDA
  provider lacks this op from opset 14 on (onnxruntime issue 16867).
- ``"arithmetic"``: ``ReduceMean``, ``Sub``, ``ReduceSumSquare`` and ``Div`` compute the
  statistics in two passes (mean, then squared deviations; see :class:`_ArithmeticStatistics`),
  in float64, and the train graph's BN stays an inference BatchNormalization fed them. Every
  execution provider implements these ops (CUDA, TensorRT, OpenVINO, DirectML; a provider
  without float64 hands those few nodes to the next provider in the list).

Both keep the model's opset imports (the arithmetic ops are written for the model's own
opset: ``ReduceMean``'s ``axes`` moved from attribute to input in opset 18).
:func:`bncal.runtime.statistics_form` picks the form for a session's providers.

No faster exact form was found for onnxruntime's CPU provider (1.32). Its NCHWc transformer
(``onnxruntime/core/optimizer/nchwc_transformer.cc``) keeps the blocked layout only through
Conv and BatchNormalization with constant parameters, pools, Relu/Sigmoid/Tanh, and
Add/Sum/Mul/Concat whose inputs are all blocked and of one shape; a normalisation with
per-channel values computed in the graph therefore runs in NCHW, between a reorder out of
and one back into the blocked layout, with the Add+Relu it would fuse left apart. That
alone, with no statistics computed (the ``normalisation floor`` rows of
``tools/bench_onnx_recalibrate.py``), cost 1.06-1.13x inference at 1 intra-op thread and
1.17-1.28x at 2 on its ResNet-style net, the ``"batchnorm"`` form 1.18-1.21x and 1.25-1.41x.
Statistics cheaper than the op's two single-threaded passes are not exact: float32
``ReduceSumSquare`` over 131,072 values per channel was 2.6e-5 off (relative), per-sample
``GlobalAveragePool`` sums 2.5e-6 sd, and ``E[x^2] - E[x]^2`` cancels. Writing onnxruntime's
private ``com.microsoft.nchwc`` ops into the graph (each BN as the depthwise NCHWc Conv the
transformer makes of it, fed weights computed from moments taken by its NCHWc
GlobalAveragePool, float64 across samples) keeps the layout and agreed with the op to 6e-7
there, but took 1.17x and 1.29x where the ``"batchnorm"`` form took 1.19x and 1.29x: no
gain worth ops internal to onnxruntime and specific to the CPU's block size (and those
per-sample sums are the imprecise ones above at large spatial sizes).

:func:`write_statistics` puts new moving statistics into a copy of the model, changing only
the initializers that hold them, except where a BN shares its statistics tensor with another
node. The TorchScript exporter deduplicates equal initializers, so BNs whose statistics were
never updated (all 0 / all 1) read them through ``Identity`` nodes from one shared tensor, or
share them with a BN's scale. Such a BN gets its own initializer: the ``Identity`` node that
fed it is replaced by an initializer of the same name (the BN's inputs keep their names), or,
when the tensor itself is shared, a new initializer is added and the BN reads that. Each such
change is returned as a note.

BNs that are left exactly as they are (``BNInfo.skip_reason`` says why): BNs already in
training mode, BNs whose moving statistics are not initializers (computed by a node, a
Constant node, a graph input without a default value), and BNs inside subgraphs (If/Loop
bodies).
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import BncalError
from .frozen import FROZEN_IN_GRAPH, frozen_origin
from .names import fresh_name, onnx_batchnorm_names, subgraphs

__all__ = ["BNInfo", "FORMS", "find_batchnorms", "make_train_graph", "make_stats_graph", "write_statistics",
           "default_opset"]

_MIN_OPSET = 9  # BatchNormalization-9 is the first without `spatial`/`is_test` and with a training form
_TRAINING_MODE_OPSET = 14  # the `training_mode` attribute appears in BatchNormalization-14
_PREFIX = "bncal."
FORMS = ("batchnorm", "arithmetic")  # how derived graphs compute batch statistics, see make_train_graph


@dataclasses.dataclass(frozen=True)
class BNInfo:
    """One BatchNormalization node and the names bncal uses around it.

    ``name`` is its report name (see :func:`find_batchnorms`); ``node_index`` its index in the
    top-level graph (-1 for a BN inside a subgraph, which is only named and skipped).

    ``scale``, ``bias``, ``mean``, ``var`` are the node's input tensor names in the given model;
    ``mean_initializer``/``var_initializer`` the initializers holding its moving statistics
    (reached through Identity nodes if need be; possibly shared, see :func:`write_statistics`).
    ``skip_reason`` is None for a BN bncal handles, else why the BN is left as it is.

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

    @property
    def handled(self) -> bool:
        """True when bncal measures and may rewrite this BN's statistics."""
        return self.skip_reason is None


def default_opset(model: onnx.ModelProto) -> int:
    """The version of the default (``ai.onnx``) operator set the model imports (0 if none)."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return 0


def find_batchnorms(model: onnx.ModelProto) -> list[BNInfo]:
    """Every BatchNormalization node of ``model`` (top level first, then those in subgraphs).

    ``BNInfo.name`` is the report name of :func:`bncal.names.onnx_batchnorm_names` (node name,
    else first output name; ``#2``, ``#3`` for repeats; subgraph BNs prefixed by their owner),
    the name every command gives the node.

    Top-level BNs in inference mode whose moving statistics are initializers (possibly shared,
    possibly behind Identity nodes) are ``handled``; the others carry a ``skip_reason``.
    """
    graph = model.graph
    opset = default_opset(model)
    initializers = {init.name: init for init in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output if out}
    graph_inputs = {info.name for info in graph.input}

    infos = []
    for path, name in onnx_batchnorm_names(graph).items():  # top level first, in graph order
        if len(path) == 1:
            infos.append(_describe_bn(graph.node[path[0]], path[0], name, opset, initializers, producers,
                                      graph_inputs))
        else:
            infos.append(BNInfo(name, -1, "", "", 0, 0.0, "", "", "", "", skip_reason=(
                "inside a subgraph (If/Loop/Scan body); only top-level BatchNorms are handled")))
    return infos


def make_train_graph(model: onnx.ModelProto, *, expose_stats: bool = False, keep_model_outputs: bool = True,
                     form: str = "batchnorm") -> tuple[onnx.ModelProto, list[BNInfo]]:
    """A copy of ``model`` where every handled BN normalises with its batch statistics.

    ``expose_stats=True`` adds each handled BN's batch mean, biased variance and input size as
    graph outputs (names in the returned infos). ``keep_model_outputs=False`` (only with
    ``expose_stats``) keeps those as the only outputs and drops the nodes that only fed the
    model's own outputs (e.g. a classifier head after the last BN).

    ``form`` (see :data:`FORMS`) is how the batch statistics are computed: ``"batchnorm"``,
    the training-mode BatchNormalization op, or ``"arithmetic"``, plain ReduceMean/Sub/
    ReduceSumSquare/Div ops in float64 that every execution provider implements. Both compute
    the same numbers to float32 rounding.

    Raises:
        BncalError: the model's opset is older than 9.
    """
    _require_opset(model)
    _require_form(form)
    if not keep_model_outputs and not expose_stats:
        raise ValueError("keep_model_outputs=False needs expose_stats=True: the graph would have no outputs")
    infos = find_batchnorms(model)
    derived = _DerivedGraph(model)
    training_mode = default_opset(model) >= _TRAINING_MODE_OPSET
    result = []
    for info in infos:
        if not info.handled:
            result.append(info)
            continue
        node = derived.graph.node[info.node_index]
        dtype = derived.dtype_of(info.mean_initializer)
        if form == "batchnorm":
            zeros = derived.add_initializer(np.zeros(info.channels, dtype), f"{info.name}.zeros")
            ones = derived.add_initializer(np.ones(info.channels, dtype), f"{info.name}.ones")
            mean_out, var_out = derived.fresh(f"{info.name}.batch_mean"), derived.fresh(f"{info.name}.batch_var")
            _make_training_form(node, info, zeros, ones, mean_out, var_out, training_mode, derived)
            count_out = None
            if expose_stats:
                count_out = derived.fresh(f"{info.name}.size")
                derived.insert_after(info.node_index, helper.make_node(
                    "Size", [info.input], [count_out], name=derived.fresh(f"{info.name}.Size")))
        else:
            stats = _ArithmeticStatistics(derived, info, dtype)
            derived.replace(info.node_index, *stats.nodes, stats.normalise(node))
            mean_out, var_out, count_out = stats.mean, stats.var, stats.size
        if expose_stats:
            derived.add_stat_outputs(mean_out, var_out, count_out, dtype, info.channels)
            result.append(dataclasses.replace(info, mean_output=mean_out, var_output=var_out, count_output=count_out))
        else:
            result.append(info)
    derived.finish(keep_model_outputs)
    return derived.model, result


def make_stats_graph(model: onnx.ModelProto, *, keep_model_outputs: bool = True, anchored: bool = False,
                     form: str = "batchnorm") -> tuple[onnx.ModelProto, list[BNInfo]]:
    """A copy of ``model`` that computes the same outputs and exposes every handled BN's input statistics.

    Each handled BN still normalises with moving statistics, read from the graph inputs
    ``mean_feed``/``var_feed`` (shape ``(channels,)``, the statistics' dtype), which default
    to the model's values when not fed. Its input's batch mean, biased variance and size are
    the outputs ``mean_output``, ``var_output``, ``count_output``. ``keep_model_outputs=False``
    keeps only those outputs (and the nodes they need).

    With ``anchored=True`` each BN normalises each batch with
    :func:`bncal.stats.anchored_statistics` of the fed statistics, its input's batch
    statistics, and the same batch's input statistics in the previous pass, fed as
    ``previous_mean_feed``/``previous_var_feed`` (these must be fed for every batch).

    ``form`` is how the input statistics are computed, as for :func:`make_train_graph`; the
    BN itself stays an inference BatchNormalization in both forms.

    Raises:
        BncalError: the model's opset is older than 9.
    """
    _require_opset(model)
    _require_form(form)
    infos = find_batchnorms(model)
    derived = _DerivedGraph(model)
    training_mode = default_opset(model) >= _TRAINING_MODE_OPSET
    result = []
    for info in infos:
        if not info.handled:
            result.append(info)
            continue
        node = derived.graph.node[info.node_index]
        dtype = derived.dtype_of(info.mean_initializer)
        mean_feed = derived.add_initializer(derived.value_of(info.mean_initializer), f"{info.name}.running_mean",
                                            as_input=True)
        var_feed = derived.add_initializer(derived.value_of(info.var_initializer), f"{info.name}.running_var",
                                           as_input=True)
        node.input[3], node.input[4] = mean_feed, var_feed
        if form == "batchnorm":
            zeros = derived.add_initializer(np.zeros(info.channels, dtype), f"{info.name}.zeros")
            ones = derived.add_initializer(np.ones(info.channels, dtype), f"{info.name}.ones")
            mean_out, var_out = derived.fresh(f"{info.name}.batch_mean"), derived.fresh(f"{info.name}.batch_var")
            stats_node = onnx.NodeProto()
            stats_node.CopyFrom(node)
            stats_node.name = derived.fresh(f"{info.name}.stats")
            stats_node.output[0] = derived.fresh(f"{info.name}.unused_y")
            _make_training_form(stats_node, info, zeros, ones, mean_out, var_out, training_mode, derived)
            count_out = derived.fresh(f"{info.name}.size")
            stats_nodes = [stats_node, helper.make_node("Size", [info.input], [count_out],
                                                        name=derived.fresh(f"{info.name}.Size"))]
        else:
            stats = _ArithmeticStatistics(derived, info, dtype)
            mean_out, var_out, count_out, stats_nodes = stats.mean, stats.var, stats.size, stats.nodes
        previous = {}
        if anchored:
            previous = _anchor(derived, node, info, dtype, mean_feed, var_feed, mean_out, var_out)
            derived.insert_before(info.node_index, *stats_nodes, *previous.pop("nodes"))
        else:
            derived.insert_after(info.node_index, *stats_nodes)
        derived.add_stat_outputs(mean_out, var_out, count_out, dtype, info.channels)
        result.append(dataclasses.replace(info, mean_output=mean_out, var_output=var_out, count_output=count_out,
                                          mean_feed=mean_feed, var_feed=var_feed, **previous))
    derived.finish(keep_model_outputs)
    return derived.model, result


def _anchor(derived, node, info, dtype, mean_feed, var_feed, batch_mean, batch_var) -> dict:
    """Nodes computing :func:`bncal.stats.anchored_statistics` as the BN's mean and variance."""
    channels = info.channels
    previous_mean = derived.add_initializer(np.zeros(channels, dtype), f"{info.name}.previous_mean", as_input=True)
    previous_var = derived.add_initializer(np.ones(channels, dtype), f"{info.name}.previous_var", as_input=True)
    eps = derived.add_initializer(np.full(1, info.epsilon, dtype), f"{info.name}.eps")
    t = {k: derived.fresh(f"{info.name}.anchor_{k}") for k in
         ("shift", "mean", "batch_var_eps", "previous_var_eps", "ratio", "base_var_eps", "var_eps", "var")}
    nodes = [
        helper.make_node("Sub", [batch_mean, previous_mean], [t["shift"]]),
        helper.make_node("Add", [mean_feed, t["shift"]], [t["mean"]]),
        helper.make_node("Add", [batch_var, eps], [t["batch_var_eps"]]),
        helper.make_node("Add", [previous_var, eps], [t["previous_var_eps"]]),
        helper.make_node("Div", [t["batch_var_eps"], t["previous_var_eps"]], [t["ratio"]]),
        helper.make_node("Add", [var_feed, eps], [t["base_var_eps"]]),
        helper.make_node("Mul", [t["base_var_eps"], t["ratio"]], [t["var_eps"]]),
        helper.make_node("Sub", [t["var_eps"], eps], [t["var"]]),
    ]
    for n in nodes:
        n.name = derived.fresh(f"{info.name}.{n.op_type}")
    node.input[3], node.input[4] = t["mean"], t["var"]
    return {"nodes": nodes, "previous_mean_feed": previous_mean, "previous_var_feed": previous_var}


def write_statistics(model: onnx.ModelProto, statistics) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` whose BNs hold the given moving statistics; returns ``(model, notes)``.

    ``statistics`` maps BN names (:attr:`BNInfo.name`) to ``(mean, var)`` arrays of
    ``channels`` values; they are stored in the dtype and shape of the BN's current
    statistics. An initializer read by that BN alone is overwritten in place (name, dtype,
    dims, doc string and position kept); every other part of the model stays as it was. A
    shared statistics tensor is un-shared as described in the module docstring, with one
    note per change.
    """
    new = onnx.ModelProto()
    new.CopyFrom(model)
    infos = {info.name: info for info in find_batchnorms(new) if info.handled}
    unknown = [name for name in statistics if name not in infos]
    if unknown:
        raise KeyError(f"no handled BatchNorm named {unknown[0]!r}")
    editor = _StatisticsEditor(new)
    slots = [(infos[name], slot, value) for name, (mean, var) in statistics.items()
             for slot, value in ((3, mean), (4, var))]
    # Identity-fed slots first: replacing those Identity nodes may leave the shared source
    # with a single reader, which can then keep its name and be written in place.
    pending = [s for s in slots if not editor.replace_identity(*s)]
    for info, slot, value in pending:
        editor.write(info, slot, value)
    editor.finish()
    return new, editor.notes


class _StatisticsEditor:
    """Writes statistics into a model copy, un-sharing shared statistics tensors (see write_statistics)."""

    def __init__(self, model):
        self.model, self.graph = model, model.graph
        self.initializers = {init.name: init for init in self.graph.initializer}
        self.producers = {out: i for i, node in enumerate(self.graph.node) for out in node.output if out}
        self.uses = _use_counts(self.graph)
        self.outputs = {out.name for out in self.graph.output}
        self.removed_nodes: set[int] = set()
        self.removed_initializers: set[str] = set()
        self.added: list[onnx.TensorProto] = []
        self.notes: list[str] = []
        self.taken = set(self.initializers) | set(self.producers) | {i.name for i in self.graph.input}

    def _root(self, info, slot):
        return info.mean_initializer if slot == 3 else info.var_initializer

    def _tensor(self, root, value, name):
        template = self.initializers[root]
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(template.data_type))
        return numpy_helper.from_array(np.asarray(value).astype(dtype).reshape(tuple(template.dims)), name)

    def replace_identity(self, info, slot, value) -> bool:
        """If the slot reads an Identity output read by nothing else, make that output an initializer."""
        node = self.graph.node[info.node_index]
        tensor = node.input[slot]
        index = self.producers.get(tensor)
        if tensor in self.initializers or index is None or self.uses[tensor] != 1:
            return False
        source = self.graph.node[index].input[0]
        self.removed_nodes.add(index)
        self.added.append(self._tensor(self._root(info, slot), value, tensor))
        self._release(source)
        role = "running mean" if slot == 3 else "running variance"
        self.notes.append(f"{info.name}: its {role} {tensor!r} was an Identity of the shared tensor {source!r}; "
                          f"it is now an initializer of its own")
        return True

    def write(self, info, slot, value):
        node = self.graph.node[info.node_index]
        tensor = node.input[slot]
        if tensor in self.initializers and self.uses[tensor] == 1:
            _overwrite(self.initializers[tensor], self._tensor(tensor, value, tensor))
            return
        name = fresh_name(f"{info.name}.{'running_mean' if slot == 3 else 'running_var'}", self.taken)
        self.added.append(self._tensor(self._root(info, slot), value, name))
        node.input[slot] = name
        self._release(tensor)
        role = "running mean" if slot == 3 else "running variance"
        self.notes.append(f"{info.name}: its {role} {tensor!r} is shared with other nodes; "
                          f"it now reads a new initializer {name!r}")

    def _release(self, tensor):
        """One reader of ``tensor`` is gone; drop the tensor (and what only fed it) once unread."""
        self.uses[tensor] -= 1
        if self.uses[tensor] > 0 or tensor in self.outputs:
            return
        if tensor in self.initializers:
            self.removed_initializers.add(tensor)
            return
        index = self.producers.get(tensor)
        node = None if index is None else self.graph.node[index]
        if node is not None and node.op_type == "Identity" and index not in self.removed_nodes:
            self.removed_nodes.add(index)
            self._release(node.input[0])

    def finish(self):
        graph = self.graph
        if self.removed_nodes:
            kept = [n for i, n in enumerate(graph.node) if i not in self.removed_nodes]
            _replace_repeated(graph.node, kept, onnx.NodeProto)
        if self.removed_initializers:
            gone = self.removed_initializers
            _replace_repeated(graph.initializer, [t for t in graph.initializer if t.name not in gone], onnx.TensorProto)
            _replace_repeated(graph.input, [i for i in graph.input if i.name not in gone], onnx.ValueInfoProto)
        graph.initializer.extend(self.added)
        if self.model.ir_version < 4:  # IR < 4 lists every initializer as a graph input
            for tensor in self.added:
                graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))


def _overwrite(tensor: onnx.TensorProto, new: onnx.TensorProto) -> None:
    """Replace the data of ``tensor`` in place, keeping its name, doc string and metadata."""
    doc = tensor.doc_string
    metadata = [onnx.StringStringEntryProto(key=e.key, value=e.value) for e in getattr(tensor, "metadata_props", [])]
    tensor.CopyFrom(new)
    tensor.doc_string = doc
    for entry in metadata:
        tensor.metadata_props.add().CopyFrom(entry)


def _replace_repeated(field, items, cls):
    copies = [cls() for _ in items]
    for copy, item in zip(copies, items):
        copy.CopyFrom(item)
    del field[:]
    field.extend(copies)


# ------------------------------------------------------------------------------------------------


def _require_form(form):
    if form not in FORMS:
        raise ValueError(f"form must be one of {', '.join(map(repr, FORMS))}, not {form!r}")


def _require_opset(model):
    opset = default_opset(model)
    if opset < _MIN_OPSET:
        raise BncalError(
            f"the model imports ONNX opset {opset}; bncal needs opset {_MIN_OPSET} or later for BatchNormalization's "
            "training form: convert it first with onnx.version_converter.convert_version(model, 15)")


def _use_counts(graph) -> Counter:
    """How many times each tensor name is read: node inputs, graph outputs, subgraph references."""
    uses = Counter()
    for node in graph.node:
        for name in node.input:
            if name:
                uses[name] += 1
        for name in _subgraph_references(node):
            uses[name] += 1
    for out in graph.output:
        uses[out.name] += 1
    return uses


def _subgraph_references(node) -> set[str]:
    """Every tensor name read inside ``node``'s subgraphs (outer-scope values included)."""
    names = set()
    for sub in subgraphs(node):
        for inner in sub.node:
            names.update(n for n in inner.input if n)
            names |= _subgraph_references(inner)
        names.update(out.name for out in sub.output)
    return names


def node_attribute(node, name, default):
    """The value of attribute ``name`` of an ONNX node, or ``default`` when it is absent."""
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def _is_training_mode(node, opset) -> bool:
    if opset >= _TRAINING_MODE_OPSET:
        return int(node_attribute(node, "training_mode", 0)) == 1
    return sum(1 for out in node.output if out) > 1


def _describe_bn(node, index, name, opset, initializers, producers, graph_inputs) -> BNInfo:
    inputs = list(node.input) + [""] * (5 - len(node.input))
    x, scale, bias, mean, var = inputs[:5]
    channels = 0
    for tensor in (mean, var, scale, bias):
        if tensor in initializers:
            channels = int(np.prod(initializers[tensor].dims))
            break
    info = BNInfo(name, index, x, node.output[0], channels, float(node_attribute(node, "epsilon", 1e-5)),
                  scale, bias, mean, var)

    def skip(reason):
        return dataclasses.replace(info, skip_reason=reason)

    if (origin := frozen_origin(node)) is not None:
        return skip(FROZEN_IN_GRAPH.format(cls=origin[0]))
    if _is_training_mode(node, opset):
        return skip("already in training mode: it normalises with batch statistics and never uses moving ones")
    if not (x and mean and var):
        return skip("malformed node: an input is missing")
    mean_init, reason = _resolve_initializer(mean, "running mean", initializers, producers, graph_inputs)
    if reason:
        return skip(reason)
    var_init, reason = _resolve_initializer(var, "running variance", initializers, producers, graph_inputs)
    if reason:
        return skip(reason)
    mean_size = int(np.prod(initializers[mean_init].dims))
    var_size = int(np.prod(initializers[var_init].dims))
    if mean_size != var_size:
        return skip(f"its running mean has {mean_size} values but its running variance {var_size}")
    if _external(initializers[mean_init]) or _external(initializers[var_init]):
        raise BncalError(f"the statistics of BatchNorm {name} are stored as external data that is not loaded; "
                         "load the model with onnx.load(path) (load_external_data=True)")
    return dataclasses.replace(info, channels=mean_size, mean_initializer=mean_init, var_initializer=var_init)


def _resolve_initializer(tensor, role, initializers, producers, graph_inputs):
    """``(initializer name, None)`` if ``tensor`` is an initializer, possibly behind Identity
    nodes (shared or not), else ``(None, reason)``."""
    name = tensor
    while True:
        if name in initializers:
            return name, None
        node = producers.get(name)
        if node is None:
            if name in graph_inputs:
                return None, (f"its {role} is the graph input {name!r}, which has no initializer; "
                              "store the statistics as initializers")
            return None, f"its {role} {name!r} is not defined in the graph"
        if node.op_type == "Identity" and node.domain in ("", "ai.onnx"):
            name = node.input[0]
            continue
        if node.op_type == "Constant":
            return None, f"its {role} comes from a Constant node; turn Constant nodes into initializers first"
        return None, f"its {role} is computed by a {node.op_type} node, not stored in an initializer"


def _external(tensor) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


class _ArithmeticStatistics:
    """The batch mean and biased variance of a BN's input from plain ops (form ``"arithmetic"``).

    The input ``X`` is viewed as ``(N, C, L)`` (``Reshape`` to ``[0, 0, -1]``, which needs
    neither its rank nor its spatial size), so the reduction axes are always ``[0, 2]``::

        size  = Size(X)                               int64, also the exposed count
        count = Cast(size / C, double)                values per channel
        X3d   = Cast(X3, double)
        mean  = ReduceMean(X3d, [0, 2])               (1, C, 1)
        var   = ReduceSumSquare(X3d - mean, [0, 2]) / count    two passes, as the training-mode op
        mean_output, var_output = Reshape(Cast(mean, dtype), [-1]), Reshape(Cast(var, dtype), [-1])

    The reductions run in float64 because onnxruntime sums float32 reductions one value after
    another: over the 50 x 784 values per channel of an MNIST batch the float32 variance was
    8e-5 off (relative), the training-mode op's 1e-7, the float64 one 1e-14; summing over the
    spatial axis first still left 9e-6 at 224 x 224. The cast costs a transient float64 copy of
    the BN's input; the outputs come back in the BN's dtype, as the training-mode op gives them.

    :meth:`normalise` gives the training-mode BN's output: the same BatchNormalization node
    in inference mode, fed these statistics, so the normalisation keeps the op's own float
    semantics and kernel (``(X - mean) / sqrt(var + eps) * scale + B``). Every op here exists
    in opset 9 and later in every execution provider; ``ReduceMean``/``ReduceSumSquare`` take
    their axes as an attribute before opset 18 and as an input from opset 18 on, so the graph
    keeps the model's own opset.
    """

    def __init__(self, derived, info, dtype):
        self.derived, self.info = derived, info
        name = derived.fresh
        x3, x3d, mean3d, deviation, sum_square, count, count_float, var3d, mean3, var3 = (
            name(f"{info.name}.{k}") for k in ("input_ncl", "input_ncl_double", "mean_ncl_double", "deviation",
                                               "sum_square", "count", "count_double", "var_ncl_double",
                                               "mean_ncl", "var_ncl"))
        double, own = onnx.TensorProto.DOUBLE, helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        self.size = name(f"{info.name}.size")
        self.mean, self.var = name(f"{info.name}.batch_mean"), name(f"{info.name}.batch_var")
        flat = derived.shared_constant(np.array([-1], np.int64), "shape_flat")
        channels = derived.shared_constant(np.array(info.channels, np.int64), f"channels_{info.channels}")
        self.nodes = [
            self._node("Size", [info.input], self.size),
            self._node("Div", [self.size, channels], count),
            self._node("Cast", [count], count_float, to=double),
            self._node("Reshape", [info.input, derived.shared_constant(np.array([0, 0, -1], np.int64), "shape_ncl")],
                       x3),
            self._node("Cast", [x3], x3d, to=double),
            self._reduce("ReduceMean", x3d, mean3d),
            self._node("Sub", [x3d, mean3d], deviation),
            self._reduce("ReduceSumSquare", deviation, sum_square),
            self._node("Div", [sum_square, count_float], var3d),
            self._node("Cast", [mean3d], mean3, to=own),
            self._node("Cast", [var3d], var3, to=own),
            self._node("Reshape", [mean3, flat], self.mean),
            self._node("Reshape", [var3, flat], self.var),
        ]

    def _node(self, op, inputs, output, **attributes):
        return helper.make_node(op, inputs, [output], name=self.derived.fresh(f"{self.info.name}.{op}"), **attributes)

    def _reduce(self, op, x, output):
        if self.derived.opset >= 18:
            axes = self.derived.shared_constant(np.array([0, 2], np.int64), "axes_nl")
            return self._node(op, [x, axes], output, keepdims=1)
        return self._node(op, [x], output, axes=[0, 2], keepdims=1)

    def normalise(self, node) -> onnx.NodeProto:
        """BN ``node`` (changed in place) in inference mode, normalising with these statistics."""
        node.input[3], node.input[4] = self.mean, self.var
        return node


def _make_training_form(node, info, zeros, ones, mean_out, var_out, training_mode, derived):
    """Rewrite ``node`` (in place) as the training-mode BN with momentum 0 described in the module docstring."""
    node.input[3], node.input[4] = zeros, ones
    outputs = [node.output[0], mean_out, var_out]
    if not training_mode:  # opset 9-13: the training form has the saved mean/inv-std outputs too
        outputs += [derived.fresh(f"{info.name}.saved_mean"), derived.fresh(f"{info.name}.saved_inv_std")]
    del node.output[:]
    node.output.extend(outputs)
    del node.attribute[:]
    node.attribute.append(helper.make_attribute("epsilon", info.epsilon))
    node.attribute.append(helper.make_attribute("momentum", 0.0))
    if training_mode:
        node.attribute.append(helper.make_attribute("training_mode", 1))


class _DerivedGraph:
    """A copy of a model being turned into a derived graph (internal to this module).

    The copy lists only real inputs as graph inputs (initializers that were also listed as
    inputs, as IR < 4 requires, become plain constants so onnxruntime can fold them) and has
    IR version 4 or later for that reason; the input model itself is never changed.
    """

    def __init__(self, model):
        self.model = onnx.ModelProto()
        self.model.CopyFrom(model)
        self.model.ir_version = max(self.model.ir_version, 4)
        self.graph = self.model.graph
        self.initializers = {init.name: init for init in self.graph.initializer}
        real_inputs = [i for i in self.graph.input if i.name not in self.initializers]
        del self.graph.input[:]
        self.graph.input.extend(real_inputs)
        self.taken = set(self.initializers) | {i.name for i in self.graph.input} | {o.name for o in self.graph.output}
        for node in self.graph.node:
            self.taken.update(node.output)
            self.taken.update(node.input)
            self.taken.add(node.name)
        self.opset = default_opset(model)
        self.constants = {}  # (dtype, values) -> name of a shared initializer
        self.replacements = {}  # node index -> nodes that take its place
        self.stat_outputs = []
        self.insertions = {}  # node index -> nodes to place right after it (keeps inputs' lifetimes short)
        self.insertions_before = {}  # node index -> nodes it needs, placed right before it

    def fresh(self, hint: str) -> str:
        return fresh_name(_PREFIX + hint, self.taken)

    def dtype_of(self, initializer: str) -> np.dtype:
        return np.dtype(helper.tensor_dtype_to_np_dtype(self.initializers[initializer].data_type))

    def value_of(self, initializer: str) -> np.ndarray:
        return numpy_helper.to_array(self.initializers[initializer]).reshape(-1)

    def add_initializer(self, value: np.ndarray, hint: str, *, as_input: bool = False) -> str:
        name = self.fresh(hint)
        self.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        if as_input:  # an input with an initializer of the same name: fed when given, else the default
            self.graph.input.append(helper.make_tensor_value_info(
                name, helper.np_dtype_to_tensor_dtype(value.dtype), list(value.shape)))
        return name

    def shared_constant(self, value: np.ndarray, hint: str) -> str:
        """An initializer holding ``value``, one per distinct value (read by several BNs)."""
        key = (value.dtype.str, value.shape, value.tobytes())
        if key not in self.constants:
            self.constants[key] = self.add_initializer(value, hint)
        return self.constants[key]

    def replace(self, index: int, *new_nodes):
        self.replacements[index] = list(new_nodes)

    def insert_after(self, index: int, *new_nodes):
        self.insertions.setdefault(index, []).extend(new_nodes)

    def insert_before(self, index: int, *new_nodes):
        self.insertions_before.setdefault(index, []).extend(new_nodes)

    def add_stat_outputs(self, mean_out, var_out, count_out, dtype, channels):
        elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        self.stat_outputs += [helper.make_tensor_value_info(mean_out, elem, [channels]),
                              helper.make_tensor_value_info(var_out, elem, [channels]),
                              helper.make_tensor_value_info(count_out, onnx.TensorProto.INT64, [])]

    def finish(self, keep_model_outputs: bool):
        nodes = []
        for index, node in enumerate(self.graph.node):
            nodes.extend(self.insertions_before.get(index, []))
            nodes.extend(self.replacements.get(index, [node]))
            nodes.extend(self.insertions.get(index, []))
        _replace_repeated(self.graph.node, nodes, onnx.NodeProto)
        if not keep_model_outputs:
            del self.graph.output[:]
        self.graph.output.extend(self.stat_outputs)
        _prune(self.graph)


def _prune(graph):
    """Drop nodes, initializers and value_info that no graph output depends on.

    This removes a BN's replaced statistics initializers (and Identity nodes in front of
    them), and with ``keep_model_outputs=False`` the layers after the last BN.
    """
    needed = {out.name for out in graph.output} | {i.name for i in graph.input}  # keep every feed valid
    unneeded = []
    for index in reversed(range(len(graph.node))):
        node = graph.node[index]
        if any(out in needed for out in node.output if out):
            needed.update(name for name in node.input if name)
            needed |= _subgraph_references(node)
        else:
            unneeded.append(index)
    for index in unneeded:  # in reverse order, so the indices still to delete stay valid
        del graph.node[index]
    _delete_unless(graph.initializer, lambda t: t.name in needed)
    _delete_unless(graph.value_info, lambda v: v.name in needed)


def _delete_unless(field, keep):
    """Delete the items of a repeated protobuf field that ``keep`` refuses, in place (the kept
    ones, weights included, are not copied)."""
    for index in reversed([i for i, item in enumerate(field) if not keep(item)]):
        del field[index]

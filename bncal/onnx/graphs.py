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
:func:`bncal.onnx.runtime.statistics_form` picks the form for a session's providers.

Why no faster exact form for onnxruntime's CPU provider: the study and its figures are in
``tools/bench_onnx_recalibrate.py``.

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
import onnx_ir as ir
from onnx import helper, numpy_helper

from ..errors import BncalError
from ..names import fresh_name, subgraphs
from .view import TRAINING_MODE_OPSET, BNInfo, default_opset, find_batchnorms

__all__ = ["BNInfo", "FORMS", "find_batchnorms", "make_train_graph", "make_stats_graph", "write_statistics",
           "default_opset"]

_MIN_OPSET = 9  # BatchNormalization-9 is the first without `spatial`/`is_test` and with a training form
_PREFIX = "bncal."
FORMS = ("batchnorm", "arithmetic")  # how derived graphs compute batch statistics, see make_train_graph


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
    derived, infos = derive_train_graph(model, expose_stats=expose_stats, keep_model_outputs=keep_model_outputs,
                                        form=form)
    return ir.to_proto(derived), infos


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
    derived, infos = derive_stats_graph(model, keep_model_outputs=keep_model_outputs, anchored=anchored, form=form)
    return ir.to_proto(derived), infos


def derive_train_graph(model: onnx.ModelProto, *, expose_stats: bool = False, keep_model_outputs: bool = True,
                       form: str = "batchnorm") -> tuple[ir.Model, list[BNInfo]]:
    """:func:`make_train_graph` as an ``onnx_ir.Model`` (its weights those of ``model``, not
    copied), for :func:`bncal.onnx.runtime.ort_session`."""
    if not keep_model_outputs and not expose_stats:
        raise ValueError("keep_model_outputs=False needs expose_stats=True: the graph would have no outputs")
    derived = _DerivedGraph.start(model, form)
    for info, bn, dtype in derived.handled_batchnorms():
        if form == "batchnorm":
            train = derived.training_form(bn, info, dtype)
            derived.graph.insert_before(bn, train)
            derived.take_over_output(bn.outputs[0], train.outputs[0])
            derived.graph.remove(bn, safe=True)
            mean, var = train.outputs[1], train.outputs[2]
            size = None
            if expose_stats:
                size_node = derived.node("Size", [train.inputs[0]], info, "size")
                derived.graph.insert_after(train, size_node)
                size = size_node.outputs[0]
        else:
            stats = _ArithmeticStatistics(derived, info, bn.inputs[0], dtype)
            derived.graph.insert_before(bn, stats.nodes)
            bn.replace_input_with(3, stats.mean)
            bn.replace_input_with(4, stats.var)
            mean, var, size = stats.mean, stats.var, stats.size
        if expose_stats:
            derived.expose(mean, var, size, dtype, info.channels)
            derived.infos.append(dataclasses.replace(info, mean_output=mean.name, var_output=var.name, count_output=size.name))
        else:
            derived.infos.append(info)
    return derived.finish(keep_model_outputs), derived.infos


def derive_stats_graph(model: onnx.ModelProto, *, keep_model_outputs: bool = True, anchored: bool = False,
                       form: str = "batchnorm") -> tuple[ir.Model, list[BNInfo]]:
    """:func:`make_stats_graph` as an ``onnx_ir.Model`` (its weights those of ``model``, not
    copied), for :func:`bncal.onnx.runtime.ort_session`."""
    derived = _DerivedGraph.start(model, form)
    for info, bn, dtype in derived.handled_batchnorms():
        x = bn.inputs[0]
        # Graph inputs with the model's statistics as defaults: fed per pass, else the model's.
        mean_feed = derived.initializer(derived.value_of(info.mean_initializer), f"{info.name}.running_mean",
                                        as_input=True)
        var_feed = derived.initializer(derived.value_of(info.var_initializer), f"{info.name}.running_var",
                                       as_input=True)
        bn.replace_input_with(3, mean_feed)
        bn.replace_input_with(4, var_feed)
        if form == "batchnorm":
            stats_bn = derived.training_form(bn, info, dtype, name=f"{info.name}.stats")
            size = derived.node("Size", [x], info, "size")
            stats_nodes = [stats_bn, size]
            mean, var, size = stats_bn.outputs[1], stats_bn.outputs[2], size.outputs[0]
        else:
            stats = _ArithmeticStatistics(derived, info, x, dtype)
            mean, var, size, stats_nodes = stats.mean, stats.var, stats.size, stats.nodes
        previous = {}
        if anchored:
            anchor_nodes, previous = _anchor(derived, bn, info, dtype, mean_feed, var_feed, mean, var)
            derived.graph.insert_before(bn, [*stats_nodes, *anchor_nodes])
        else:
            derived.graph.insert_after(bn, stats_nodes)
        derived.expose(mean, var, size, dtype, info.channels)
        derived.infos.append(dataclasses.replace(info, mean_output=mean.name, var_output=var.name, count_output=size.name,
                                          mean_feed=mean_feed.name, var_feed=var_feed.name, **previous))
    return derived.finish(keep_model_outputs), derived.infos


def _anchor(derived, bn, info, dtype, mean_feed, var_feed, batch_mean, batch_var) -> tuple[list, dict]:
    """Nodes computing :func:`bncal.stats.anchored_statistics` as ``bn``'s mean and variance
    (its inputs 3 and 4 are pointed at them), and the names of the two previous-pass feeds."""
    channels = info.channels
    previous_mean = derived.initializer(np.zeros(channels, dtype), f"{info.name}.previous_mean", as_input=True)
    previous_var = derived.initializer(np.ones(channels, dtype), f"{info.name}.previous_var", as_input=True)
    eps = derived.initializer(np.full(1, info.epsilon, dtype), f"{info.name}.eps")

    def op(op_type, a, b, hint):
        return derived.node(op_type, [a, b], info, f"anchor_{hint}")

    shift = op("Sub", batch_mean, previous_mean, "shift")
    mean = op("Add", mean_feed, shift.outputs[0], "mean")
    batch_var_eps = op("Add", batch_var, eps, "batch_var_eps")
    previous_var_eps = op("Add", previous_var, eps, "previous_var_eps")
    ratio = op("Div", batch_var_eps.outputs[0], previous_var_eps.outputs[0], "ratio")
    base_var_eps = op("Add", var_feed, eps, "base_var_eps")
    var_eps = op("Mul", base_var_eps.outputs[0], ratio.outputs[0], "var_eps")
    var = op("Sub", var_eps.outputs[0], eps, "var")
    bn.replace_input_with(3, mean.outputs[0])
    bn.replace_input_with(4, var.outputs[0])
    nodes = [shift, mean, batch_var_eps, previous_var_eps, ratio, base_var_eps, var_eps, var]
    return nodes, {"previous_mean_feed": previous_mean.name, "previous_var_feed": previous_var.name}


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

    The train graph feeds these statistics to the BN itself, kept in inference mode, so the
    normalisation keeps the op's own float semantics and kernel (``(X - mean) / sqrt(var +
    eps) * scale + B``). Every op here exists in opset 9 and later in every execution provider;
    ``ReduceMean``/``ReduceSumSquare`` take their axes as an attribute before opset 18 and as an
    input from opset 18 on, so the graph keeps the model's own opset.
    """

    def __init__(self, derived, info, x: ir.Value, dtype):
        self.derived, self.info = derived, info
        double, own = ir.DataType.DOUBLE.value, ir.DataType.from_numpy(np.dtype(dtype)).value
        flat = derived.shared_constant(np.array([-1], np.int64), "shape_flat")
        channels = derived.shared_constant(np.array(info.channels, np.int64), f"channels_{info.channels}")
        size = self._node("Size", [x], "size")
        count = self._node("Div", [size.outputs[0], channels], "count")
        count_double = self._node("Cast", [count.outputs[0]], "count_double", to=double)
        x3 = self._node("Reshape", [x, derived.shared_constant(np.array([0, 0, -1], np.int64), "shape_ncl")],
                        "input_ncl")
        x3d = self._node("Cast", [x3.outputs[0]], "input_ncl_double", to=double)
        mean3d = self._reduce("ReduceMean", x3d.outputs[0], "mean_ncl_double")
        deviation = self._node("Sub", [x3d.outputs[0], mean3d.outputs[0]], "deviation")
        sum_square = self._reduce("ReduceSumSquare", deviation.outputs[0], "sum_square")
        var3d = self._node("Div", [sum_square.outputs[0], count_double.outputs[0]], "var_ncl_double")
        mean3 = self._node("Cast", [mean3d.outputs[0]], "mean_ncl", to=own)
        var3 = self._node("Cast", [var3d.outputs[0]], "var_ncl", to=own)
        mean = self._node("Reshape", [mean3.outputs[0], flat], "batch_mean")
        var = self._node("Reshape", [var3.outputs[0], flat], "batch_var")
        self.nodes = [size, count, count_double, x3, x3d, mean3d, deviation, sum_square, var3d, mean3, var3, mean,
                      var]
        self.size, self.mean, self.var = size.outputs[0], mean.outputs[0], var.outputs[0]

    def _node(self, op, inputs, hint, **attributes):
        return self.derived.node(op, inputs, self.info, hint, **attributes)

    def _reduce(self, op, x, hint):
        if self.derived.opset >= 18:
            axes = self.derived.shared_constant(np.array([0, 2], np.int64), "axes_nl")
            return self._node(op, [x, axes], hint, keepdims=1)
        return self._node(op, [x], hint, axes=[0, 2], keepdims=1)


class _DerivedGraph:
    """An onnx_ir copy of a model being turned into a derived graph (internal to this module).

    The copy wraps the input's tensors without copying them, lists only real inputs as graph
    inputs (initializers that were also listed as inputs, as IR < 4 requires, become plain
    constants so onnxruntime can fold them) and has IR version 4 or later for that reason; the
    input model itself is never changed. Edits go through onnx_ir; :meth:`finish` ends with one
    remove-unused pass (:func:`_remove_unused`).
    """

    def __init__(self, model: onnx.ModelProto):
        self.model = ir.from_proto(model)
        self.model.ir_version = max(self.model.ir_version, 4)
        self.graph = graph = self.model.graph
        for value in [v for v in graph.inputs if v.is_initializer()]:
            graph.inputs.remove(value)
        self.nodes = list(graph)  # by node index, as BNInfo.node_index counts them
        self.taken = set(ir.convenience.create_value_mapping(graph)) | {n.name for n in graph if n.name}
        self.opset = default_opset(self.model)
        self.constants = {}  # (dtype, shape, bytes) -> a shared initializer
        self.exposed: list[ir.Value] = []  # statistics outputs, in BN order
        self.infos: list[BNInfo] = []  # every BN's, in graph order (see handled_batchnorms)

    @classmethod
    def start(cls, model: onnx.ModelProto, form: str) -> "_DerivedGraph":
        """The derived graph of ``model`` in statistics ``form``, once both are known to be usable."""
        _require_opset(model)
        _require_form(form)
        return cls(model)

    def handled_batchnorms(self):
        """``(info, BN node, statistics dtype)`` of each BN bncal handles, in graph order; the
        others' infos go to :attr:`infos` as they pass, where the caller adds each handled one's."""
        for info in find_batchnorms(self.model):
            if not info.handled:
                self.infos.append(info)
                continue
            yield info, self.nodes[info.node_index], self.dtype_of(info.mean_initializer)

    def fresh(self, hint: str) -> str:
        return fresh_name(_PREFIX + hint, self.taken)

    def dtype_of(self, initializer: str) -> np.dtype:
        return np.dtype(self.graph.initializers[initializer].const_value.dtype.numpy())

    def value_of(self, initializer: str) -> np.ndarray:
        return self.graph.initializers[initializer].const_value.numpy().reshape(-1)

    def node(self, op_type: str, inputs, info, hint: str, *, num_outputs: int = 1, **attributes) -> ir.Node:
        """A new node named after BN ``info``, its outputs given fresh names (not yet in the graph)."""
        node = ir.Node("", op_type, inputs, ir.convenience.convert_attributes(attributes), num_outputs=num_outputs,
                       name=self.fresh(f"{info.name}.{op_type}"))
        for i, output in enumerate(node.outputs):
            output.name = self.fresh(f"{info.name}.{hint}" + (f"_{i}" if i else ""))
        return node

    def training_form(self, bn: ir.Node, info, dtype, name: str | None = None) -> ir.Node:
        """A training-mode copy of ``bn`` at momentum 0, its outputs ``(Y, batch mean, biased
        batch variance[, saved mean, saved inverse std])`` (see the module docstring)."""
        training_mode = self.opset >= TRAINING_MODE_OPSET
        zeros = self.initializer(np.zeros(info.channels, dtype), f"{info.name}.zeros")
        ones = self.initializer(np.ones(info.channels, dtype), f"{info.name}.ones")
        attributes = {"epsilon": float(info.epsilon), "momentum": 0.0}
        if training_mode:
            attributes["training_mode"] = 1
        # Opsets 9-13 have no training_mode: there the form with five outputs is the training one.
        node = ir.Node(bn.domain, "BatchNormalization", [*bn.inputs[:3], zeros, ones],
                       ir.convenience.convert_attributes(attributes), num_outputs=3 if training_mode else 5,
                       name=self.fresh(name) if name else bn.name)
        for output, hint in zip(node.outputs, ("unused_y", "batch_mean", "batch_var", "saved_mean", "saved_inv_std")):
            output.name = self.fresh(f"{info.name}.{hint}")
        return node

    def take_over_output(self, old: ir.Value, new: ir.Value) -> None:
        """Point every user (graph outputs included) of ``old`` at ``new``, under ``old``'s name."""
        name, old_type, old_shape = old.name, old.type, old.shape
        old.replace_all_uses_with(new, replace_graph_outputs=True)
        old.name = None
        new.name, new.type, new.shape = name, old_type, old_shape

    def initializer(self, value: np.ndarray, hint: str, *, as_input: bool = False) -> ir.Value:
        """A new initializer; with ``as_input`` also a graph input (fed when given, else this value)."""
        name = self.fresh(hint)
        array = np.ascontiguousarray(value)
        tensor = ir.Value(name=name, type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                          shape=ir.Shape(array.shape), const_value=ir.tensor(array, name=name))
        self.graph.register_initializer(tensor)
        if as_input:
            self.graph.inputs.append(tensor)
        return tensor

    def shared_constant(self, value: np.ndarray, hint: str) -> ir.Value:
        """An initializer holding ``value``, one per distinct value (read by several BNs)."""
        key = (value.dtype.str, value.shape, value.tobytes())
        if key not in self.constants:
            self.constants[key] = self.initializer(value, hint)
        return self.constants[key]

    def expose(self, mean: ir.Value, var: ir.Value, size: ir.Value, dtype, channels: int) -> None:
        element = ir.TensorType(ir.DataType.from_numpy(np.dtype(dtype)))
        for value, value_type, shape in ((mean, element, [channels]), (var, element, [channels]),
                                         (size, ir.TensorType(ir.DataType.INT64), [])):
            value.type, value.shape = value_type, ir.Shape(shape)
        self.exposed += [mean, var, size]

    def finish(self, keep_model_outputs: bool) -> ir.Model:
        outputs = self.graph.outputs
        if not keep_model_outputs:
            outputs.clear()
        outputs.extend(self.exposed)
        _remove_unused(self.graph)
        return self.model


def _remove_unused(graph: ir.Graph) -> None:
    """Drop the nodes no graph output depends on, then the initializers nothing reads (graph
    inputs all stay, so every feed stays valid).

    This removes a BN's replaced statistics initializers (and Identity nodes in front of
    them), and with ``keep_model_outputs=False`` the layers after the last BN.
    """
    outputs = set(graph.outputs)
    for node in reversed(list(graph)):
        if not any(value in outputs or value.uses() for value in node.outputs):
            graph.remove(node, safe=True)
    inputs = set(graph.inputs)
    for name, value in list(graph.initializers.items()):
        if not value.uses() and value not in inputs and value not in outputs:
            del graph.initializers[name]

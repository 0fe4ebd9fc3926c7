"""The onnxruntime layer: every bncal command runs ONNX models through this module.

- :func:`ort_session`: a session with bncal's defaults (CPU unless told otherwise, CPU as the
  last resort, onnxruntime's log at errors only so the library prints nothing);
  :func:`resolve_providers` (names as the user writes them), :func:`available_providers`, and
  :func:`statistics_form`, the form of derived graph the providers get;
- :func:`input_specs`, :func:`batch_feeds`, :func:`validated_feeds`: user batches as feeds by
  input name, checked against the graph inputs; :func:`fixed_batch_size`;
- :func:`run` and :func:`run_onnx`: ``session.run`` with onnxruntime's errors as one line;
- :class:`StatisticsSession`: a derived graph of :mod:`bncal.onnx.graphs` (in the form
  :func:`statistics_form` picks) read as per-BN batch statistics and merged into
  :class:`~bncal.stats.ChannelMoments` (used by :func:`bncal.onnx.check.check_onnx` and
  :func:`bncal.onnx.recalibration.recalibrate_onnx`);
- :func:`measure_latency` and :func:`compare_latency`.

A batch is given as a ``{input name: array}`` dict (any key order), a tuple or list of arrays
in graph-input order, or a bare array for a single-input model; the first axis counts samples.
"""

from __future__ import annotations

import dataclasses
import re
import statistics
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

from ..calibration import one_value_error
from ..data import input_hint
from ..errors import BncalError, first_line
from ..names import fresh_name
from .graphs import derive_stats_graph, derive_train_graph
from .io import ir_session_parts, is_ir_model
from ..stats import StackedMoments

__all__ = [
    "ort_session", "resolve_providers", "available_providers", "providers_on_device", "statistics_form", "input_specs",
    "InputSpec", "batch_feeds", "validated_feeds", "first_floating", "fixed_batch_size", "static_batch_size", "run", "run_onnx",
    "StatisticsSession", "BatchStatistics", "measure_latency", "compare_latency", "latency_runs",
]

_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
_ORT_LOAD_ERRORS = (
    _ort_state.Fail, _ort_state.InvalidArgument, _ort_state.InvalidGraph, _ort_state.InvalidProtobuf,
    _ort_state.NoSuchFile, _ort_state.NotImplemented, _ort_state.RuntimeException,
)
_CPU = "CPUExecutionProvider"
_ERRORS_ONLY = 4  # onnxruntime logs only fatal errors: every error is raised (and reported once) anyway


# ------------------------------------------------------------------------------------------------
# Sessions


# Offered by onnxruntime's PyPI builds, first in its list, but it runs no node here (it calls
# remote endpoints): taking it for the first provider would pick the wrong form of graph.
_REMOTE_PROVIDERS = ("AzureExecutionProvider",)


def available_providers() -> list[str]:
    """The execution providers this onnxruntime offers that run graph nodes on this machine,
    in its order of preference (CPU last)."""
    return [p for p in ort.get_available_providers() if p not in _REMOTE_PROVIDERS]


def resolve_providers(names) -> list[str]:
    """Provider names as a user writes them (``cuda``, ``TensorRT``, ``CPUExecutionProvider``),
    as onnxruntime spells them, in the order given.

    A name matches a provider of :func:`available_providers` case-insensitively, with or
    without the ``ExecutionProvider`` suffix. BncalError names the unknown ones and lists the
    available ones.
    """
    available = available_providers()
    by_key = {}
    for provider in available:
        by_key[provider.lower()] = by_key[provider.lower().removesuffix("executionprovider")] = provider
    resolved, unknown = [], []
    for name in names:
        provider = by_key.get(str(name).strip().lower())
        if provider is None:
            unknown.append(str(name))
        elif provider not in resolved:
            resolved.append(provider)
    if unknown:
        raise BncalError(f"onnxruntime provider {', '.join(unknown)} is not available here "
                         f"(available: {', '.join(available)})")
    return resolved


def _provider_name(provider) -> str:
    return provider if isinstance(provider, str) else provider[0]


_DEVICE_ID_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider", "ROCMExecutionProvider",
                        "MIGraphXExecutionProvider", "DmlExecutionProvider")


def providers_on_device(providers, device_id: int) -> list:
    """``providers`` with every GPU provider that takes a ``device_id`` set to ``device_id``
    (one GPU per torchrun rank); the others, and providers given with options, as they are."""
    return [(p, {"device_id": str(device_id)}) if isinstance(p, str) and p in _DEVICE_ID_PROVIDERS else p
            for p in providers]


def statistics_form(providers=None) -> str:
    """The form of derived graph (:data:`bncal.onnx.graphs.FORMS`) for sessions on ``providers``.

    ``"batchnorm"`` (training-mode BatchNormalization) when the CPU provider comes first or
    alone: faster there (``tools/bench_onnx_recalibrate.py``; why no faster exact form was
    found: :mod:`bncal.onnx.graphs`). ``"arithmetic"`` when another
    provider comes first: CUDA lacks training-mode BatchNormalization from opset 14 on
    (onnxruntime issue 16867), and plain arithmetic runs on every provider. Remote providers
    (Azure) run no node, so they do not count as first.
    """
    local = [name for name in map(_provider_name, providers or []) if name not in _REMOTE_PROVIDERS]
    return "batchnorm" if not local or local[0] == _CPU else "arithmetic"


def ort_session(
    model,
    *,
    optimization_level: str = "basic",
    threads: int | None = None,
    providers: list | None = None,
) -> ort.InferenceSession:
    """An onnxruntime session for ``model`` (a proto, its serialized bytes, a path, or an
    ``onnx_ir.Model``, whose large weights are passed from their own memory) that logs errors only.

    ``optimization_level`` is ``"disable"``, ``"basic"``, ``"extended"`` or ``"all"``; ``threads``
    sets the intra-op thread count (None: onnxruntime's default). ``providers`` are tried in
    order, each a name or a ``(name, options)`` pair as onnxruntime takes them (e.g.
    ``("CUDAExecutionProvider", {"device_id": 1})``), with the CPU provider appended last when
    missing so that ops an accelerator lacks still run (default: CPU only); asking for one
    that this onnxruntime lacks (e.g. CUDA) is an error. Pass a path, not a proto, for a model
    over 2 GB. onnxruntime's own log is set to errors only: derived graphs deliberately list
    initializers as overridable inputs, which it would warn about, and the library prints
    nothing of its own accord.
    """
    if optimization_level not in _LEVELS:
        raise BncalError(f"unknown optimization level {optimization_level!r}; use one of {', '.join(_LEVELS)}")
    options = ort.SessionOptions()
    options.graph_optimization_level = _LEVELS[optimization_level]
    if optimization_level == "disable":
        # No repacked copy of the weights either (VGG-11: 3.5 s against 0.3 s to load), as written.
        options.add_session_config_entry("session.disable_prepacking", "1")
    options.log_severity_level = _ERRORS_ONLY
    if threads is not None:
        options.intra_op_num_threads = threads
    providers = list(providers or [])
    missing = [_provider_name(p) for p in providers if _provider_name(p) not in ort.get_available_providers()]
    if missing:
        raise BncalError(
            f"onnxruntime provider {', '.join(missing)} is not available here "
            f"(available: {', '.join(ort.get_available_providers())})"
        )
    if _CPU not in map(_provider_name, providers):
        providers.append(_CPU)
    keep_alive = None
    if is_ir_model(model):  # large weights passed from their own memory, not copied into protobuf
        proto, names, arrays = ir_session_parts(model)
        keep_alive = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]
        options.add_external_initializers(names, keep_alive)
        source = _unique_node_names(proto).SerializeToString()
    elif isinstance(model, onnx.ModelProto):
        source = _unique_node_names(model).SerializeToString()
    else:
        source = model if isinstance(model, bytes) else str(model)
    try:
        session = ort.InferenceSession(source, sess_options=options, providers=providers)
        session._bncal_external_initializers = keep_alive  # their memory must outlive the session
        return session
    except _ORT_LOAD_ERRORS as error:
        raise BncalError(f"onnxruntime cannot load the model: {first_line(error)}") from error


def _unique_node_names(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model``, or a copy whose repeated node names are made unique (``bn``, ``bn#2``).

    ONNX allows two nodes to share a name, onnxruntime refuses to load such a model; node
    names do not change what a model computes, so the copy runs the same graph.
    """
    def graphs(graph):
        yield graph
        for node in graph.node:
            for attr in node.attribute:
                for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else
                            attr.graphs if attr.type == onnx.AttributeProto.GRAPHS else []):
                    yield from graphs(sub)

    names = [node.name for g in graphs(model.graph) for node in g.node if node.name]
    if len(names) == len(set(names)):
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    taken = set(names)
    seen = set()
    for g in graphs(copy.graph):
        for node in g.node:
            if node.name in seen:
                node.name = fresh_name(node.name, taken, separator="#")
            elif node.name:
                seen.add(node.name)
    return copy


# ------------------------------------------------------------------------------------------------
# Feeds


class InputSpec(NamedTuple):
    """A graph input: name, numpy dtype, and shape (a dynamic dimension is its symbolic name or
    None; the whole shape is None when even the rank is unknown)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...] | None


def input_specs(model: onnx.ModelProto | str | Path) -> list[InputSpec]:
    """The graph inputs of ``model`` that are not initializers, in graph order."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    initializers = {init.name for init in model.graph.initializer}
    specs = []
    for info in model.graph.input:
        if info.name in initializers:
            continue
        if info.type.WhichOneof("value") != "tensor_type":
            raise BncalError(f"input {info.name!r} is not a tensor; only tensor inputs are supported")
        tensor_type = info.type.tensor_type
        dims = None  # rank unknown
        if tensor_type.HasField("shape"):
            dims = tuple(
                d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim
            )
        specs.append(InputSpec(info.name, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)),
                               dims))
    return specs


def batch_feeds(batch, names: list[str], index: int | None = None) -> dict:
    """``{input name: value}`` for one batch, in the order of ``names`` (the graph inputs).

    A dict must name every input and nothing else (any key order); a tuple or list holds one
    value per input, by position; anything else is the value of a single-input model's input.
    ``index`` names the batch in the error messages.
    """
    which = "the feeds" if index is None else f"batch {index}"
    if isinstance(batch, dict):
        missing = [n for n in names if n not in batch]
        unknown = [n for n in batch if n not in names]
        if missing or unknown:
            hint = "; pick the model's inputs out of each batch with --inputs KEY (library: inputs=)" if unknown else ""
            raise BncalError(f"{which} does not match the model's inputs {names}: "
                             f"missing {missing}, unknown {unknown}{hint}")
        return {name: batch[name] for name in names}
    if isinstance(batch, (tuple, list)):
        if len(batch) != len(names):
            labels = input_hint(batch) or (" (for (inputs, labels) data, give the inputs only: --inputs 0)"
                                           if len(batch) == len(names) + 1 else "")
            raise BncalError(f"{which} holds {len(batch)} values but the model has {len(names)} inputs {names}; "
                             "give one array per input, in that order, or a dict {input name: array}" + labels)
        return dict(zip(names, batch))
    if len(names) != 1:
        raise BncalError(f"{which} is a {type(batch).__name__}; the model has inputs {names}, so give each batch "
                         "as a dict {input name: array} or a tuple of arrays in that order")
    return {names[0]: batch}


def validated_feeds(batch, specs: list[InputSpec], index: int, remaining: int | None = None):
    """``(feeds, samples)`` for one batch: :func:`batch_feeds`, each value checked against its
    input (dtype, fixed dimensions, at least one sample, finite), cut to ``remaining`` samples.
    """
    feeds, size = {}, None
    for (name, value), spec in zip(batch_feeds(batch, [s.name for s in specs], index).items(), specs):
        value = np.asarray(value)
        if value.dtype != spec.dtype:
            pixels = (np.issubdtype(value.dtype, np.unsignedinteger) and np.issubdtype(spec.dtype, np.floating))
            raise BncalError(f"input {name!r}: expected dtype {spec.dtype}, got {value.dtype} in batch {index}; " + (
                input_hint(value, "dtype")[2:] if pixels else f"convert the data with .astype(np.{spec.dtype.name})"))
        if spec.shape is not None and (value.ndim != len(spec.shape) or any(
                isinstance(d, int) and d > 0 and d != got for d, got in zip(spec.shape, value.shape))):
            channels = spec.shape[1] if len(spec.shape) > 1 else None
            hint = (input_hint(value, f"to have {channels} channels, but got {value.shape[1]} channels")
                    if value.ndim == len(spec.shape) and channels in (1, 3) and value.shape[1] != channels else "")
            batch_only = value.ndim == len(spec.shape) and all(
                not (isinstance(d, int) and d > 0) or d == got for d, got in zip(spec.shape[1:], value.shape[1:]))
            if batch_only and isinstance(spec.shape[0], int) and spec.shape[0] > 0 and not hint:
                hint = (f"; the model's batch size is fixed at {spec.shape[0]}: give batches of {spec.shape[0]} "
                        f"(--batch-size {spec.shape[0]}, the default for file data with such a model)")
            raise BncalError(f"input {name!r}: expected shape {_format_shape(spec.shape)}, got {tuple(value.shape)} "
                             f"in batch {index}{hint}")
        if value.ndim == 0 or value.shape[0] == 0:
            raise BncalError(f"input {name!r} of batch {index} holds no samples (shape {tuple(value.shape)})")
        if remaining is not None and value.shape[0] > remaining:
            value = value[:remaining]
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            raise BncalError(f"input {name!r} of batch {index} contains NaN or Inf values; "
                             "clean or filter the data first")
        feeds[name] = value
        size = value.shape[0] if size is None else size
    return feeds, size


def _format_shape(shape) -> str:
    dims = [str(d) if isinstance(d, int) and d > 0 else (d or "?") for d in shape]
    return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"


def fixed_batch_size(specs) -> int | None:
    """The batch size a graph fixes (dim 0 of every input, all equal), or None if any input lets it vary."""
    sizes = {static_batch_size(s) for s in specs}
    return sizes.pop() if len(sizes) == 1 else None


def static_batch_size(spec) -> int | None:
    """Dim 0 of one graph input where the graph fixes it, else None."""
    return spec.shape[0] if spec.shape and isinstance(spec.shape[0], int) and spec.shape[0] > 0 else None


def first_floating(feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The batch's first floating input (else its first input): what identifies a batch
    (:class:`bncal.calibration.DataOrder`) and what its composition is judged on
    (:class:`bncal.calibration.BatchComposition`)."""
    values = list(feeds.values())
    return next((v for v in values if np.issubdtype(v.dtype, np.floating)), values[0])


# ------------------------------------------------------------------------------------------------
# Running


_ORT_NODE = re.compile(r"running (\S+) node\. Name:'([^']*)' Status Message: (.*)")


def describe_ort_error(error: BaseException, where: str = "") -> str:
    """One line for an onnxruntime failure: the node and its reason when onnxruntime names them."""
    match = _ORT_NODE.search(str(error))
    if match:
        op, node, reason = match.groups()
        return f"onnxruntime refused to run node '{node}' ({op}) of the ONNX graph{where}: {reason.strip()}"
    return f"onnxruntime failed{where}: {first_line(error)}"


def run(session: ort.InferenceSession, names: list[str], feeds: dict, *, index: int | None = None) -> list:
    """``session.run(names, feeds)`` with onnxruntime's errors as a one-line BncalError naming the batch."""
    try:
        return session.run(names, feeds)
    except Exception as error:  # onnxruntime raises its own exception types
        raise BncalError(describe_ort_error(error, "" if index is None else f" on batch {index}")) from error


def run_onnx(session_or_model, feeds) -> dict[str, np.ndarray]:
    """Run a session (or a model, in a fresh :func:`ort_session`) on one batch; outputs by name.

    ``feeds`` is a batch in any form :func:`batch_feeds` accepts.
    """
    session = session_or_model
    if not isinstance(session, ort.InferenceSession):
        session = ort_session(session)
    feeds = batch_feeds(feeds, [i.name for i in session.get_inputs()])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, run(session, names, feeds)))


@dataclasses.dataclass(frozen=True)
class BatchStatistics:
    """One BN's input on one batch: ``count`` values per channel, their mean and biased variance."""

    count: int
    mean: np.ndarray
    var: np.ndarray


class StatisticsSession:
    """A session of a derived graph (:func:`bncal.onnx.graphs.make_train_graph` with
    ``expose_stats=True``, or :func:`~bncal.onnx.graphs.make_stats_graph`), read as per-BN
    batch statistics.

    ``infos`` are the derived graph's :class:`~bncal.onnx.graphs.BNInfo` (those not handled are
    ignored); ``outputs`` names model outputs to fetch as well. Sessions run at optimisation
    level ``all`` (the derived graphs are never saved). :meth:`train_graph` and
    :meth:`stats_graph` derive the graph from a model in the form :func:`statistics_form`
    picks for the providers.
    """

    def __init__(self, model, infos, *, outputs: list[str] = (), providers=None):
        self.session = ort_session(model, optimization_level="all", providers=providers)
        self.infos = [info for info in infos if info.handled]
        self.outputs = list(outputs)
        self._names = self.outputs + [n for i in self.infos for n in (i.mean_output, i.var_output, i.count_output)]

    @classmethod
    def train_graph(cls, model: onnx.ModelProto, *, outputs: list[str] = (), providers=None,
                    form: str | None = None) -> "StatisticsSession":
        """The train graph of ``model`` (every BN normalising with its batch statistics);
        without ``outputs`` only the statistics are computed (the nodes after the last BN
        are dropped). ``form`` defaults to :func:`statistics_form` of ``providers``."""
        graph, infos = derive_train_graph(model, expose_stats=True, keep_model_outputs=bool(outputs),
                                          form=form or statistics_form(providers))
        return cls(graph, infos, outputs=outputs, providers=providers)

    @classmethod
    def stats_graph(cls, model: onnx.ModelProto, *, anchored: bool = False, providers=None,
                    form: str | None = None) -> "StatisticsSession":
        """The statistics graph of ``model`` (BNs normalising with fed statistics, see
        :func:`bncal.onnx.graphs.make_stats_graph`), statistics outputs only."""
        graph, infos = derive_stats_graph(model, keep_model_outputs=False, anchored=anchored,
                                          form=form or statistics_form(providers))
        return cls(graph, infos, providers=providers)

    def new_moments(self) -> StackedMoments:
        """Empty moments of every handled BN (by name, in ``infos`` order) for :meth:`collect`;
        ``.layers`` holds each BN's :class:`~bncal.stats.ChannelMoments`."""
        return StackedMoments({info.name: info.channels for info in self.infos})

    def collect(self, feeds: dict, index: int, moments: StackedMoments, *,
                single_value_fix: str | None = None) -> tuple[list, dict[str, BatchStatistics]]:
        """Run one batch, merge every BN's statistics into ``moments`` (from :meth:`new_moments`
        of this session or of one over the same BNs), all BNs in one vectorised update.

        Returns the fetched model outputs and each BN's :class:`BatchStatistics`. With
        ``single_value_fix`` a batch giving a BN fewer than 2 values per channel (train mode
        is undefined there) is refused, the message ending with that advice.
        """
        values = run(self.session, self._names, feeds, index=index)
        offset = len(self.outputs)
        means, variances, sizes = values[offset::3], values[offset + 1::3], values[offset + 2::3]
        counts = [int(size) // info.channels for size, info in zip(sizes, self.infos)]
        too_few = [(count, info) for count, info in zip(counts, self.infos) if count < 2]
        if single_value_fix is not None and too_few:
            count, info = too_few[0]
            raise one_value_error(index, single_value_fix, info.name, count)
        moments.add_batches(counts, means, variances)
        found = {info.name: BatchStatistics(count, mean, var)
                 for info, count, mean, var in zip(self.infos, counts, means, variances)}
        return values[:offset], found


# ------------------------------------------------------------------------------------------------
# Latency


def measure_latency(session: ort.InferenceSession, feeds: dict[str, np.ndarray], *, warmup: int = 3,
                    repeat: int = 20) -> dict[str, float]:
    """Wall-clock latency of ``session.run`` on ``feeds`` over ``repeat`` runs: ``{"median_ms", "min_ms",
    "max_ms", "times_ms"}`` (the last: every run, in order)."""
    if repeat < 1:
        raise BncalError(f"repeat must be at least 1, not {repeat}")
    names = [o.name for o in session.get_outputs()]
    for _ in range(warmup):
        run(session, names, feeds)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run(session, names, feeds)
        times.append((time.perf_counter() - start) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "times_ms": times}


def compare_latency(models: dict[str, onnx.ModelProto], feeds_by_batch: dict[int, dict[str, np.ndarray]], *,
                    optimization_level: str = "basic", rounds: int = 5) -> dict[str, dict[int, float]]:
    """Median latency (ms, 3 decimals) of each labelled model per batch size, ``{label: {batch: ms}}``
    (the median of :func:`latency_runs`)."""
    runs = latency_runs(models, feeds_by_batch, optimization_level=optimization_level, rounds=rounds)
    return {label: {batch: round(statistics.median(times), 3) for batch, times in by_batch.items()}
            for label, by_batch in runs.items()}


def latency_runs(models: dict[str, onnx.ModelProto], feeds_by_batch: dict[int, dict[str, np.ndarray]], *,
                 optimization_level: str = "basic", rounds: int = 5, repeat: int = 5) -> dict[str, dict[int, list[float]]]:
    """Every timed run (ms) of each labelled model per batch size, ``{label: {batch: [ms, ...]}}``.

    The models are measured in alternation, ``rounds`` times ``repeat`` runs each (after one
    warm-up run per round), so that machine noise hits them alike; all at the same
    ``optimization_level``. Their median and range are the figure and its spread.
    """
    if not feeds_by_batch:
        return {}
    sessions = {label: ort_session(model, optimization_level=optimization_level) for label, model in models.items()}
    out = {label: {} for label in sessions}
    for batch, feeds in feeds_by_batch.items():
        times = {label: [] for label in sessions}
        for _ in range(rounds):
            for label, session in sessions.items():
                times[label] += measure_latency(session, feeds, warmup=1, repeat=repeat)["times_ms"]
        for label in sessions:
            out[label][batch] = times[label]
    return out

"""Check a BatchNorm network against what is known about training and deploying BN.

:func:`inspect_model` takes a PyTorch module or an ONNX model and returns an
:class:`InspectReport`: one row per BN layer and a list of :class:`Finding` values, each with a
stable rule id, the evidence, and a fix. Nothing is printed; ``report.table()`` renders text
and :func:`bncal.report.to_jsonable` turns the report into JSON.

Rules (severity, trigger):

=====  ========  ===========================================================================
BN001  error     moving statistics never updated: running mean all 0 and running var all 1 (a Keras
                 renorm layer: moving stddev 1, i.e. variance 1 - epsilon); a warning for batch
                 renormalisation layers whose renorm averages never moved either: with r and d
                 unclipped in training the network was trained against exactly those values
BN002  error     degenerate statistics: a variance <= 0 or non-finite, a non-finite mean
BN003  warning   momentum 0 (PyTorch) / 1 (TF, ONNX): the moving statistics cannot change
BN004  warning   track_running_stats=False: inference normalises with each batch's statistics
BN005  error     ONNX BatchNormalization with training_mode=1 in a graph meant for inference
BN010  info/w.   momentum does not fit batch and dataset size (:func:`bncal.momentum.suggest_momentum`)
BN020  info      affine BN directly after a nonlinearity: scale/shift redundant with the next layer
BN021  warning   non-affine BN directly before a nonlinearity: scale/shift needed
BN030  warning   dropout upstream of a BN through non-BN ops (variance shift, Li et al. 2019)
BN040  info      batch size <= 32 per device: batch renormalisation (Ioffe 2017)
BN050  info      BN that cannot be folded, with the folding pass's reason
BN060  warning   ONNX: normalisation a converter lowered to arithmetic (:mod:`bncal.onnx_lowered`):
                 its statistics are folded into constants, no command can check or recalibrate them
=====  ========  ===========================================================================

A BN attribute the file does not carry is reported as absent, never as the ONNX default: an
ONNX BatchNormalization without ``momentum`` has ``momentum_absent`` set, both momenta None
(``absent`` in the table, null in JSON), and BN010 leaves it out (the notes say so).

The graph rules (BN020, BN021, BN030) look at producer/consumer relations. For PyTorch these
come from ``torch.fx`` (BN, dropout and activation modules kept as leaves); when tracing fails
the leaf modules are chained in execution order (if ``example_inputs`` are given) or in
registration order, and the report says so in its notes. For ONNX they come from the graph.
Shape-only ops (flatten, reshape, view, squeeze, transpose, identity) count as transparent when
deciding what is "directly" before or after a BN.
"""

from __future__ import annotations

import dataclasses
import re
from collections import deque
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from .errors import BncalError, one_line
from .extras import is_torch_module
from .frozen import FROZEN_NOTE
from .momentum import InverseDecayMomentum, format_momentum, suggest_momentum
from .onnx_view import node_attribute
from .report import FoldDecision, ReportDisplay, format_table, plural

__all__ = ["inspect_model", "inspect_graph", "InspectReport", "BNLayer", "Finding", "RULES",
           "RECALIBRATE_COMMAND", "Graph", "Node", "statistics_status"]

RECALIBRATE_COMMAND = "bncal recalibrate MODEL --data DATA -o OUT"

SEVERITIES = ("info", "warning", "error")

#: rule id -> (default severity, short title). Ids are stable; BN010's severity varies.
RULES = {
    "BN001": ("error", "moving statistics never updated"),
    "BN002": ("error", "degenerate moving statistics"),
    "BN003": ("warning", "momentum freezes the moving statistics"),
    "BN004": ("warning", "no moving statistics (track_running_stats=False)"),
    "BN005": ("error", "training-mode BatchNormalization in an inference graph"),
    "BN010": ("warning", "momentum does not fit batch and dataset size"),
    "BN020": ("info", "affine BN directly after a nonlinearity"),
    "BN021": ("warning", "non-affine BN directly before a nonlinearity"),
    "BN030": ("warning", "dropout upstream of a BN"),
    "BN040": ("info", "small batches: batch renormalisation"),
    "BN050": ("info", "BN cannot be folded"),
    "BN060": ("warning", "normalisation lowered to arithmetic by the converter"),
}

#: Window mismatch (factor) above which BN010 fires, and above which it is a warning.
MOMENTUM_INFO_FACTOR = 3.0
MOMENTUM_WARNING_FACTOR = 10.0
#: Per-device batch size at or below which batch renormalisation is suggested.
SMALL_BATCH = 32

PLAUSIBLE = "plausible"
NEVER_UPDATED = "never updated"
DEGENERATE = "degenerate"
NOT_TRACKED = "not tracked"
NOT_CONSTANT = "not constant"
FROZEN = "frozen"


@dataclasses.dataclass
class Finding:
    """One rule that fired: ``severity`` is ``"info"``, ``"warning"`` or ``"error"``."""

    rule_id: str
    severity: str
    layers: list[str]
    evidence: str
    fix: str


@dataclasses.dataclass
class BNLayer:
    """One BatchNorm layer as the inspection saw it.

    ``momentum_torch`` is None for PyTorch's cumulative average (``momentum=None``);
    ``momentum_tf`` is then None too. ``momentum_absent``: the file does not say (an ONNX
    BatchNormalization without a ``momentum`` attribute); both momenta are then None.
    ``stats`` is one of ``"plausible"``, ``"never updated"``, ``"degenerate"``, ``"not tracked"``
    (no running statistics) or ``"not constant"`` (ONNX statistics that are not initializers); ``stats_detail`` says why. ``fold`` is
    ``"into <target>"`` or ``"no: <reason>"`` when fold decisions were given.
    ``num_batches_tracked`` is PyTorch's counter (None where there is none, as in ONNX).
    ``renorm_averages_moved``: a Keras renorm layer whose ``renorm_mean``/``renorm_stddev`` (the
    averages its training forward normalised with) left their initial values (PyTorch's
    :mod:`bncal.nn` layers keep one set, the running statistics).
    ``frozen``: a frozen BN (torchvision's or timm's ``FrozenBatchNorm2d``): fixed statistics
    and affine that no training or recalibration changes; ``stats`` is then ``"frozen"``.
    ``momentum_zero_signal``: the statistics still hold their initial values although the counter
    says training ran batches (PyTorch counts batches even at momentum 0): the updates were
    discarded, i.e. the momentum was 0 during training, or the statistics were reset afterwards.
    """

    name: str
    type: str
    channels: int | None
    momentum_torch: float | None
    momentum_tf: float | None
    affine: bool
    track_running_stats: bool
    eps: float
    stats: str
    stats_detail: str | None = None
    fold: str | None = None
    training_mode: bool = False
    renorm: bool = False
    num_batches_tracked: int | None = None
    momentum_zero_signal: bool = False
    momentum_absent: bool = False
    renorm_averages_moved: bool = False
    frozen: bool = False


@dataclasses.dataclass(repr=False)
class InspectReport(ReportDisplay):
    """Result of :func:`inspect_model`: BN layers, findings (worst first) and notes.

    ``source`` is ``"pytorch"``, ``"onnx"`` or ``"keras"``; ``graph`` says where producer/consumer
    relations came from (``"torch.fx"``, ``"execution order"``, ``"module order"``, ``"onnx"``,
    or for Keras ``"keras functional"``, ``"keras sequential"``, ``"layer order"``).
    """

    source: str
    graph: str
    layers: list[BNLayer]
    findings: list[Finding]
    notes: list[str]

    def max_severity(self) -> str | None:
        """The worst severity among the findings, or None when there are none."""
        if not self.findings:
            return None
        return max((f.severity for f in self.findings), key=SEVERITIES.index)

    def by_rule(self, rule_id: str) -> list[Finding]:
        return [f for f in self.findings if f.rule_id == rule_id]

    def summary(self) -> str:
        """``onnx model, 7 BN layers: 1 error (BN001), 1 warning (BN030)``, or ``no findings``."""
        head = f"{self.source} model, {plural(len(self.layers), 'BN layer')}"
        if not self.findings:
            return head + ": no findings"
        parts = []
        for severity in reversed(SEVERITIES):
            ids = [f.rule_id for f in self.findings if f.severity == severity]
            if ids:
                parts.append(f"{plural(len(ids), severity)} ({', '.join(ids)})")
        return f"{head}: {', '.join(parts)}"

    def verdict_line(self, failed: bool) -> str:
        """``FAILED: onnx model, 7 BN layers: 1 error (BN001), ...; worst BN001 error: moving statistics
        never updated (0.1, 0.4 and 5 more)`` when ``failed`` (a finding at the strictness asked for);
        else the summary alone: inspection diagnoses, it verifies nothing, so it never says PASSED."""
        if not failed or not self.findings:
            return self.summary()
        worst = max(self.findings, key=lambda f: SEVERITIES.index(f.severity))
        layers = ", ".join(worst.layers[:2]) + (f" and {len(worst.layers) - 2} more" if len(worst.layers) > 2 else "")
        return f"FAILED: {self.summary()}; worst {worst.rule_id} {worst.severity}: {RULES[worst.rule_id][1]} ({layers})"

    def table(self) -> str:
        """The layer table, then one block per finding, then the notes."""
        rows = [(l.name, l.type, l.channels,
                 "-" if l.frozen else "absent" if l.momentum_absent else
                 "cumulative" if l.momentum_torch is None else l.momentum_torch,
                 "-" if l.frozen else "absent" if l.momentum_absent else l.momentum_tf, "yes" if l.affine else "no",
                 "yes" if l.track_running_stats else "no", l.eps,
                 l.stats + (f" ({l.num_batches_tracked} batches tracked)" if l.momentum_zero_signal else ""),
                 l.fold) for l in self.layers]
        text = format_table(rows, ["layer", "type", "channels", "momentum (torch)", "momentum (tf)",
                                   "affine", "running stats", "eps", "statistics", "fold"], name="layers")
        if self.findings:
            text += "\n"
            for f in self.findings:
                text += (f"\n{f.rule_id} {f.severity}: {RULES[f.rule_id][1]} ({', '.join(f.layers)})"
                         f"\n  {f.evidence}\n  fix: {f.fix}")
        else:
            text += "\n\nno findings"
        for note in self.notes:
            text += f"\nnote: {note}"
        return text


# ---------------------------------------------------------------------------------------------
# The graph every front end reduces to.

@dataclasses.dataclass
class Node:
    """``kind``: bn, act, dropout, pass (shape-only), linear (Conv, ConvTranspose, Gemm/MatMul,
    Linear/Dense: an op that can absorb a per-channel affine of its input), output, other.
    ``inputs[0]`` is the data.

    Every front end (PyTorch, ONNX, Keras in :mod:`bncal.keras`) reduces a model to these nodes
    and :class:`BNLayer` rows, and :func:`inspect_graph` runs the same rules on them.
    """

    key: str
    kind: str
    label: str
    inputs: list[str]
    layer: str | None = None  # BN layer name for kind "bn"


class Graph:
    def __init__(self, nodes: Iterable[Node]):
        self.nodes = {n.key: n for n in nodes}
        self.users: dict[str, list[str]] = {k: [] for k in self.nodes}
        for node in self.nodes.values():
            for src in node.inputs:
                if src in self.users:
                    self.users[src].append(node.key)

    def producer(self, key: str) -> Node | None:
        """The op feeding ``key``'s data input, looking through shape-only ops."""
        node = self.nodes[key]
        while node.inputs and node.inputs[0] in self.nodes:
            node = self.nodes[node.inputs[0]]
            if node.kind != "pass":
                return node
        return None

    def consumers(self, key: str) -> list[Node]:
        """Ops reading ``key``'s output, looking through shape-only ops."""
        found, queue, seen = [], deque(self.users[key]), set()
        while queue:
            user = queue.popleft()
            if user in seen:
                continue
            seen.add(user)
            node = self.nodes[user]
            if node.kind == "pass":
                queue.extend(self.users[user])
            else:
                found.append(node)
        return found

    def upstream_dropouts(self, key: str) -> list[Node]:
        """Dropout ops reaching ``key`` through any path that crosses no other BN."""
        found, queue, seen = [], deque(self.nodes[key].inputs), set()
        while queue:
            src = queue.popleft()
            if src in seen or src not in self.nodes:
                continue
            seen.add(src)
            node = self.nodes[src]
            if node.kind == "bn":
                continue
            if node.kind == "dropout":
                found.append(node)
            queue.extend(node.inputs)
        return found


def statistics_status(mean: np.ndarray, var: np.ndarray, counter: int | None) -> tuple[str, str | None]:
    bad_var = ~np.isfinite(var) | (var <= 0)
    if bad_var.any() or not np.isfinite(mean).all():
        parts = []
        if bad_var.any():
            parts.append(f"{int(bad_var.sum())} of {var.size} variances are zero, negative or non-finite")
        if not np.isfinite(mean).all():
            parts.append(f"{int((~np.isfinite(mean)).sum())} of {mean.size} means are non-finite")
        return DEGENERATE, "; ".join(parts)
    if np.all(mean == 0) and np.all(var == 1):
        detail = "running mean all 0 and running var all 1 (initial values)"
        if counter is not None:
            detail += f", num_batches_tracked {counter}"
        return NEVER_UPDATED, detail
    if counter == 0:
        # Statistics ported from another framework often come without the counter.
        return PLAUSIBLE, "num_batches_tracked is 0 but the statistics differ from their initial values"
    return PLAUSIBLE, None


# ---------------------------------------------------------------------------------------------
# ONNX front end.

_ONNX_ACTS = {"Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Gelu", "Sigmoid", "HardSigmoid",
              "HardSwish", "Tanh", "Softplus", "Softsign", "Mish", "ThresholdedRelu", "Clip"}
_ONNX_PASS = {"Flatten", "Reshape", "Identity", "Squeeze", "Unsqueeze", "Transpose"}
_ONNX_LINEAR = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


def _onnx_graph_and_layers(model) -> tuple[Graph, list[BNLayer]]:
    from .onnx_view import as_ir, constant_array, find_batchnorms

    ir_model = as_ir(model)
    # BN layers carry the report name every command uses (bncal.onnx_view); other nodes only need unique keys.
    infos = {info.node_index: info for info in find_batchnorms(ir_model) if info.node_index >= 0}
    graph_nodes = list(ir_model.graph)
    keys, producer_of = [], {}
    for i, node in enumerate(graph_nodes):
        key = node.name or f"{node.op_type}_{i}"
        if key in producer_of.values():
            key = f"{key}_{i}"
        keys.append(key)
        for out in node.outputs:
            producer_of[out] = key

    nodes, layers = [], []
    for index, (key, node) in enumerate(zip(keys, graph_nodes)):
        if node.op_type == "Constant":
            continue
        inputs = [producer_of[value] for value in node.inputs if value is not None and value in producer_of]
        kind, label, layer = "other", f"{node.op_type} {key}", None
        if index in infos:
            kind, layer = "bn", infos[index].name
            label = f"{node.op_type} {layer}"
            layers.append(_onnx_layer(infos[index]))
        elif node.op_type in _ONNX_ACTS:
            kind = "act"
        elif node.op_type in _ONNX_PASS:
            kind = "pass"
        elif node.op_type in _ONNX_LINEAR:
            kind = "linear"
        elif node.op_type == "Dropout":
            ratio = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
            if ratio is None:
                ratio = node_attribute(node, "ratio", 0.5)
            kind = "pass" if float(np.asarray(ratio)) == 0 else "dropout"
        elif node.op_type == "Mul" and len(node.inputs) == 2:
            # SiLU exports as x * Sigmoid(x): treat the Mul as the activation.
            for i in (0, 1):
                x, gate = node.inputs[1 - i], node.inputs[i]
                src = gate.producer() if gate is not None else None
                if src is not None and src.op_type == "Sigmoid" and src.inputs[0] is x:
                    kind, label = "act", f"SiLU (Mul {key})"
                    inputs = [producer_of[x]] if x in producer_of else []
        nodes.append(Node(key, kind, label, inputs, layer))
    outputs = [producer_of[value] for value in ir_model.graph.outputs if value in producer_of]
    nodes.append(Node("__output__", "output", "model output", outputs))
    return Graph(nodes), layers


def _onnx_layer(info) -> BNLayer:
    """The inspect row of one BN as :func:`bncal.onnx_view.find_batchnorms` reads it."""
    momentum_tf = info.momentum  # None when absent: the file does not say (not ONNX's default)
    scale, bias, mean, var = info.scale_value, info.bias_value, info.mean_value, info.var_value
    if mean is not None and var is not None:
        stats, detail = statistics_status(mean, var, None)
    else:
        stats, detail = NOT_CONSTANT, "mean or variance is computed in the graph, not stored as a constant"
    # An affine=False PyTorch BN exports scale 1 and bias 0: that is no scale/shift at all.
    affine = not (scale is not None and bias is not None and np.all(scale == 1) and np.all(bias == 0))
    if info.frozen_class is not None:
        return frozen_layer(info.name, info.frozen_class, info.channels or None, info.epsilon)
    return BNLayer(name=info.name, type="BatchNormalization", channels=info.channels or None,
                   momentum_torch=None if momentum_tf is None else 1.0 - momentum_tf, momentum_tf=momentum_tf,
                   affine=affine, track_running_stats=True, eps=info.epsilon,
                   stats=stats, stats_detail=detail, training_mode=info.training_mode,
                   momentum_absent=momentum_tf is None)


def frozen_layer(name: str, cls: str, channels: int | None, eps: float) -> BNLayer:
    """The row of a frozen BN (PyTorch's, or exported from one): fixed statistics, no momentum."""
    return BNLayer(name=name, type=cls, channels=channels, momentum_torch=None, momentum_tf=None, affine=True,
                   track_running_stats=True, eps=eps, stats=FROZEN, stats_detail=FROZEN_NOTE, frozen=True)


# ---------------------------------------------------------------------------------------------
# Rules.

@dataclasses.dataclass(frozen=True)
class _Dialect:
    """How the fixes are worded for one kind of model; rules, ids and evidence are shared.

    ``convention`` is ``"both"`` (momenta shown as PyTorch / TF) or ``"tf"`` (Keras: the one
    convention its users know).
    """

    recalibrate: str
    frozen_momentum: str
    unfreeze: str
    drop_affine: str
    need_affine: str
    renorm: str
    missing_affine: str = "no scale and shift"
    convention: str = "both"

    def momentum(self, momentum_torch: float | None) -> str:
        if momentum_torch is None:
            return "the cumulative average (momentum None)"
        if self.convention == "tf":
            return f"momentum {format_momentum(1 - momentum_torch)}"
        return f"momentum {format_momentum(momentum_torch)} (PyTorch) / {format_momentum(1 - momentum_torch)} (TF)"

    def schedule(self, suggestion) -> str:
        """The suggestion's schedule, named as this kind of model applies it."""
        if self.convention != "tf" or not suggestion.use_schedule:
            return suggestion.schedule
        tf = suggestion.tf
        return (f"inverse decay: the callback bncal.keras.InverseDecayMomentum(ceiling={format_momentum(tf)}), momentum "
                f"1 - 0.8**(step/10) capped at {format_momentum(tf)} (reached after "
                f"{InverseDecayMomentum.steps_to_ceiling(tf)} steps)")

    def set_momentum(self, suggestion) -> str:
        if self.convention == "tf":
            fix = f"set BatchNormalization(momentum={format_momentum(suggestion.tf)})"
        else:
            fix = (f"set momentum to {format_momentum(suggestion.torch)} (PyTorch) / {format_momentum(suggestion.tf)} "
                   "(TF, ONNX)")
        if suggestion.use_schedule:
            fix += f", or better use {self.schedule(suggestion)}"
        return fix


_TORCH_RENORM = ("train with batch renormalisation (bncal.nn.convert_to_batchrenorm(model)), or a "
                 "larger per-device batch / synchronised BN")
_TORCH_DIALECT = _Dialect(
    recalibrate=RECALIBRATE_COMMAND,
    frozen_momentum="momentum 0 (PyTorch) / 1 (TF, ONNX)",
    unfreeze="set a momentum above 0 (bncal.momentum.suggest_momentum)",
    drop_affine="construct the BN with affine=False, or fold its scale and shift into the next layer (bncal fold-export)",
    need_affine="construct the BN with affine=True",
    renorm=_TORCH_RENORM)
#: Fix wording per ``InspectReport.source``.
_DIALECTS = {
    "pytorch": _TORCH_DIALECT,
    "onnx": dataclasses.replace(_TORCH_DIALECT, renorm="in the PyTorch training code, " + _TORCH_RENORM),
    "keras": _Dialect(
        recalibrate="bncal recalibrate MODEL.keras --data DATA --mode eval -o OUT.keras, or in Python "
                    "bncal.keras.recalibrate(model, data, mode='eval')",
        frozen_momentum="BatchNormalization(momentum=1.0)",
        unfreeze="set BatchNormalization(momentum=...) below 1 "
                 "(bncal.suggest_momentum(batch_size, dataset_size, convention='tf'))",
        drop_affine="construct the BatchNormalization with center=False, scale=False: the next layer "
                    "absorbs the scale and shift",
        need_affine="construct the BatchNormalization with center=True (scale=False is fine before a ReLU)",
        renorm="train with batch renormalisation (BatchNormalization(renorm=True)), or a larger "
               "per-device batch / BatchNormalization(synchronized=True) (TensorFlow backend)",
        missing_affine="no shift (center=False)",
        convention="tf"),
}


def _list(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _statistics_findings(layers: list[BNLayer], source: str) -> list[Finding]:
    words = _DIALECTS[source]
    findings = []
    never = [l for l in layers if l.stats == NEVER_UPDATED]
    # A renorm layer whose renorm averages never moved either may hold what it was trained against.
    renorm_initial = [l for l in never if l.renorm and not l.renorm_averages_moved]
    never = [l for l in never if l not in renorm_initial]
    if renorm_initial:
        findings.append(Finding(
            "BN001", "warning", [l.name for l in renorm_initial],
            f"{_list([l.name for l in renorm_initial])} are batch renormalisation layers whose statistics and renorm "
            "averages hold their initial values: where r and d were not clipped in training, the network was "
            "trained against exactly these values, so they may be right.",
            "judge them on data: bncal check MODEL --data DATA compares renorm layers with their training forward, "
            "and bncal recalibrate keeps their statistics where they reproduce it"))
    if never:
        discarded = [l for l in never if l.momentum_zero_signal]
        evidence = (f"{len(never)} of {len(layers)} BN layers still hold the initial statistics "
                    f"(running mean 0, running var 1): {_list([l.name for l in never])}; inference would "
                    "normalise with values no data produced.")
        if discarded:
            counts = sorted({l.num_batches_tracked for l in discarded})
            counted = str(counts[0]) if len(counts) == 1 else f"{counts[0]} to {counts[-1]}"
            evidence += (f" {_list([l.name for l in discarded])} counted {counted} training batches "
                         "(num_batches_tracked) without moving their statistics: the momentum was 0 during "
                         "training, or the statistics were reset afterwards.")
        moved = [l for l in never if l.renorm_averages_moved]
        if moved:
            evidence += (f" {_list([l.name for l in moved])} are batch renormalisation layers whose renorm averages "
                         "(what training normalised with) moved: their inference statistics never followed them.")
        findings.append(Finding(
            "BN001", "error", [l.name for l in never], evidence,
            f"estimate the statistics on training data: {words.recalibrate}"))
    degenerate = [l for l in layers if l.stats == DEGENERATE]
    if degenerate:
        findings.append(Finding(
            "BN002", "error", [l.name for l in degenerate],
            "; ".join(f"{l.name}: {l.stats_detail}" for l in degenerate[:6]),
            f"re-estimate the statistics ({words.recalibrate}); if it recurs, look for dead "
            "channels or overflow in the layers before"))
    # An ONNX inference graph's momentum attribute is inert (exporters write 1 for momentum=None).
    frozen = [l for l in layers if l.track_running_stats and l.momentum_torch == 0 and not l.frozen
              and (source != "onnx" or l.training_mode)]
    if frozen:
        findings.append(Finding(
            "BN003", "warning", [l.name for l in frozen],
            f"{words.frozen_momentum} in {_list([l.name for l in frozen])}: training never "
            "moves the moving statistics away from what they were.",
            f"{words.unfreeze} or re-estimate the statistics after training: {words.recalibrate}"))
    untracked = [l for l in layers if not l.track_running_stats]
    if untracked:
        findings.append(Finding(
            "BN004", "warning", [l.name for l in untracked],
            f"{_list([l.name for l in untracked])} keep no moving statistics: in eval mode they "
            "normalise each batch with its own statistics, so outputs depend on the batch and a "
            "single sample cannot be normalised.",
            "construct the layers with track_running_stats=True and estimate the statistics: "
            + words.recalibrate))
    training = [l for l in layers if l.training_mode]
    if training:
        findings.append(Finding(
            "BN005", "error", [l.name for l in training],
            f"{_list([l.name for l in training])} have training_mode=1: onnxruntime normalises with "
            "each batch's statistics and outputs depend on the batch.",
            "re-export from model.eval() with the default training=TrainingMode.EVAL"))
    return findings


def _momentum_findings(layers, batch_size, dataset_size, epochs, notes, source: str) -> list[Finding]:
    words = _DIALECTS[source]
    suggestion = suggest_momentum(batch_size, dataset_size, epochs)
    notes.append(f"momentum for batch {batch_size}, {dataset_size} samples, {epochs:g} epoch(s): "
                 f"{format_momentum(suggestion.tf)} (TF) / {format_momentum(suggestion.torch)} (PyTorch); schedule: "
                 f"{words.schedule(suggestion)}. {suggestion.rationale}")
    absent = [l.name for l in layers if l.momentum_absent]
    if absent:
        notes.append(f"BN010 leaves out {_list(absent)}: the file does not carry their momentum (the ONNX "
                     "default 0.9 says nothing about the momentum they were trained with)")
    groups: dict = {}
    for layer in layers:
        if (not layer.track_running_stats or layer.momentum_torch == 0 or layer.training_mode
                or layer.momentum_absent or layer.frozen):
            continue
        # PyTorch's cumulative average (momentum None) spans the whole run.
        window = suggestion.total_steps if layer.momentum_torch is None else 1.0 / layer.momentum_torch
        factor = window / suggestion.window_steps
        if 1 / MOMENTUM_INFO_FACTOR <= factor <= MOMENTUM_INFO_FACTOR:
            continue
        groups.setdefault((layer.momentum_torch, window, factor), []).append(layer.name)
    findings = []
    for (momentum, window, factor), names in groups.items():
        within = 1 / MOMENTUM_WARNING_FACTOR <= factor <= MOMENTUM_WARNING_FACTOR
        severity = "info" if within else "warning"
        current = words.momentum(momentum)
        effect = ("lags behind the changing weights" if factor > 1 else
                  "averages too few batches and stays noisy")
        findings.append(Finding(
            "BN010", severity, names,
            f"{current} averages about {window:.3g} steps; at batch {batch_size} over {dataset_size} "
            f"samples ({suggestion.steps_per_epoch} steps per epoch) about {suggestion.window_steps:.3g} "
            f"steps fits, so the moving average {effect}.",
            words.set_momentum(suggestion)))
    return findings


def _graph_findings(graph: Graph, layers: dict[str, BNLayer], source: str) -> list[Finding]:
    words = _DIALECTS[source]
    findings, seen = [], set()
    for node in graph.nodes.values():
        if node.kind != "bn" or node.layer not in layers:
            continue
        layer = layers[node.layer]
        producer = graph.producer(node.key)
        consumers = graph.consumers(node.key)
        act_consumers = [c for c in consumers if c.kind == "act"]
        # Only a single linear consumer absorbs the affine: a sum with other branches (RepVGG's
        # identity branch) or a second reader would see the output without it.
        if (layer.affine and not layer.frozen and producer is not None and producer.kind == "act"
                and len(consumers) == 1 and consumers[0].kind == "linear"
                and ("BN020", layer.name) not in seen):
            seen.add(("BN020", layer.name))
            findings.append(Finding(
                "BN020", "info", [layer.name],
                f"{layer.name} normalises the output of {producer.label} and feeds "
                f"{_list([c.label for c in consumers])} with no nonlinearity in between, so that "
                "layer can absorb the BN's scale and shift.",
                words.drop_affine))
        if not layer.affine and act_consumers and ("BN021", layer.name) not in seen:
            seen.add(("BN021", layer.name))
            findings.append(Finding(
                "BN021", "warning", [layer.name],
                f"{layer.name} has {words.missing_affine} and feeds {_list([c.label for c in act_consumers])}: "
                "the nonlinearity only ever sees zero-mean, unit-variance inputs (Ioffe & Szegedy "
                "2015, section 3: scale and shift restore what the layer can represent).",
                words.need_affine))
        dropouts = graph.upstream_dropouts(node.key)
        if dropouts and ("BN030", layer.name) not in seen:
            seen.add(("BN030", layer.name))
            findings.append(Finding(
                "BN030", "warning", [layer.name],
                f"{_list(sorted({d.label for d in dropouts}))} reaches {layer.name} without another BN "
                "in between: the BN's statistics are gathered with dropout on, but at inference dropout "
                "is off and the variance it sees differs (Li et al. 2019).",
                "move dropout after the last BN, or re-estimate the statistics with dropout off: "
                f"{words.recalibrate}"))
    return findings


def _small_batch_findings(layers: list[BNLayer], batch_size: int, source: str) -> list[Finding]:
    plain = [l.name for l in layers if not l.renorm and l.track_running_stats and not l.frozen]
    if not plain:
        return []
    return [Finding(
        "BN040", "info", plain,
        f"batch size {batch_size} per device: batch statistics of {batch_size} samples are noisy and "
        "differ from the moving statistics used at inference (Ioffe 2017).",
        _DIALECTS[source].renorm)]


def _fold_findings(decisions: list[FoldDecision], layers: list[BNLayer], notes) -> list[Finding]:
    by_name = {l.name: l for l in layers}
    refusals: dict[str, list[str]] = {}
    unknown = []
    for decision in decisions:
        layer = by_name.get(decision.bn)
        if layer is None:
            unknown.append(decision.bn)
            continue
        if decision.folded:
            layer.fold = f"into {decision.target}"
        else:
            reason = decision.reason or "no reason given"
            layer.fold = f"no: {reason}"
            refusals.setdefault(reason, []).append(decision.bn)
    if unknown:
        notes.append(f"fold decisions name layers that are not BNs of this model: {_list(unknown)}")
    return [Finding("BN050", "info", names, f"{_list(names)} cannot be folded: {reason}",
                    "keep it as a standalone BatchNormalization (latency, not accuracy), or "
                    + ("place it directly after a Conv/Linear so it can be folded" if _misplaced(reason)
                       else "remove what the reason names so that it can be folded"))
            for reason, names in refusals.items()]


def _misplaced(reason: str) -> bool:
    """Whether a fold refusal says that no foldable op precedes the BN (not what blocks a fold)."""
    pattern = r"preceding: its input (comes from \S+, not Conv|'[^']*' is not produced by an op)"
    return re.search(pattern, reason) is not None


def _lowered_findings(lowered) -> list[Finding]:
    from .onnx_lowered import LOWERED_FIX, describe_lowered

    if not lowered:
        return []
    n = len(lowered)
    reasons = " or ".join(dict.fromkeys(l.reason for l in lowered))
    return [Finding(
        "BN060", "warning", [l.name for l in lowered],
        f"{n} normalisation layer{'s' if n != 1 else ''} with no BatchNormalization node: "
        f"{describe_lowered(lowered, 6)}, each {reasons}, what a BatchNorm becomes when a converter lowers it to "
        "arithmetic. Its moving statistics are folded into constants: they can no longer be checked or "
        "recalibrated in this file, and bncal check cannot vouch for them.",
        LOWERED_FIX)]


def inspect_model(model, *, batch_size: int | None = None, dataset_size: int | None = None,
                  epochs: float = 1, example_inputs=None,
                  fold_decisions: list[FoldDecision] | Callable | None = None) -> InspectReport:
    """Inspect the BatchNorm layers of ``model`` (a PyTorch module, an ONNX ModelProto or the
    path of an ``.onnx`` file; a Keras model or ``.keras`` path goes to
    :func:`bncal.keras.inspect`) and return an :class:`InspectReport`.

    ``batch_size`` (per device) enables BN040, and with ``dataset_size`` and ``epochs`` BN010.
    ``example_inputs`` (a tensor or tuple) is only used when ``torch.fx`` cannot trace the
    model: one eval-mode forward without gradients records the order of the modules, and the
    model's train/eval flags are restored. ``fold_decisions`` is a list of
    :class:`bncal.report.FoldDecision` or a callable producing one, called as
    ``fold_decisions(model)``, or ``fold_decisions(model, example_inputs)`` when example inputs
    are given (so ``bncal.folding.analyze_foldability`` can be passed as it is).
    The model is not modified.
    """
    from .keras import is_keras_model
    from .loading import model_kind

    notes: list[str] = []
    lowered = None
    # A Keras model is an nn.Module too on the torch backend: ask first.
    if isinstance(model, (str, Path)) and model_kind(model).name == "keras" or is_keras_model(model):
        from .keras import inspect

        return inspect(model, batch_size=batch_size, dataset_size=dataset_size, epochs=epochs,
                       example_inputs=example_inputs)
    if isinstance(model, (str, Path)):
        import onnx

        path = Path(model)
        if not path.is_file():
            raise BncalError(f"{path} is not a file; give an .onnx model or pass a torch.nn.Module")
        model = onnx.load(str(path))

    if is_torch_module(model):
        from .inspection_torch import torch_graph, torch_layers

        source = "pytorch"
        layers = torch_layers(model)
        if layers:
            graph, graph_source = torch_graph(model, example_inputs, notes)
        else:
            graph, graph_source = Graph([]), "torch.fx"
    elif type(model).__name__ == "ModelProto":
        from .onnx_lowered import find_lowered_normalisations

        source, graph_source = "onnx", "onnx"
        graph, layers = _onnx_graph_and_layers(model)
        lowered = find_lowered_normalisations(model)
        # A frozen BN exported from PyTorch is a BN row of its own, not a converter's lowering.
        layers += [frozen_layer(l.name, l.frozen, l.channels, float("nan")) for l in lowered if l.frozen]
        lowered = [l for l in lowered if not l.frozen]
    else:
        raise BncalError(f"cannot inspect a {type(model).__name__}; give a torch.nn.Module or an ONNX model")

    decisions = None
    if fold_decisions is not None:
        if callable(fold_decisions):
            args = (model,) if example_inputs is None else (model, example_inputs)
            decisions = fold_decisions(*args)
        else:
            decisions = fold_decisions
    return inspect_graph(source, graph, layers, graph_source=graph_source, batch_size=batch_size,
                         dataset_size=dataset_size, epochs=epochs, fold_decisions=decisions, notes=notes,
                         lowered=lowered)


def inspect_graph(source: str, graph: Graph, layers: list[BNLayer], *, graph_source: str,
                  batch_size: int | None = None, dataset_size: int | None = None, epochs: float = 1,
                  fold_decisions: list[FoldDecision] | None = None,
                  notes: list[str] | None = None, lowered: list | None = None) -> InspectReport:
    """Run every rule on a model already reduced to its BN rows and its :class:`Graph`.

    The entry point of every front end: ``source`` (``"pytorch"``, ``"onnx"`` or ``"keras"``)
    picks the wording of the fixes, ``graph_source`` says where the graph came from; the
    other arguments are those of :func:`inspect_model`. ``notes`` are kept, first. ``lowered``:
    the normalisations a converter lowered to arithmetic
    (:func:`bncal.onnx_lowered.find_lowered_normalisations`), for BN060.
    """
    notes = list(notes or [])
    findings: list[Finding] = []
    frozen = [l.name for l in layers if l.frozen]
    if frozen:
        notes.append(f"{_list(frozen)} {'are frozen BatchNorms' if len(frozen) > 1 else 'is a frozen BatchNorm'}: "
                     "fixed statistics (they fold like any BN) that cannot be recalibrated; "
                     "bncal.unfreeze_batchnorm turns them into BatchNorm2d to recalibrate them")
    if not layers:
        notes.append("the model has no BatchNorm layers" + (" (BatchNormalization nodes)" if lowered else ""))
    findings += _lowered_findings(lowered)
    findings += _statistics_findings(layers, source)
    if layers and batch_size is not None and dataset_size is not None:
        findings += _momentum_findings(layers, batch_size, dataset_size, epochs, notes, source)
    elif layers and (batch_size is None) != (dataset_size is None):
        notes.append("BN010 (momentum fit) needs both batch_size and dataset_size")
    findings += _graph_findings(graph, {l.name: l for l in layers}, source)
    if layers and batch_size is not None and batch_size <= SMALL_BATCH:
        findings += _small_batch_findings(layers, batch_size, source)
    if fold_decisions is not None:
        findings += _fold_findings(list(fold_decisions), layers, notes)

    findings.sort(key=lambda f: (-SEVERITIES.index(f.severity), f.rule_id))
    return InspectReport(source=source, graph=graph_source, layers=layers, findings=findings, notes=notes)

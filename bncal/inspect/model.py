"""The inspection's data model: rules, findings, BN rows, the report, and the graph every front end reduces to.

The rules themselves run in :mod:`bncal.inspect.rules`; the front ends (:mod:`bncal.inspect.torch`,
:mod:`bncal.inspect.onnx`, :mod:`bncal.keras.inspection`) reduce a model to :class:`BNLayer`
rows and a :class:`Graph`.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from typing import Iterable

import numpy as np

from ..frozen import FROZEN_NOTE
from ..report import ReportDisplay, format_table, plural

__all__ = ["InspectReport", "BNLayer", "Finding", "RULES", "SEVERITIES", "RECALIBRATE_COMMAND", "Graph", "Node",
           "statistics_status", "frozen_layer"]

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
    :mod:`bncal.torch.nn` layers keep one set, the running statistics).
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


def frozen_layer(name: str, cls: str, channels: int | None, eps: float) -> BNLayer:
    """The row of a frozen BN (PyTorch's, or exported from one): fixed statistics, no momentum."""
    return BNLayer(name=name, type=cls, channels=channels, momentum_torch=None, momentum_tf=None, affine=True,
                   track_running_stats=True, eps=eps, stats=FROZEN, stats_detail=FROZEN_NOTE, frozen=True)

"""The inspection's rules: every front end's BN rows and graph in, findings out (:func:`inspect_graph`).

Rule ids, severities and triggers are listed in :mod:`bncal.inspect`; the wording of each fix
follows the kind of model (a :class:`Dialect` per ``InspectReport.source``).
"""

from __future__ import annotations

import dataclasses
import re

from ..momentum import InverseDecayMomentum, format_momentum, suggest_momentum
from ..report import FoldDecision
from .model import DEGENERATE, NEVER_UPDATED, RECALIBRATE_COMMAND, SEVERITIES, BNLayer, Finding, Graph, InspectReport

__all__ = ["inspect_graph", "Dialect", "DIALECTS", "SMALL_BATCH"]

MOMENTUM_INFO_FACTOR = 3.0
MOMENTUM_WARNING_FACTOR = 10.0
#: Per-device batch size at or below which batch renormalisation is suggested.
SMALL_BATCH = 32


@dataclasses.dataclass(frozen=True)
class Dialect:
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
_TORCH_DIALECT = Dialect(
    recalibrate=RECALIBRATE_COMMAND,
    frozen_momentum="momentum 0 (PyTorch) / 1 (TF, ONNX)",
    unfreeze="set a momentum above 0 (bncal.momentum.suggest_momentum)",
    drop_affine="construct the BN with affine=False, or fold its scale and shift into the next layer (bncal fold-export)",
    need_affine="construct the BN with affine=True",
    renorm=_TORCH_RENORM)
#: Fix wording per ``InspectReport.source``.
DIALECTS = {
    "pytorch": _TORCH_DIALECT,
    "onnx": dataclasses.replace(_TORCH_DIALECT, renorm="in the PyTorch training code, " + _TORCH_RENORM),
    "keras": Dialect(
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
    words = DIALECTS[source]
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
    words = DIALECTS[source]
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
    words = DIALECTS[source]
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
        DIALECTS[source].renorm)]


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
    from ..onnx.lowered import LOWERED_FIX, describe_lowered

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


def inspect_graph(source: str, graph: Graph, layers: list[BNLayer], *, graph_source: str,
                  batch_size: int | None = None, dataset_size: int | None = None, epochs: float = 1,
                  fold_decisions: list[FoldDecision] | None = None,
                  notes: list[str] | None = None, lowered: list | None = None) -> InspectReport:
    """Run every rule on a model already reduced to its BN rows and its :class:`Graph`.

    The entry point of every front end: ``source`` (``"pytorch"``, ``"onnx"`` or ``"keras"``)
    picks the wording of the fixes, ``graph_source`` says where the graph came from; the
    other arguments are those of :func:`inspect_model`. ``notes`` are kept, first. ``lowered``:
    the normalisations a converter lowered to arithmetic
    (:func:`bncal.onnx.lowered.find_lowered_normalisations`), for BN060.
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

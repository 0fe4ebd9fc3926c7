"""Plain-text tables and JSON conversion for report values (no printing here)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np

__all__ = [
    "format_table", "to_jsonable", "FoldDecision", "LayerStats", "LayerRecalibration",
    "SkippedLayer", "RecalibrationReport", "summarize_shift",
]


@dataclasses.dataclass
class FoldDecision:
    """What happened to one BatchNorm during folding.

    ``target`` names the op it was folded into (None when not folded); ``direction`` is
    ``"into-preceding"``, ``"into-following"``, ``"to-affine"`` or ``None``; ``reason`` says why
    a BN was not folded (None when it was).
    """

    bn: str
    target: str | None
    direction: str | None
    reason: str | None = None

    @property
    def folded(self) -> bool:
        return self.target is not None


def format_table(rows, headers) -> str:
    """Render rows (sequences of cells) as an aligned text table."""
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, c in enumerate(row):
            widths[i] = max(widths[i], len(c))
    line = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
    out = [line(headers), line(["-" * w for w in widths])]
    out.extend(line(r) for r in cells)
    return "\n".join(out)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value == 0 or 1e-3 <= abs(value) < 1e5:
            return f"{value:.4g}"
        return f"{value:.3e}"
    return str(value)


def to_jsonable(value):
    """Convert dataclasses, numpy values and paths into JSON-serialisable Python objects."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)
                if f.metadata.get("json", True)}
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


@dataclasses.dataclass
class LayerStats:
    """Moving statistics of one BN layer, reduced to summary numbers for reports."""

    mean: np.ndarray
    var: np.ndarray


@dataclasses.dataclass
class LayerRecalibration:
    """Before/after statistics of one recalibrated BN layer.

    ``mean_shift`` is the largest per-channel ``|new_mean - old_mean| / sqrt(new_var + eps)``:
    how far the old statistics were from the new ones, in units of the new standard deviation.
    ``var_ratio`` is the per-channel ``old_var / new_var`` farthest from 1 (in log scale).
    """

    name: str
    channels: int
    samples: int
    calls_per_forward: int
    before: LayerStats
    after: LayerStats
    mean_shift: float
    var_ratio: float


@dataclasses.dataclass
class SkippedLayer:
    name: str
    reason: str


@dataclasses.dataclass
class RecalibrationReport:
    """What a recalibration did: one entry per updated layer, skipped layers with reasons.

    ``passes`` is the number of passes over the data; ``converged`` and ``max_rel_change``
    describe the last pass of ``eval`` mode (for ``train`` mode: 1, True, 0.0). ``notes`` are
    part of :meth:`table`; ``warnings`` (advice to act on, such as batches far from random
    draws) are not: the CLI prints them on stderr.
    """

    mode: str
    batches: int
    samples: int
    passes: int
    converged: bool
    max_rel_change: float
    layers: list[LayerRecalibration]
    skipped: list[SkippedLayer]
    world_size: int = 1
    notes: list[str] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)

    def table(self) -> str:
        rows = [
            (l.name, l.channels, l.samples, l.mean_shift, l.var_ratio,
             float(np.mean(l.before.mean)), float(np.mean(l.after.mean)),
             float(np.mean(l.before.var)), float(np.mean(l.after.var)))
            for l in self.layers
        ]
        text = format_table(rows, ["layer", "channels", "samples", "max |shift| (sd)", "var ratio",
                                   "mean before", "mean after", "var before", "var after"])
        for s in self.skipped:
            text += f"\nskipped {s.name}: {s.reason}"
        for note in self.notes:
            text += f"\nnote: {note}"
        return text


def summarize_shift(old_mean, old_var, new_mean, new_var, eps: float) -> tuple[float, float]:
    """``(max |mean shift| in new sd, var ratio farthest from 1)`` between two sets of statistics."""
    old_mean, old_var = np.asarray(old_mean, np.float64), np.asarray(old_var, np.float64)
    new_mean, new_var = np.asarray(new_mean, np.float64), np.asarray(new_var, np.float64)
    if old_mean.shape != new_mean.shape:  # no old statistics (a lazy BN not yet materialised)
        return float("nan"), float("nan")
    shift = np.abs(new_mean - old_mean) / np.sqrt(new_var + eps)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = (old_var + eps) / (new_var + eps)
        log_ratio = np.abs(np.log(ratio))
    if not shift.size:
        return 0.0, 1.0
    worst = int(np.nanargmax(log_ratio)) if np.isfinite(log_ratio).any() else 0
    return float(np.max(shift)), float(ratio[worst])

"""Per-layer pictures of BN statistics: mean shift and variance ratio, layer by layer.

Needs matplotlib (``pip install 'bncal[plot]'``); without it a BncalError names the extra.
Every function writes one PNG atomically and returns its path.
"""

from __future__ import annotations

import math
from pathlib import Path

from .outputs import atomic_output
from .errors import BncalError

__all__ = ["plot_layer_series", "plot_recalibration", "plot_check", "require_matplotlib"]


_NEEDS_MATPLOTLIB = "--plot needs matplotlib: pip install 'bncal[plot]'"


def require_matplotlib() -> None:
    """BncalError now, before any work, when matplotlib is not installed (finding it imports nothing)."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise BncalError(_NEEDS_MATPLOTLIB)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BncalError(_NEEDS_MATPLOTLIB) from None
    return plt


def plot_layer_series(path, layers: list[str], series: dict, *, title: str = "") -> Path:
    """Two panels over ``layers``: max |mean shift| (in sd) and variance ratio, one line per series.

    ``series`` maps a label to ``(mean_shifts, var_ratios)``, each a sequence as long as ``layers``.
    """
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6.0, 0.45 * len(layers) + 2), 6), sharex=True)
    x = range(len(layers))
    for label, (shifts, ratios) in series.items():
        top.plot(x, [_finite(v) for v in shifts], marker="o", label=label)
        bottom.plot(x, [_finite(v) for v in ratios], marker="o", label=label)
    top.set_ylabel("max |mean shift| (sd)")
    top.set_yscale("symlog", linthresh=1e-3)
    bottom.set_ylabel("variance ratio (moving / data)")
    bottom.set_yscale("log")
    bottom.axhline(1.0, color="gray", linewidth=0.8)
    bottom.set_xticks(list(x), layers, rotation=60, ha="right", fontsize=8)
    bottom.set_xlabel("BatchNorm layer")
    top.legend()
    top.grid(alpha=0.3)
    bottom.grid(alpha=0.3)
    if title:
        top.set_title(title)
    fig.tight_layout()
    path = Path(path)
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def plot_recalibration(report, path) -> Path:
    """How far each layer's old statistics were from the recalibrated ones (after: 0 shift, ratio 1)."""
    layers = [l.name for l in report.layers]
    return plot_layer_series(path, layers, {
        "before recalibration": ([l.mean_shift for l in report.layers], [l.var_ratio for l in report.layers]),
        "after recalibration": ([0.0] * len(layers), [1.0] * len(layers)),
    }, title=f"bncal recalibrate ({report.mode} mode, {report.samples} samples)")


def plot_check(reports: dict, path) -> Path:
    """Moving vs data statistics per layer for one or more check reports (``{label: CheckReport}``)."""
    first = next(iter(reports.values()))
    layers = [l.name for l in first.layers]
    series = {label: ([l.mean_shift for l in r.layers], [l.var_ratio for l in r.layers]) for label, r in reports.items()}
    return plot_layer_series(path, layers, series, title="moving statistics vs batch statistics (onnxruntime)")


def _finite(value: float) -> float:
    return value if value is not None and math.isfinite(value) else float("nan")

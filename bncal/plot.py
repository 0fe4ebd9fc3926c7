"""Per-layer pictures of BN statistics: each layer's mean shift and variance ratio against its limits.

Needs matplotlib (``pip install 'bncal[plot]'``); without it a :class:`bncal.extras.MissingExtra`
names the extra. Every function writes one PNG atomically and returns its path.

Both panels share the layers on the x axis. The top one shows the largest per-channel mean
shift in standard deviations, the bottom one the variance ratio farthest from 1, each on a log
scale, with the band a layer must stay within shaded per layer. Points outside their band are
ringed in red and the layer's name is red. The title names the model and the verdict.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

from .extras import MissingExtra, is_available
from .outputs import atomic_output

__all__ = ["LayerSeries", "plot_layer_series", "plot_recalibration", "plot_check", "require_matplotlib"]

_FAIL_COLOR = "#c62828"
_BAND_COLOR = "#2e7d32"
_SERIES_COLORS = ("#ef6c00", "#1565c0", "#6a1b9a", "#00838f")
_SERIES_MARKERS = ("o", "s", "D", "^")


def require_matplotlib() -> None:
    """:class:`MissingExtra` now, before any work, when matplotlib is not installed (imports nothing)."""
    if not is_available("matplotlib"):
        raise MissingExtra("matplotlib", "--plot")


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingExtra("matplotlib", "--plot") from None
    return plt


class LayerSeries:
    """One set of points over the layers: ``shifts`` and ``ratios`` per layer, and which layers ``failed``."""

    def __init__(self, label: str, shifts, ratios, failed):
        self.label, self.shifts, self.ratios, self.failed = label, list(shifts), list(ratios), list(failed)


def plot_layer_series(path, layers: list[str], series: list[LayerSeries], *, shift_limits, ratio_bands,
                      band_label: str, title: str, ratio_label: str = "variance ratio") -> Path:
    """Two panels over ``layers``: max |mean shift| (sd) and variance ratio, with per-layer bands.

    ``shift_limits[i]`` is layer i's largest allowed shift, ``ratio_bands[i]`` its allowed
    ``(low, high)`` variance ratio; both are shaded and named ``band_label`` in the legend. A
    point outside its band is ringed; a layer some series ``failed`` gets a red name.
    """
    plt = _pyplot()
    n = len(layers)
    width = min(20.0, max(7.5, 0.55 * n + 3.0))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(width, 6.8), sharex=True, layout="constrained")
    x = list(range(n))
    positive = [v for s in series for v in s.shifts if _finite(v) > 0] + [v for v in shift_limits if v > 0]
    floor = max(min(positive, default=1.0) / 4, 1e-9)  # a log axis cannot show 0: smaller shifts sit here
    top.bar(x, [max(limit - floor, 0) for limit in shift_limits], bottom=floor, width=0.7,
            color=_BAND_COLOR, alpha=0.16, label=band_label)
    bottom.bar(x, [high - low for low, high in ratio_bands], bottom=[low for low, _ in ratio_bands], width=0.7,
               color=_BAND_COLOR, alpha=0.16)
    bottom.axhline(1.0, color="#555555", linewidth=0.8, linestyle=":")
    failed_layers, ring_label = set(), "outside its band"
    for i, s in enumerate(series):
        color, marker = _SERIES_COLORS[i % len(_SERIES_COLORS)], _SERIES_MARKERS[i % len(_SERIES_MARKERS)]
        offset = (i - (len(series) - 1) / 2) * 0.18  # side by side within a layer's slot
        xs = [v + offset for v in x]
        shifts = [_clip(v, floor) for v in s.shifts]
        ratios = [_finite(v) for v in s.ratios]
        top.scatter(xs, shifts, s=46, color=color, marker=marker, zorder=3, label=s.label)
        bottom.scatter(xs, ratios, s=46, color=color, marker=marker, zorder=3)
        failed_layers.update(j for j, f in enumerate(s.failed) if f)
        outside = {top: [j for j in x if not _finite(s.shifts[j]) <= shift_limits[j]],
                   bottom: [j for j in x if not ratio_bands[j][0] <= _finite(s.ratios[j]) <= ratio_bands[j][1]]}
        for ax, values in ((top, shifts), (bottom, ratios)):
            if outside[ax]:
                ax.scatter([xs[j] for j in outside[ax]], [values[j] for j in outside[ax]], s=150, facecolors="none",
                           edgecolors=_FAIL_COLOR, linewidths=1.6, zorder=4, label=ring_label if ax is top else None)
                if ax is top:
                    ring_label = None  # one legend entry for the rings
    top.set_yscale("log")
    bottom.set_yscale("log")
    top.set_ylim(bottom=floor)
    top.set_ylabel("max |mean shift| (sd)", fontsize=10)
    bottom.set_ylabel(ratio_label, fontsize=10)
    bottom.set_xticks(x, [_short(name) for name in layers], rotation=45 if n > 6 else 0,
                      ha="right" if n > 6 else "center", fontsize=9 if n <= 30 else 7)
    for i, label in enumerate(bottom.get_xticklabels()):
        if i in failed_layers:
            label.set_color(_FAIL_COLOR)
            label.set_fontweight("bold")
    bottom.set_xlabel("BatchNorm layer (red: outside its band)" if failed_layers else "BatchNorm layer", fontsize=10)
    bottom.set_xlim(-0.6, n - 0.4)
    for ax in (top, bottom):
        ax.grid(axis="y", which="major", alpha=0.3)
        ax.tick_params(axis="y", labelsize=9)
    # Legend: the series, then the rings, then the band.
    entries = dict(zip(*reversed(top.get_legend_handles_labels())))
    order = [s.label for s in series] + [label for label in ("outside its band", band_label) if label in entries]
    lines = textwrap.wrap(title, width=int(width * 9.5)) or [""]
    fig.suptitle("\n".join(lines), fontsize=12, fontweight="bold")
    top.legend([entries[label] for label in order], order, loc="lower center", bbox_to_anchor=(0.5, 1.0),
               ncol=len(order), fontsize=9, frameon=False)
    path = Path(path)
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path


def plot_recalibration(report, path, *, model: str | None = None) -> Path:
    """How far each layer's old statistics were from the recalibrated ones.

    Per layer, the old mean's shift in units of the new standard deviation and the ratio old
    variance / new variance (the report's ``mean_shift`` and ``var_ratio``), against the band
    :class:`bncal.check.CheckThresholds` allows by default: layers outside it held statistics
    that ``bncal check`` would have failed.
    """
    from .check import CheckThresholds

    limits = CheckThresholds()
    layers = report.layers
    band = (math.exp(-limits.max_var_log_ratio), math.exp(limits.max_var_log_ratio))
    failed = [not (_finite(l.mean_shift) <= limits.max_mean_shift and band[0] <= _finite(l.var_ratio) <= band[1])
              for l in layers]
    name = f"{model}: " if model else ""
    title = (f"{name}recalibrated {len(layers)} BN layers ({report.mode} mode, {report.samples} samples); "
             f"{sum(failed)} of {len(layers)} held statistics outside the check's limits")
    return plot_layer_series(
        path, [l.name for l in layers],
        [LayerSeries("old statistics vs recalibrated", [l.mean_shift for l in layers], [l.var_ratio for l in layers],
                     failed)],
        shift_limits=[limits.max_mean_shift] * len(layers), ratio_bands=[band] * len(layers),
        band_label=f"check's default limits ({limits.max_mean_shift:g} sd; {band[0]:.2f}..{band[1]:.2f})",
        title=title, ratio_label="variance ratio (old / new)")


def plot_check(reports: dict, path, *, model: str | None = None) -> Path:
    """Moving vs data statistics per layer for one or more check reports (``{label: CheckReport}``).

    The bands are each layer's limits in the first report (its thresholds widened for the
    samples the check saw); a point is ringed where its own report failed that layer.
    """
    first = next(iter(reports.values()))
    layers = first.layers
    series = [LayerSeries(label, [l.mean_shift for l in r.layers], [l.var_ratio for l in r.layers],
                          [not l.passed for l in r.layers]) for label, r in reports.items()]
    verdicts = ", ".join(f"{label} {r.verdict}" if len(reports) > 1 else r.verdict for label, r in reports.items())
    bad = sum(not l.passed for l in layers)
    detail = f" ({bad} of {len(layers)} layers off their data)" if len(reports) == 1 and bad else ""
    name = f"{model}: " if model else ""
    title = f"{name}bncal check: {verdicts}{detail}"
    return plot_layer_series(
        path, [l.name for l in layers], series,
        shift_limits=[l.shift_limit for l in layers],
        ratio_bands=[(math.exp(-l.log_ratio_limit), math.exp(l.log_ratio_limit)) for l in layers],
        band_label="allowed (check limits)", title=title, ratio_label="variance ratio (moving / data)")


def _finite(value) -> float:
    return value if value is not None and math.isfinite(value) else float("nan")


def _clip(value, floor: float) -> float:
    value = _finite(value)
    return value if math.isnan(value) else max(value, floor)


def _short(name: str, limit: int = 22) -> str:
    return name if len(name) <= limit else name[: limit // 2 - 1] + "…" + name[-(limit // 2):]

"""Pictures of reports: per-layer BN statistics against their limits, per-channel views of the
layers that fail, and fold-export's error per output against its tolerance.

Needs matplotlib (``pip install 'bncal[plot]'``); without it a :class:`bncal.extras.MissingExtra`
names the extra. Every function returns a :class:`matplotlib.figure.Figure` and writes it as a PNG
(atomically) when given a ``path``. It never touches the user's matplotlib state: no backend
switch, no pyplot figure (a plain ``Figure`` of its own, which a notebook shows when it is the
cell's value), no rcParams; given ``ax``/``axes`` of the user's own figure, it draws there.

The layer plots' two panels share the layers on the x axis. The top one shows the largest
per-channel mean shift in standard deviations, the bottom one the variance ratio farthest from
1, each on a log scale, with the band a layer must stay within shaded per layer. Points outside
their band are ringed in red and the layer's name is red. The title names the model and the verdict.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np

from .extras import MissingExtra, is_available
from .outputs import atomic_output

__all__ = ["LayerSeries", "plot_layer_series", "plot_recalibration", "plot_check", "plot_channels",
           "plot_fold_export", "require_matplotlib"]

_FAIL_COLOR = "#c62828"
_BAND_COLOR = "#2e7d32"
_SERIES_COLORS = ("#ef6c00", "#1565c0", "#6a1b9a", "#00838f")
_SERIES_MARKERS = ("o", "s", "D", "^")


def require_matplotlib() -> None:
    """:class:`MissingExtra` now, before any work, when matplotlib is not installed (imports nothing)."""
    if not is_available("matplotlib"):
        raise MissingExtra("matplotlib", "--plot")


def _figure(width: float, height: float, rows: int = 1, cols: int = 1, **subplots):
    """A Figure of its own and its axes, made without pyplot: the user's backend, figures and current
    figure stay as they were, and nothing shows unless the caller displays the Figure."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingExtra("matplotlib", "--plot") from None
    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots(rows, cols, **subplots)


def _done(fig, path):
    """``fig``, written as a PNG to ``path`` first when one is given."""
    if path is not None:
        with atomic_output(Path(path)) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    return fig


def _title(fig, axes, title: str, width: float, own: bool) -> None:
    """The title: the figure's own when bncal made it, else over the user's first axes (their figure's
    title stays theirs)."""
    lines = textwrap.wrap(title, width=int(width * 9.5)) or [""]
    if own:
        fig.suptitle("\n".join(lines), fontsize=12, fontweight="bold")
    else:
        axes[0].set_title("\n".join(lines), fontsize=10, fontweight="bold")


class LayerSeries:
    """One set of points over the layers: ``shifts`` and ``ratios`` per layer, and which layers ``failed``."""

    def __init__(self, label: str, shifts, ratios, failed):
        self.label, self.shifts, self.ratios, self.failed = label, list(shifts), list(ratios), list(failed)


def plot_layer_series(path, layers: list[str], series: list[LayerSeries], *, shift_limits, ratio_bands,
                      band_label: str, title: str, ratio_label: str = "variance ratio", axes=None):
    """Two panels over ``layers``: max |mean shift| (sd) and variance ratio, with per-layer bands.

    ``shift_limits[i]`` is layer i's largest allowed shift, ``ratio_bands[i]`` its allowed
    ``(low, high)`` variance ratio; both are shaded and named ``band_label`` in the legend. A
    point outside its band is ringed; a layer some series ``failed`` gets a red name. ``axes``: two
    Axes to draw into (shift, ratio), else a new Figure. Returns the Figure (written to ``path`` if given).
    """
    n = len(layers)
    width = min(20.0, max(7.5, 0.55 * n + 3.0))
    if axes is None:
        fig, (top, bottom) = _figure(width, 6.8, 2, 1, sharex=True)
    else:
        top, bottom = axes
        fig = top.figure
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
    _title(fig, [top], title, width, own=axes is None)
    top.legend([entries[label] for label in order], order, loc="lower center", bbox_to_anchor=(0.5, 1.0),
               ncol=len(order), fontsize=9, frameon=False)
    return _done(fig, path)


def plot_recalibration(report, path=None, *, model: str | None = None, axes=None):
    """How far each layer's old statistics were from the recalibrated ones.

    Per layer, the old mean's shift in units of the new standard deviation and the ratio old
    variance / new variance (the report's ``mean_shift`` and ``var_ratio``), against the band
    :class:`bncal.checking.CheckThresholds` allows by default: layers outside it held statistics
    that ``bncal check`` would have failed. Returns the Figure (``axes``, ``path``: as for
    :func:`plot_layer_series`).
    """
    from .limits import CheckThresholds

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
        title=title, ratio_label="variance ratio (old / new)", axes=axes)


def plot_check(reports, path=None, *, model: str | None = None, axes=None):
    """Moving vs data statistics per layer for one or more check reports (``{label: CheckReport}``).

    The bands are each layer's limits in the first report (its thresholds widened for the
    samples the check saw); a point is ringed where its own report failed that layer. A single
    report may be given as is. Returns the Figure (``axes``, ``path``: as for :func:`plot_layer_series`).
    """
    if not isinstance(reports, dict):
        reports = {"moving vs data": reports}
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
        band_label="allowed (check limits)", title=title, ratio_label="variance ratio (moving / data)", axes=axes)


def plot_channels(report, path=None, *, layers=None, model: str | None = None, axes=None):
    """Per channel, for the layers that fail: where a layer is off, not only by how much at worst.

    ``report`` is a check report (moving statistics against the data's) or a recalibration report
    (old statistics against the recalibrated ones, judged by the check's default limits).
    ``layers`` (names) picks the rows; default: the layers that fail, or every layer when none
    does. Two heatmaps, one row per layer and one column per channel: |mean shift| in standard
    deviations, and the variance ratio on a log colour scale centred on 1; a layer with fewer
    channels than the widest leaves its extra cells blank. ``axes``: two Axes to draw into (shift,
    ratio), else a new Figure. Returns the Figure (written to ``path`` if given).
    """
    from matplotlib.colors import LogNorm

    rows = report.channel_rows()
    if layers is None:
        failing = [r for r in rows if not r["passed"]]
        rows = failing or rows
    else:
        by_name = {r["layer"]: r for r in rows}
        unknown = [name for name in layers if name not in by_name]
        if unknown:
            from .errors import BncalError

            raise BncalError(f"no layer {', '.join(unknown)} in the report; its layers: {', '.join(by_name)}")
        rows = [by_name[name] for name in layers]
    width_channels = max((len(r["mean_shift"]) for r in rows), default=1)
    shift = np.full((len(rows), width_channels), np.nan)
    ratio = np.full((len(rows), width_channels), np.nan)
    for i, r in enumerate(rows):
        shift[i, :len(r["mean_shift"])] = r["mean_shift"]
        ratio[i, :len(r["var_ratio"])] = r["var_ratio"]
    ratio = np.where(np.isfinite(ratio) & (ratio > 0), ratio, np.nan)
    width = min(20.0, max(8.0, 0.12 * width_channels + 4.0))
    height = min(16.0, 1.8 + 0.42 * len(rows)) * 2
    if axes is None:
        fig, (top, bottom) = _figure(width, height, 2, 1)
    else:
        top, bottom = axes
        fig = top.figure
    largest_shift = float(np.nanmax(shift)) if np.isfinite(shift).any() else 1.0
    span = float(np.nanmax(np.abs(np.log(ratio)))) if np.isfinite(ratio).any() else 1.0
    span = max(span, 0.05)  # a colour scale, even when every ratio is 1
    images = (
        (top, shift, dict(cmap="Reds", vmin=0.0, vmax=max(largest_shift, 1e-9)), "|mean shift| (sd)"),
        (bottom, ratio, dict(cmap="RdBu_r", norm=LogNorm(vmin=math.exp(-span), vmax=math.exp(span))),
         f"variance ratio ({report.ratio_label})"),
    )
    names = [_short(r["layer"]) for r in rows]
    for ax, values, colour, label in images:
        image = ax.imshow(np.ma.masked_invalid(values), aspect="auto", interpolation="nearest", **colour)
        ax.set_yticks(range(len(rows)), names, fontsize=9)
        ax.set_xlabel("channel", fontsize=10)
        ax.set_facecolor("#eeeeee")  # blank cells: channels a layer does not have
        fig.colorbar(image, ax=ax, label=label)
    failing = sum(not r["passed"] for r in rows)
    name = f"{model}: " if model else ""
    which = f"{failing} failing layer{'s' if failing != 1 else ''}" if failing else "every layer (none fails)"
    _title(fig, [top], f"{name}per-channel statistics of {which} ({report.channel_subject})", width, own=axes is None)
    return _done(fig, path)


def plot_fold_export(report, path=None, *, model: str | None = None, ax=None):
    """fold-export's error per output against its tolerance, for each verification step.

    Per output, on a log scale in units of the output's scale (``max |reference|``): the largest,
    the 99th-percentile and the median absolute error of the fold (and of the export, for a
    PyTorch model), each against the tolerance allowed at the largest reference value (for the
    default ``scale`` tolerance, the tolerance itself). ``ax``: the Axes to draw into, else a new
    Figure. Returns the Figure (written to ``path`` if given).
    """
    steps = [("fold", report.comparison)] + ([("export", report.export_comparison)]
                                             if report.export_comparison is not None else [])
    names = [o.name for o in report.comparison.outputs]
    width = min(20.0, max(6.5, 1.2 * len(names) * len(steps) + 3.0))
    own = ax is None
    if own:
        fig, ax = _figure(width, 4.6)
    else:
        fig = ax.figure
    floor, drawn_tolerance = None, False
    for j, (step, comparison) in enumerate(steps):
        tol = comparison.tolerance
        by_name = {o.name: o for o in comparison.outputs}
        color, marker = _SERIES_COLORS[j % len(_SERIES_COLORS)], _SERIES_MARKERS[j % len(_SERIES_MARKERS)]
        offset = (j - (len(steps) - 1) / 2) * 0.3
        for i, name in enumerate(names):
            o = by_name.get(name)
            if o is None or not o.scale or o.max_abs_error is None:
                continue
            x = i + offset
            figures = [v / o.scale for v in (o.median_abs_error, o.p99_abs_error, o.max_abs_error)]
            positive = [v for v in figures if v > 0]
            if positive:
                floor = min(positive + ([floor] if floor else []))
            allowed = tol.scale + (tol.atol + tol.rtol * o.scale) / o.scale
            ax.plot([x - 0.13, x + 0.13], [allowed, allowed], color=_BAND_COLOR, linewidth=2.5,
                    label=None if drawn_tolerance else "tolerance (at the largest |reference|)")
            drawn_tolerance = True
            ax.vlines(x, figures[0] or None, figures[2], color=color, linewidth=1.2, alpha=0.6)
            ax.scatter([x, x, x], figures, color=color, marker=marker, s=[18, 30, 60], zorder=3,
                       label=f"{step}: median, p99, max" if i == 0 else None)
            if not o.passed:
                ax.scatter([x], [figures[2]], s=180, facecolors="none", edgecolors=_FAIL_COLOR, linewidths=1.6, zorder=4)
    ax.set_yscale("log")
    if floor is not None:
        ax.set_ylim(bottom=floor / 4)
    ax.set_xticks(range(len(names)), [_short(n) for n in names], rotation=45 if len(names) > 6 else 0,
                  ha="right" if len(names) > 6 else "center", fontsize=9)
    ax.set_xlim(-0.7, len(names) - 0.3)
    ax.set_xlabel("output", fontsize=10)
    ax.set_ylabel("absolute error / max |reference|", fontsize=10)
    ax.grid(axis="y", which="major", alpha=0.3)
    ax.legend(fontsize=9, frameon=False, loc="best")
    name = f"{model}: " if model else ""
    verdict = "PASSED" if report.passed else "FAILED"
    folded = sum(d.folded for d in report.decisions)
    _title(fig, [ax], f"{name}bncal fold-export: {verdict}; folded {folded} of {len(report.decisions)} BN layers, "
                      f"{report.bn_left} BatchNormalization left", width, own=own)
    return _done(fig, path)


def _finite(value) -> float:
    return value if value is not None and math.isfinite(value) else float("nan")


def _clip(value, floor: float) -> float:
    value = _finite(value)
    return value if math.isnan(value) else max(value, floor)


def _short(name: str, limit: int = 22) -> str:
    return name if len(name) <= limit else name[: limit // 2 - 1] + "…" + name[-(limit // 2):]

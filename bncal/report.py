"""Plain-text tables, notebook display and JSON conversion for report values (no printing here).

Every report type (:class:`RecalibrationReport`, ``CheckReport``, ``FoldExportReport``,
``FoldResult``, ``InspectReport``, ``ComparisonReport``, ``DemoResult``) shows itself through
:class:`ReportDisplay`: ``repr()`` is one line (kind, layers, verdict), ``str()`` is the table the
CLI prints, and ``_repr_html_`` (Jupyter) is that same table as HTML. A report defines two things
only, ``summary()`` and ``table()``; the HTML is derived from the ``table()`` call itself, so the
notebook never shows something the CLI does not.
"""

from __future__ import annotations

import contextvars
import dataclasses
import html
import math
from pathlib import Path

import numpy as np

__all__ = [
    "format_table", "describe_nonfinite", "to_jsonable", "report_json", "JSON_SCHEMA_VERSION", "ReportDisplay",
    "text_to_html", "plural", "output_label", "FoldDecision", "LayerStats",
    "LayerRecalibration", "SkippedLayer", "RecalibrationReport", "summarize_shift", "channel_shift",
]

# While a report renders its HTML, every format_table call records what it rendered here.
_RENDERED_TABLES: contextvars.ContextVar[list | None] = contextvars.ContextVar("bncal_rendered_tables", default=None)
# While a report gives its records, every format_table call records its name, headers and raw rows here.
_RECORDED_TABLES: contextvars.ContextVar[list | None] = contextvars.ContextVar("bncal_recorded_tables", default=None)
# Result cells that get a colour in HTML.
_VERDICT_CLASSES = {"pass": "pass", "PASSED": "pass", "FAIL": "fail", "FAILED": "fail", "INCOMPLETE": "fail"}
_HTML_STYLE = ("<style>.bncal-report table{border-collapse:collapse;margin:4px 0}"
               ".bncal-report th,.bncal-report td{padding:2px 8px;text-align:left;font-family:monospace}"
               ".bncal-report th{border-bottom:1px solid #888}.bncal-report .fail{color:#b00020;font-weight:bold}"
               ".bncal-report .pass{color:#1b7f3b}.bncal-report pre{margin:2px 0;white-space:pre-wrap}</style>")


class ReportDisplay:
    """How a report value shows itself: ``repr`` one line, ``str`` the CLI's table, HTML in notebooks.

    A subclass (a dataclass declared with ``repr=False``, so this ``__repr__`` is kept) defines
    :meth:`summary` (one line: what kind of result, how many layers, the verdict) and
    :meth:`table` (the text the CLI prints).
    """

    def summary(self) -> str:
        raise NotImplementedError

    def table(self) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.summary()}>"

    def __str__(self) -> str:
        return self.table()

    def _repr_html_(self) -> str:
        return text_to_html(self.table, title=f"{type(self).__name__}: {self.summary()}")

    def to_records(self) -> dict[str, list[dict]]:
        """Every table of :meth:`table` as records, ``{table name: [{column: value}, ...]}``, with the
        values unformatted (numbers as numbers, None for an empty cell); ``"layers"``, ``"outputs"``,
        ``"ops"``, ``"fold"``... (a table's name is its first column's header unless the report names it)."""
        token = _RECORDED_TABLES.set([])
        try:
            self.table()
            tables = _RECORDED_TABLES.get()
        finally:
            _RECORDED_TABLES.reset(token)
        out: dict[str, list[dict]] = {}
        for name, headers, rows in tables:
            key, n = name, 2
            while key in out:
                key, n = f"{name} {n}", n + 1
            columns = [header or "row" for header in headers]
            out[key] = [{column: to_jsonable(value) for column, value in zip(columns, row)} for row in rows]
        return out

    def to_pandas(self) -> dict:
        """:meth:`to_records` as pandas DataFrames, ``{table name: DataFrame}`` (needs pandas)."""
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("to_pandas() needs pandas: pip install pandas (to_records() needs nothing)") from None
        return {name: pd.DataFrame.from_records(rows, columns=list(rows[0]) if rows else None)
                for name, rows in self.to_records().items()}


def output_label(name: str) -> str:
    """``output logits`` for an output named ``logits``; the name alone where it already says
    output (``output``, ``output_0``), so that no sentence reads "output output"."""
    return name if name.lower().startswith("output") else f"output {name}"


def describe_nonfinite(values) -> str | None:
    """``"3 of 8 elements non-finite (2 NaN, 1 inf)"``, or None when every element is finite."""
    values = np.asarray(values)
    if not np.issubdtype(values.dtype, np.inexact):
        return None
    nan, inf = int(np.isnan(values).sum()), int(np.isinf(values).sum())
    if not nan and not inf:
        return None
    return f"{nan + inf} of {values.size} elements non-finite ({nan} NaN, {inf} inf)"


def plural(count: int, noun: str) -> str:
    """``1 BN layer``, ``7 BN layers``: a count and its noun, for summaries."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def text_to_html(render, *, title: str | None = None) -> str:
    """HTML of the text ``render()`` returns: its :func:`format_table` tables as HTML tables, the
    other lines as preformatted text, everything escaped. ``render`` is called once."""
    token = _RENDERED_TABLES.set([])
    try:
        text = render()
        tables = _RENDERED_TABLES.get()
    finally:
        _RENDERED_TABLES.reset(token)
    parts = ['<div class="bncal-report">', _HTML_STYLE]
    if title:
        parts.append(f"<p><b>{html.escape(title)}</b></p>")
    position = 0
    for table_text, headers, rows in tables:
        found = text.find(table_text, position)
        if found < 0:  # rendered but not shown verbatim (indented, say): the text below keeps it
            continue
        parts.append(_html_text(text[position:found]))
        parts.append(_html_table(headers, rows))
        position = found + len(table_text)
    parts.append(_html_text(text[position:]))
    parts.append("</div>")
    return "".join(p for p in parts if p)


def _html_table(headers, rows) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for cell in row:
            verdict = _VERDICT_CLASSES.get(cell.split(" ", 1)[0])
            attr = f' class="{verdict}"' if verdict else ""
            cells.append(f"<td{attr}>{html.escape(cell)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _html_text(text: str) -> str:
    lines = text.strip("\n").splitlines()
    if not lines:
        return ""
    out = []
    for line in filter(str.strip, lines):  # blank lines only space the text; the HTML spaces itself
        verdict = _VERDICT_CLASSES.get(line.split(":", 1)[0].split(" ", 1)[0])
        attr = f' class="{verdict}"' if verdict else ""
        out.append(f"<pre{attr}>{html.escape(line)}</pre>")
    return "".join(out)


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


def format_table(rows, headers, *, name: str | None = None) -> str:
    """Render rows (sequences of cells) as an aligned text table. ``name`` names the table in
    :meth:`ReportDisplay.to_records` (default: its first header)."""
    rows = [list(row) for row in rows]
    records = _RECORDED_TABLES.get()
    if records is not None:
        records.append((name or headers[0] or "table", list(headers), rows))
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, c in enumerate(row):
            widths[i] = max(widths[i], len(c))
    line = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
    out = [line(headers), line(["-" * w for w in widths])]
    out.extend(line(r) for r in cells)
    text = "\n".join(out)
    rendered = _RENDERED_TABLES.get()
    if rendered is not None:
        rendered.append((text, list(headers), cells))
    return text


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


#: Version of the JSON report layout (:func:`report_json`): bumped when a field is renamed or
#: removed or changes meaning; new fields do not bump it. 2: a layer's ``samples`` (which counted
#: values per channel) is ``values_per_channel``.
JSON_SCHEMA_VERSION = 2


def report_json(value, *, command: str | None = None, argv: list[str] | None = None) -> dict:
    """``value`` (a report, or a dict of reports) as the JSON object ``--report-json`` writes.

    ``bncal_version``, ``schema_version`` (:data:`JSON_SCHEMA_VERSION`), ``command`` (``"check"``,
    say; None from the library) and ``argv`` (the command line) come first, then ``value``'s fields.
    """
    from . import __version__

    body = to_jsonable(value)
    if not isinstance(body, dict):
        body = {"report": body}
    head = {"bncal_version": __version__, "schema_version": JSON_SCHEMA_VERSION, "command": command,
            "argv": None if argv is None else [str(a) for a in argv]}
    return {**head, **body}


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


@dataclasses.dataclass(repr=False)
class LayerStats:
    """Moving statistics of one BN layer, reduced to summary numbers for reports."""

    mean: np.ndarray
    var: np.ndarray

    def __repr__(self) -> str:  # the arrays' extent, not their values
        mean, var = np.asarray(self.mean, np.float64), np.asarray(self.var, np.float64)
        if not mean.size:
            return "LayerStats(0 channels)"
        return (f"LayerStats({mean.size} channels, mean {mean.min():.4g}..{mean.max():.4g}, "
                f"var {var.min():.4g}..{var.max():.4g})")


@dataclasses.dataclass
class LayerRecalibration:
    """Before/after statistics of one recalibrated BN layer.

    ``mean_shift`` is the largest per-channel ``|new_mean - old_mean| / sqrt(new_var + eps)``:
    how far the old statistics were from the new ones, in units of the new standard deviation.
    ``var_ratio`` is the per-channel ``old_var / new_var`` farthest from 1 (in log scale).
    ``values_per_channel`` counts the values each channel's statistics pool: samples times
    spatial positions (times calls per forward), not samples; the report's ``samples`` counts those.
    """

    name: str
    channels: int
    values_per_channel: int
    calls_per_forward: int
    before: LayerStats
    after: LayerStats
    mean_shift: float
    var_ratio: float
    #: Per channel (:func:`channel_shift`): the figures ``mean_shift`` and ``var_ratio`` are the worst of
    #: (None without old statistics); for :func:`bncal.plot.plot_channels`, not part of the JSON report.
    channel_mean_shift: np.ndarray | None = dataclasses.field(default=None, repr=False, metadata={"json": False})
    channel_var_ratio: np.ndarray | None = dataclasses.field(default=None, repr=False, metadata={"json": False})


@dataclasses.dataclass
class SkippedLayer:
    name: str
    reason: str


@dataclasses.dataclass(repr=False)
class RecalibrationReport(ReportDisplay):
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
    guard: object = None  # the accuracy guard's bncal.guard.GuardReport, where one was asked for

    def summary(self) -> str:
        """``train mode: 7 BN layers from 4000 samples, 1 pass`` (eval mode: and whether it converged)."""
        text = (f"{self.mode} mode: {plural(len(self.layers), 'BN layer')} from {plural(self.samples, 'sample')}, "
                f"{self.passes} pass{'es' if self.passes != 1 else ''}")
        if self.mode == "eval":
            text += ", converged" if self.converged else f", NOT converged (last change {self.max_rel_change:.2e})"
        if self.skipped:
            text += f", {len(self.skipped)} skipped"
        return text

    def table(self) -> str:
        rows = [
            (l.name, l.channels, l.values_per_channel, l.mean_shift, l.var_ratio,
             float(np.mean(l.before.mean)), float(np.mean(l.after.mean)),
             float(np.mean(l.before.var)), float(np.mean(l.after.var)))
            for l in self.layers
        ]
        text = format_table(rows, ["layer", "channels", "values/channel", "max |shift| (sd)", "var ratio",
                                   "mean before", "mean after", "var before", "var after"], name="layers")
        for s in self.skipped:
            text += f"\nskipped {s.name}: {s.reason}"
        for note in self.notes:
            text += f"\nnote: {note}"
        if self.guard is not None:
            text += "\n\n" + self.guard.table()
        return text

    #: What the per-channel pictures compare (:func:`bncal.plot.plot_channels`).
    ratio_label = "old / new"
    channel_subject = "old statistics against the recalibrated ones, the check's default limits"

    def outside_check_limits(self) -> list[bool]:
        """Per layer: whether its old statistics were outside :class:`bncal.checking.CheckThresholds`'
        default limits (``bncal check`` would have failed them)."""
        from .limits import CheckThresholds

        limits = CheckThresholds()
        return [not (l.mean_shift <= limits.max_mean_shift and abs(math.log(l.var_ratio)) <= limits.max_var_log_ratio)
                if math.isfinite(l.mean_shift) and math.isfinite(l.var_ratio) and l.var_ratio > 0 else True
                for l in self.layers]

    def channel_rows(self) -> list[dict]:
        """Per layer with old statistics: ``{"layer", "mean_shift", "var_ratio", "passed"}``, the first
        two per channel (arrays), ``passed`` as :meth:`outside_check_limits` judges it."""
        return [{"layer": l.name, "mean_shift": l.channel_mean_shift, "var_ratio": l.channel_var_ratio,
                 "passed": not outside} for l, outside in zip(self.layers, self.outside_check_limits())
                if l.channel_mean_shift is not None]

    def plot(self, path=None, *, kind: str = "layers", **options):
        """The recalibration's picture (needs matplotlib): ``kind="layers"``
        (:func:`bncal.plot.plot_recalibration`) or ``"channels"`` (:func:`bncal.plot.plot_channels`).
        Returns a Figure; ``path`` writes it as a PNG too."""
        from . import plot

        draw = {"layers": plot.plot_recalibration, "channels": plot.plot_channels}
        if kind not in draw:
            raise ValueError(f"kind={kind!r}: give 'layers' or 'channels'")
        return draw[kind](self, path, **options)


def channel_shift(old_mean, old_var, new_mean, new_var, eps: float) -> tuple[np.ndarray, np.ndarray] | None:
    """Per channel, ``(|new_mean - old_mean| / sqrt(new_var + eps), (old_var + eps) / (new_var + eps))``;
    None when there are no old statistics of the same shape (a lazy BN not yet materialised)."""
    old_mean, old_var = np.asarray(old_mean, np.float64).reshape(-1), np.asarray(old_var, np.float64).reshape(-1)
    new_mean, new_var = np.asarray(new_mean, np.float64).reshape(-1), np.asarray(new_var, np.float64).reshape(-1)
    if old_mean.shape != new_mean.shape:
        return None
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.abs(new_mean - old_mean) / np.sqrt(new_var + eps), (old_var + eps) / (new_var + eps)


def summarize_shift(old_mean, old_var, new_mean, new_var, eps: float) -> tuple[float, float]:
    """``(max |mean shift| in new sd, var ratio farthest from 1)`` between two sets of statistics
    (the worst channels of :func:`channel_shift`)."""
    channels = channel_shift(old_mean, old_var, new_mean, new_var, eps)
    if channels is None:
        return float("nan"), float("nan")
    shift, ratio = channels
    with np.errstate(divide="ignore", invalid="ignore"):
        log_ratio = np.abs(np.log(ratio))
    if not shift.size:
        return 0.0, 1.0
    worst = int(np.nanargmax(log_ratio)) if np.isfinite(log_ratio).any() else 0
    return float(np.max(shift)), float(ratio[worst])

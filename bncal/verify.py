"""Compare model outputs with a reference (Polygraphy-like), under one tolerance rule.

The rule (:class:`Tolerance`), element by element, for each output::

    |actual - reference| <= atol + rtol * |reference| + scale * max |reference of this output|

Each term is 0 unless given. When none is given, the default is ``scale = 1e-4``
(:data:`DEFAULT_SCALE_TOL`): every element within 1e-4 of its output's own scale, which is what
"numerically the same model" means for a float32 network. A fold, an exporter or onnxruntime's
own graph rewrites reorder float32 sums, which moves a result by the rounding of the *largest*
values it accumulates, not of each element, and deep networks amplify it. The default leaves a
margin over what float32 itself does to torchvision families and still rejects a wrong fold by
10x or more (``tools/bench_zoo.py``; the figures are in the README, "Measured figures behind
the defaults"). ``atol``/``rtol`` alone give numpy.allclose's criterion exactly.

A NaN or an infinity on either side fails the output, whatever the other side holds (a model
whose outputs are all NaN matches its all-NaN export, and neither is deployable); the reason
says on which side and how many elements. A shape mismatch or a missing output fails with a
reason too. Per output the report gives the largest absolute and
relative error, the mean, median, 90th and 99th percentile absolute error, the reference's
scale (max |reference|), and the smallest tolerance of each kind that would have passed.

The comparison is plain numpy (no onnxruntime needed). Running models (sessions, feeds,
latency) is :mod:`bncal.onnx.runtime`'s; its ``ort_session``, ``run_onnx``, ``measure_latency`` and
``input_specs``, which lived here before, are still importable from here.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from .errors import BncalError, VerificationError
from .report import ReportDisplay, describe_nonfinite, format_table, plural

__all__ = [
    "ort_session", "run_onnx", "compare_outputs", "measure_latency", "input_specs",
    "ComparisonReport", "OutputComparison", "Tolerance", "DEFAULT_SCALE_TOL",
]

DEFAULT_SCALE_TOL = 1e-4
_TINY = np.finfo(np.float64).tiny  # keeps |a - r| / |r| finite where the reference is 0
_IN_RUNTIME = ("ort_session", "run_onnx", "measure_latency", "input_specs")


def __getattr__(name):
    if name in _IN_RUNTIME:  # imported on use, so comparing outputs does not load onnxruntime
        from .onnx import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """``|actual - reference| <= atol + rtol * |reference| + scale * max|reference|`` per element.

    ``max|reference|`` is taken per output (over all its batches). Build one with
    :meth:`given`, which applies the default (``scale=1e-4``) when no term is given.
    """

    atol: float = 0.0
    rtol: float = 0.0
    scale: float = 0.0

    def __post_init__(self):
        for field in ("atol", "rtol", "scale"):
            value = getattr(self, field)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise BncalError(f"tolerance {field}={value!r}: give a finite number >= 0")

    @classmethod
    def given(cls, atol: float | None = None, rtol: float | None = None,
              scale: float | None = None) -> "Tolerance":
        """The terms given (the others 0), or the default ``scale=1e-4`` when none is."""
        if atol is None and rtol is None and scale is None:
            return cls(scale=DEFAULT_SCALE_TOL)
        return cls(atol or 0.0, rtol or 0.0, scale or 0.0)

    def __str__(self) -> str:
        terms = [f"{self.atol:g}"] if self.atol else []
        terms += [f"{self.rtol:g} * |reference|"] if self.rtol else []
        terms += [f"{self.scale:g} * max|reference|"] if self.scale else []
        return "|actual - reference| <= " + (" + ".join(terms) or "0")


@dataclasses.dataclass
class OutputComparison:
    """How one output compared. Error fields are None when the shapes did not match.

    The smallest tolerances that would have passed, one kind at a time: ``required_atol`` is
    ``max(|a - r| - rtol * |r|)`` at the comparison's rtol (the element-wise rule without the
    scale term), ``required_rtol`` is ``max((|a - r| - atol) / |r|)`` at its atol, and
    ``required_scale_tol`` is ``max|a - r| / max|r|`` alone; all are inf when either side holds a
    NaN or inf (the error figures then cover the finite elements only). ``scale`` is ``max |r|``; ``median/p90/p99_abs_error`` are quantiles of
    ``|a - r|``.
    """

    name: str
    passed: bool
    max_abs_error: float | None = None
    max_rel_error: float | None = None
    mean_abs_error: float | None = None
    required_atol: float | None = None
    scale: float | None = None
    reason: str | None = None
    median_abs_error: float | None = None
    p90_abs_error: float | None = None
    p99_abs_error: float | None = None
    required_rtol: float | None = None
    required_scale_tol: float | None = None

    def problem(self) -> str:
        """Why this output failed, in a few words."""
        if self.reason:
            return self.reason
        return (f"max abs error {self.max_abs_error:.3g}, needs atol {self.required_atol:.3g} "
                f"(or rtol {self.required_rtol:.3g}, or {self.required_scale_tol:.3g} of the output's scale "
                f"{self.scale:.3g})")


@dataclasses.dataclass(repr=False)
class ComparisonReport(ReportDisplay):
    """Per-output comparisons under one :class:`Tolerance` (its terms are the fields ``atol``,
    ``rtol``, ``scale_tol``; :attr:`tolerance` gives it whole).

    ``passed`` only if every output passed, and at least one was compared.
    """

    outputs: list[OutputComparison]
    atol: float = 0.0
    rtol: float = 0.0
    scale_tol: float = 0.0

    @property
    def tolerance(self) -> Tolerance:
        return Tolerance(self.atol, self.rtol, self.scale_tol)

    @property
    def passed(self) -> bool:
        return bool(self.outputs) and all(o.passed for o in self.outputs)

    def worst(self) -> OutputComparison | None:
        """The output farthest from passing: a failed one first, then the largest error / scale."""
        return max(self.outputs, key=distance_from_passing, default=None)

    def worse_per_output(self, other: "ComparisonReport") -> "ComparisonReport":
        """This comparison with each output replaced by ``other``'s same-named one where that is
        farther from passing (two steps checked separately, reported as one figure)."""
        by_name = {o.name: o for o in other.outputs}
        outputs = [max(o, by_name.get(o.name, o), key=distance_from_passing) for o in self.outputs]
        return dataclasses.replace(self, outputs=outputs)

    def summary(self) -> str:
        """``PASSED: 1 output within scale_tol=0.0001`` (FAILED: which outputs)."""
        failed = [o.name for o in self.outputs if not o.passed]
        terms = {"atol": self.atol, "rtol": self.rtol, "scale_tol": self.scale_tol}
        within = ", ".join(f"{k}={v:g}" for k, v in terms.items() if v) or "atol=0"
        if self.passed:
            return f"PASSED: {plural(len(self.outputs), 'output')} within {within}"
        if not self.outputs:
            return "FAILED: no outputs compared"
        return f"FAILED: {len(failed)} of {plural(len(self.outputs), 'output')} beyond {within} ({', '.join(failed[:3])})"

    def table(self, *, name: str = "outputs") -> str:
        """A text table of the errors, then the tolerance, then one line PASSED or FAILED (``name``: the
        table's name in :meth:`to_records`)."""
        rows = [
            (o.name, o.max_abs_error, o.mean_abs_error, o.median_abs_error, o.p90_abs_error, o.p99_abs_error,
             o.max_rel_error, o.scale, o.required_scale_tol, o.required_atol, o.required_rtol,
             "pass" if o.passed else f"FAIL ({o.reason})" if o.reason else "FAIL")
            for o in self.outputs
        ]
        headers = ["output", "max abs err", "mean", "median", "p90", "p99", "max rel err", "scale",
                   "max err/scale", "min atol", "min rtol", "result"]
        return "\n".join([
            format_table(rows, headers, name=name),
            f"tolerance: {self.tolerance}; smallest passing: max err/scale alone, or atol at rtol "
            f"{self.tolerance.rtol:g}, or rtol at atol {self.tolerance.atol:g}",
            "PASSED" if self.passed else "FAILED",
        ])

    def raise_if_failed(self) -> None:
        """Raise :class:`VerificationError` naming the outputs that failed."""
        if not self.outputs:
            raise VerificationError("no outputs were compared; the reference has none")
        details = "; ".join(f"{o.name}: {o.problem()}" for o in self.outputs if not o.passed)
        if details:
            raise VerificationError(f"outputs differ beyond {self.tolerance}: {details}")


def distance_from_passing(o: OutputComparison) -> tuple[bool, float]:
    """A sort key: failed outputs after passing ones, then by the scale tolerance each would need."""
    ratio = o.required_scale_tol if o.required_scale_tol is not None else math.inf
    return (not o.passed, ratio if ratio == ratio else math.inf)


def compare_outputs(
    reference: dict[str, list[np.ndarray]],
    actual: dict[str, list[np.ndarray]],
    *,
    atol: float | None = None,
    rtol: float | None = None,
    scale_tol: float | None = None,
) -> ComparisonReport:
    """Compare every output of ``reference`` with the same-named output of ``actual``.

    Each output maps to a list of arrays (one per run, e.g. per batch), compared pairwise and
    summarised together; a bare array counts as a list of one. Outputs only in ``actual`` are
    ignored. The tolerance is ``Tolerance.given(atol, rtol, scale_tol)``: the terms given, or
    ``scale_tol=1e-4`` when none is (see the module docstring).
    """
    tolerance = Tolerance.given(atol, rtol, scale_tol)
    comparisons = []
    for name, ref_list in reference.items():
        if name not in actual:
            comparisons.append(OutputComparison(name, False, reason="missing from actual outputs"))
            continue
        comparisons.append(_compare_one(name, _as_list(ref_list), _as_list(actual[name]), tolerance))
    return ComparisonReport(comparisons, tolerance.atol, tolerance.rtol, tolerance.scale)


def _as_list(arrays) -> list[np.ndarray]:
    return [arrays] if isinstance(arrays, np.ndarray) or np.isscalar(arrays) else list(arrays)


def _compare_one(name, references, actuals, tolerance: Tolerance) -> OutputComparison:
    if len(references) != len(actuals):
        return OutputComparison(name, False, reason=f"{len(actuals)} arrays, reference has {len(references)}")
    for r, a in zip(references, actuals):
        if np.shape(r) != np.shape(a):
            return OutputComparison(name, False, reason=f"shape {np.shape(a)}, reference {np.shape(r)}")
    r = np.concatenate([np.asarray(x, np.float64).reshape(-1) for x in references]) if references else np.zeros(0)
    a = np.concatenate([np.asarray(x, np.float64).reshape(-1) for x in actuals]) if actuals else np.zeros(0)
    if r.size == 0:
        return OutputComparison(name, True, 0.0, 0.0, 0.0, 0.0, 0.0, None, 0.0, 0.0, 0.0, 0.0, 0.0)
    # A non-finite element fails on either side, even against the same value: NaN out is no parity.
    finite = np.isfinite(r) & np.isfinite(a)
    r_abs = np.abs(np.where(finite, r, 0.0))
    error = np.abs(np.subtract(a, r, out=np.zeros_like(r), where=finite))
    scale = float(r_abs.max())
    allowed = tolerance.atol + tolerance.rtol * r_abs
    if tolerance.scale:
        allowed = allowed + tolerance.scale * scale
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        relative = error / (r_abs + _TINY)  # may overflow to inf: correct for a 0 reference
        over_atol = np.maximum(error - tolerance.atol, 0.0)
        needed_rtol = np.where(over_atol > 0, over_atol / r_abs, 0.0)
    max_error = float(error.max())
    median, p90, p99 = (float(q) for q in np.quantile(error, [0.5, 0.9, 0.99]))
    result = OutputComparison(
        name,
        passed=bool(np.all(error <= allowed) and finite.all()),
        max_abs_error=max_error,
        max_rel_error=float(relative.max()),
        mean_abs_error=float(error.mean()),
        required_atol=float(max((error - tolerance.rtol * r_abs).max(), 0.0)),
        scale=scale,
        median_abs_error=median,
        p90_abs_error=p90,
        p99_abs_error=p99,
        required_rtol=float(needed_rtol.max()),
        required_scale_tol=max_error / scale if scale > 0 else (0.0 if max_error == 0 else math.inf),
    )
    if not finite.all():
        result.required_atol = result.required_rtol = result.required_scale_tol = math.inf
        sides = [f"{side}: {text}" for side, text in (("reference", describe_nonfinite(r)),
                                                       ("actual", describe_nonfinite(a))) if text]
        result.reason = "non-finite values (" + "; ".join(sides) + ")"
    return result

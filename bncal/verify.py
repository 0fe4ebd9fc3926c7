"""Compare ONNX models' outputs with a reference (Polygraphy-like).

The pass criterion is numpy.allclose's, element by element::

    |actual - reference| <= atol + rtol * |reference|

NaN passes only against NaN, and +-inf only against the same infinity; a shape mismatch or a
missing output fails with a reason. Per output the report gives the largest absolute and
relative error, the mean absolute error, the reference's scale (max |reference|) and the
smallest atol that would have passed at the given rtol.

The comparison is plain numpy (no onnxruntime needed). Running models (sessions, feeds,
latency) is :mod:`bncal.runtime`'s; its ``ort_session``, ``run_onnx``, ``measure_latency`` and
``input_specs``, which lived here before, are still importable from here.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .errors import VerificationError
from .report import ReportDisplay, format_table, plural

__all__ = [
    "ort_session", "run_onnx", "compare_outputs", "measure_latency", "input_specs",
    "ComparisonReport", "OutputComparison",
]

_TINY = np.finfo(np.float64).tiny  # keeps |a - r| / |r| finite where the reference is 0
_IN_RUNTIME = ("ort_session", "run_onnx", "measure_latency", "input_specs")


def __getattr__(name):
    if name in _IN_RUNTIME:  # imported on use, so comparing outputs does not load onnxruntime
        from . import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclasses.dataclass
class OutputComparison:
    """How one output compared. Error fields are None when the shapes did not match.

    ``required_atol`` is ``max(|a - r| - rtol * |r|, 0)`` over all elements: the smallest atol
    that would pass at this rtol (inf when NaN/inf do not match). ``scale`` is ``max |r|``.
    """

    name: str
    passed: bool
    max_abs_error: float | None = None
    max_rel_error: float | None = None
    mean_abs_error: float | None = None
    required_atol: float | None = None
    scale: float | None = None
    reason: str | None = None

    def problem(self) -> str:
        """Why this output failed, in a few words."""
        if self.reason:
            return self.reason
        return f"max abs error {self.max_abs_error:.3g}, needs atol {self.required_atol:.3g}"


@dataclasses.dataclass(repr=False)
class ComparisonReport(ReportDisplay):
    """Per-output comparisons under one ``(atol, rtol)``.

    ``passed`` only if every output passed, and at least one was compared.
    """

    outputs: list[OutputComparison]
    atol: float
    rtol: float

    @property
    def passed(self) -> bool:
        return bool(self.outputs) and all(o.passed for o in self.outputs)

    def summary(self) -> str:
        """``PASSED: 1 output within atol=1e-05, rtol=0.0001`` (FAILED: which outputs)."""
        failed = [o.name for o in self.outputs if not o.passed]
        within = f"atol={self.atol:g}, rtol={self.rtol:g}"
        if self.passed:
            return f"PASSED: {plural(len(self.outputs), 'output')} within {within}"
        if not self.outputs:
            return "FAILED: no outputs compared"
        return f"FAILED: {len(failed)} of {plural(len(self.outputs), 'output')} beyond {within} ({', '.join(failed[:3])})"

    def table(self) -> str:
        """A text table of the errors, then the tolerances, then one line PASSED or FAILED."""
        rows = [
            (o.name, o.max_abs_error, o.max_rel_error, o.mean_abs_error, o.required_atol, o.scale,
             "pass" if o.passed else f"FAIL ({o.reason})" if o.reason else "FAIL")
            for o in self.outputs
        ]
        headers = ["output", "max abs err", "max rel err", "mean abs err", "required atol", "scale", "result"]
        return "\n".join([
            format_table(rows, headers),
            f"tolerance: |actual - reference| <= {self.atol:g} + {self.rtol:g} * |reference|",
            "PASSED" if self.passed else "FAILED",
        ])

    def raise_if_failed(self) -> None:
        """Raise :class:`VerificationError` naming the outputs that failed."""
        if not self.outputs:
            raise VerificationError("no outputs were compared; the reference has none")
        details = "; ".join(f"{o.name}: {o.problem()}" for o in self.outputs if not o.passed)
        if details:
            raise VerificationError(f"outputs differ beyond atol={self.atol:g}, rtol={self.rtol:g}: {details}")


def compare_outputs(
    reference: dict[str, list[np.ndarray]],
    actual: dict[str, list[np.ndarray]],
    *,
    atol: float = 1e-5,
    rtol: float = 1e-4,
) -> ComparisonReport:
    """Compare every output of ``reference`` with the same-named output of ``actual``.

    Each output maps to a list of arrays (one per run, e.g. per batch), compared pairwise and
    summarised together; a bare array counts as a list of one. Outputs only in ``actual`` are
    ignored.
    """
    comparisons = []
    for name, ref_list in reference.items():
        if name not in actual:
            comparisons.append(OutputComparison(name, False, reason="missing from actual outputs"))
            continue
        comparisons.append(_compare_one(name, _as_list(ref_list), _as_list(actual[name]), atol, rtol))
    return ComparisonReport(comparisons, atol, rtol)


def _as_list(arrays) -> list[np.ndarray]:
    return [arrays] if isinstance(arrays, np.ndarray) or np.isscalar(arrays) else list(arrays)


def _compare_one(name, references, actuals, atol, rtol) -> OutputComparison:
    if len(references) != len(actuals):
        return OutputComparison(name, False, reason=f"{len(actuals)} arrays, reference has {len(references)}")
    for r, a in zip(references, actuals):
        if np.shape(r) != np.shape(a):
            return OutputComparison(name, False, reason=f"shape {np.shape(a)}, reference {np.shape(r)}")
    r = np.concatenate([np.asarray(x, np.float64).reshape(-1) for x in references]) if references else np.zeros(0)
    a = np.concatenate([np.asarray(x, np.float64).reshape(-1) for x in actuals]) if actuals else np.zeros(0)
    # NaN matches NaN and an infinity matches itself; every other non-finite pair is a mismatch.
    same_special = (np.isnan(r) & np.isnan(a)) | (np.isinf(r) & (r == a))
    finite = np.isfinite(r) & np.isfinite(a)
    mismatched = ~(finite | same_special)
    r_abs = np.abs(np.where(finite, r, 0.0))
    error = np.abs(np.subtract(a, r, out=np.zeros_like(r), where=finite))
    allowed_excess = error - rtol * r_abs
    with np.errstate(over="ignore"):  # error / tiny may overflow to inf: correct for a 0 reference
        relative = error / (r_abs + _TINY)
    count = r.size
    result = OutputComparison(
        name,
        passed=bool(np.all(error <= atol + rtol * r_abs) and not mismatched.any()),
        max_abs_error=float(error.max()) if count else 0.0,
        max_rel_error=float(relative.max()) if count else 0.0,
        mean_abs_error=float(error.mean()) if count else 0.0,
        required_atol=float(max(allowed_excess.max(), 0.0)) if count else 0.0,
        scale=float(r_abs.max()) if count else 0.0,
    )
    if mismatched.any():
        result.required_atol = float("inf")
        result.reason = f"{int(mismatched.sum())} NaN/inf elements do not match"
    return result

"""Run ONNX models in onnxruntime and compare their outputs with a reference (Polygraphy-like).

The pass criterion is numpy.allclose's, element by element::

    |actual - reference| <= atol + rtol * |reference|

NaN passes only against NaN, and +-inf only against the same infinity; a shape mismatch or a
missing output fails with a reason. Per output the report gives the largest absolute and
relative error, the mean absolute error, the reference's scale (max |reference|) and the
smallest atol that would have passed at the given rtol.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

from .errors import BncalError, VerificationError
from .report import format_table

__all__ = [
    "ort_session", "run_onnx", "compare_outputs", "measure_latency", "input_specs",
    "ComparisonReport", "OutputComparison",
]

_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
_ORT_LOAD_ERRORS = (
    _ort_state.Fail, _ort_state.InvalidArgument, _ort_state.InvalidGraph, _ort_state.InvalidProtobuf,
    _ort_state.NoSuchFile, _ort_state.NotImplemented, _ort_state.RuntimeException,
)
_TINY = np.finfo(np.float64).tiny  # keeps |a - r| / |r| finite where the reference is 0


def ort_session(
    model: onnx.ModelProto | str | Path,
    *,
    optimization_level: str = "basic",
    threads: int | None = None,
    providers: list[str] | None = None,
    log_severity: int | None = 4,
) -> ort.InferenceSession:
    """An onnxruntime session for ``model`` (a proto or a path).

    ``optimization_level`` is ``"disable"``, ``"basic"``, ``"extended"`` or ``"all"``; ``threads``
    sets the intra-op thread count (None: onnxruntime's default). ``providers`` defaults to the
    CPU provider; asking for one that this onnxruntime lacks (e.g. CUDA) is an error. Pass a
    path, not a proto, for a model over 2 GB. ``log_severity`` is onnxruntime's (default 4: fatal
    only, so the library prints nothing of its own accord: errors are raised, not logged; None:
    onnxruntime's default).
    """
    if optimization_level not in _LEVELS:
        raise BncalError(f"unknown optimization level {optimization_level!r}; use one of {', '.join(_LEVELS)}")
    options = ort.SessionOptions()
    options.graph_optimization_level = _LEVELS[optimization_level]
    if threads is not None:
        options.intra_op_num_threads = threads
    if log_severity is not None:
        options.log_severity_level = log_severity
    providers = list(providers or ["CPUExecutionProvider"])
    missing = [p for p in providers if p not in ort.get_available_providers()]
    if missing:
        raise BncalError(
            f"onnxruntime provider {', '.join(missing)} is not available here "
            f"(available: {', '.join(ort.get_available_providers())})"
        )
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    try:
        return ort.InferenceSession(source, sess_options=options, providers=providers)
    except _ORT_LOAD_ERRORS as error:
        raise BncalError(f"onnxruntime cannot load the model: {error}") from error


def run_onnx(session_or_model, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run a session (or a model, in a fresh ``ort_session``) on ``feeds``; outputs by name.

    Feeds must name exactly the model's inputs.
    """
    session = session_or_model
    if not isinstance(session, ort.InferenceSession):
        session = ort_session(session)
    expected = [i.name for i in session.get_inputs()]
    missing = [name for name in expected if name not in feeds]
    unknown = [name for name in feeds if name not in expected]
    if missing or unknown:
        raise BncalError(
            f"feeds do not match the model's inputs {expected}: missing {missing}, unknown {unknown}"
        )
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


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


@dataclasses.dataclass
class ComparisonReport:
    """Per-output comparisons under one ``(atol, rtol)``.

    ``passed`` only if every output passed, and at least one was compared.
    """

    outputs: list[OutputComparison]
    atol: float
    rtol: float

    @property
    def passed(self) -> bool:
        return bool(self.outputs) and all(o.passed for o in self.outputs)

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


def measure_latency(session: ort.InferenceSession, feeds: dict[str, np.ndarray], *, warmup: int = 3,
                    repeat: int = 20) -> dict[str, float]:
    """Wall-clock latency of ``session.run`` on ``feeds``: ``{"median_ms", "min_ms"}`` over ``repeat`` runs."""
    if repeat < 1:
        raise BncalError(f"repeat must be at least 1, not {repeat}")
    names = [o.name for o in session.get_outputs()]
    for _ in range(warmup):
        session.run(names, feeds)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        session.run(names, feeds)
        times.append((time.perf_counter() - start) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times)}


def input_specs(
    model: onnx.ModelProto | str | Path,
) -> list[tuple[str, np.dtype, tuple[int | str | None, ...] | None]]:
    """``(name, numpy dtype, shape)`` of each graph input that is not an initializer.

    A dynamic dimension is its symbolic name (``"N"``) or None when it has none; the whole shape
    is None when even the rank is unknown.
    """
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    initializers = {init.name for init in model.graph.initializer}
    specs = []
    for info in model.graph.input:
        if info.name in initializers:
            continue
        if info.type.WhichOneof("value") != "tensor_type":
            raise BncalError(f"input {info.name!r} is not a tensor; only tensor inputs are supported")
        tensor_type = info.type.tensor_type
        dims = None  # rank unknown
        if tensor_type.HasField("shape"):
            dims = tuple(
                d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim
            )
        specs.append((info.name, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)), dims))
    return specs

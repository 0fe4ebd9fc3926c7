"""Output comparison against hand-computed numbers (running models: test_runtime.py)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bncal.errors import BncalError, VerificationError
from bncal.verify import compare_outputs


def test_errors_match_the_closed_form():
    reference = {"y": [np.array([1.0, -2.0, 4.0])]}
    actual = {"y": [np.array([1.1, -2.0, 3.6])]}
    (out,) = compare_outputs(reference, actual, atol=0.25, rtol=0.05).outputs
    # |a - r| = (0.1, 0, 0.4); relative (0.1, 0, 0.1); minus rtol*|r| = (0.05, -0.1, 0.2).
    assert out.max_abs_error == pytest.approx(0.4)
    assert out.max_rel_error == pytest.approx(0.1)
    assert out.mean_abs_error == pytest.approx(0.5 / 3)
    assert out.required_atol == pytest.approx(0.2)
    assert out.scale == 4.0
    assert out.passed and out.reason is None
    assert not compare_outputs(reference, actual, atol=0.15, rtol=0.05).passed


def test_required_atol_is_the_pass_boundary():
    rng = np.random.default_rng(0)
    reference = {"y": rng.normal(0, 3, (50,))}
    actual = {"y": reference["y"] + rng.normal(0, 1e-3, (50,))}
    needed = compare_outputs(reference, actual, rtol=1e-4).outputs[0].required_atol
    assert compare_outputs(reference, actual, atol=needed * (1 + 1e-9), rtol=1e-4).passed
    assert not compare_outputs(reference, actual, atol=needed * (1 - 1e-6), rtol=1e-4).passed


def test_several_arrays_per_output_are_summarised_together():
    reference = {"y": [np.zeros(2), np.zeros(3)]}
    actual = {"y": [np.array([1.0, 1.0]), np.array([0.0, 0.0, 4.0])]}
    (out,) = compare_outputs(reference, actual, atol=10).outputs
    assert out.mean_abs_error == pytest.approx(6.0 / 5) and out.max_abs_error == 4.0
    assert out.max_rel_error > 1e300  # reference 0: |a - r| / tiny (inf once it overflows)
    assert out.passed


@pytest.mark.parametrize("ref, act, reason", [
    ([np.nan, 1.0], [np.nan, 1.0], "reference: 1 of 2 elements non-finite (1 NaN, 0 inf); "
                                   "actual: 1 of 2 elements non-finite (1 NaN, 0 inf)"),
    ([np.nan, 1.0], [0.0, 1.0], "reference: 1 of 2 elements non-finite (1 NaN, 0 inf)"),
    ([1.0, 1.0], [np.nan, np.inf], "actual: 2 of 2 elements non-finite (1 NaN, 1 inf)"),
    ([np.inf, -np.inf], [np.inf, -np.inf], "reference: 2 of 2 elements non-finite (0 NaN, 2 inf); "
                                           "actual: 2 of 2 elements non-finite (0 NaN, 2 inf)"),
    ([np.inf, 1.0], [1e30, 1.0], "reference: 1 of 2 elements non-finite (0 NaN, 1 inf)"),
])
def test_nan_and_inf_fail_on_either_side_even_against_themselves(ref, act, reason):
    report = compare_outputs({"y": np.array(ref)}, {"y": np.array(act)})
    (out,) = report.outputs
    assert not out.passed and not report.passed and report.summary().startswith("FAILED")
    assert out.reason == f"non-finite values ({reason})" and out.required_atol == float("inf")
    assert out.max_abs_error == 0.0  # the finite elements agree: only the non-finite ones fail


def test_shape_mismatch_and_missing_output_fail_with_reasons():
    report = compare_outputs({"a": [np.zeros((2, 3))], "b": [np.zeros(1)]}, {"a": [np.zeros((3, 2))]})
    a, b = report.outputs
    assert not a.passed and a.reason == "shape (3, 2), reference (2, 3)" and a.max_abs_error is None
    assert not b.passed and b.reason == "missing from actual outputs"
    assert not report.passed


def test_table_ends_with_one_verdict_line_and_failures_raise():
    passing = compare_outputs({"y": [np.ones(3)]}, {"y": [np.ones(3)]})
    assert passing.table().splitlines()[-1] == "PASSED"
    passing.raise_if_failed()
    failing = compare_outputs({"y": [np.ones(3)]}, {"y": [np.ones(3) * 2]})
    lines = failing.table().splitlines()
    assert lines[-1] == "FAILED" and lines[0].split()[:2] == ["output", "max"] and "FAIL" in lines[2]
    with pytest.raises(VerificationError, match="y: max abs error 1, needs atol 1"):
        failing.raise_if_failed()
    nothing = compare_outputs({}, {"y": [np.ones(3)]})
    assert not nothing.passed and nothing.table().endswith("FAILED")
    with pytest.raises(VerificationError, match="no outputs were compared"):
        nothing.raise_if_failed()


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(np.float64, 6, elements=st.floats(-1e3, 1e3)),
    hnp.arrays(np.float64, 6, elements=st.floats(-1, 1)),
    st.floats(0, 1), st.floats(0, 0.1),
)
def test_passed_agrees_with_numpy_allclose(reference, noise, atol, rtol):
    actual = reference + noise
    report = compare_outputs({"y": reference}, {"y": actual}, atol=atol, rtol=rtol)
    assert report.passed == np.allclose(actual, reference, atol=atol, rtol=rtol)


def test_comparing_needs_no_onnxruntime_and_old_runtime_imports_still_work():
    script = (
        "import sys\n"
        "from bncal.verify import compare_outputs\n"
        "assert 'onnxruntime' not in sys.modules\n"
        "import bncal.onnx.runtime\n"
        "from bncal.verify import ort_session, run_onnx, measure_latency, input_specs\n"
        "assert ort_session is bncal.onnx.runtime.ort_session and input_specs is bncal.onnx.runtime.input_specs\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_default_rule_is_relative_to_each_outputs_scale():
    from bncal.verify import DEFAULT_SCALE_TOL, Tolerance

    assert Tolerance.given() == Tolerance(scale=DEFAULT_SCALE_TOL) and DEFAULT_SCALE_TOL == 1e-4
    # Output "big" has scale 1e4: errors of 0.5 pass (limit 1.0); "small" has scale 1: 5e-4 fails (limit 1e-4).
    reference = {"big": [np.array([1e4, -3.0, 0.0])], "small": [np.array([1.0, 0.5])]}
    actual = {"big": [np.array([1e4 + 0.5, -3.5, 0.5])], "small": [np.array([1.0, 0.5005])]}
    big, small = compare_outputs(reference, actual).outputs
    assert big.passed and not small.passed
    assert big.scale == 1e4 and big.required_scale_tol == pytest.approx(0.5 / 1e4)
    assert small.required_scale_tol == pytest.approx(5e-4)
    # Alone, each kind: atol = max |a - r|, rtol = max |a - r| / |r| (inf where r = 0 and a differs).
    assert big.required_atol == pytest.approx(0.5) and big.required_rtol == float("inf")
    assert small.required_atol == pytest.approx(5e-4) and small.required_rtol == pytest.approx(1e-3)
    assert "small: max abs error 0.0005, needs atol 0.0005 (or rtol 0.001, or 0.0005 of the output's scale 1)" in (
        str(pytest.raises(VerificationError, compare_outputs(reference, actual).raise_if_failed).value))


def test_given_terms_add_up_and_the_rest_are_zero():
    r = np.array([10.0, -1.0, 2.0])
    a = r + np.array([0.02, -0.02, 0.02])
    # allowed: 0.01 + 0.001 * |r| + 0.001 * 10 = (0.03, 0.021, 0.022): passes; without the scale term it does not.
    assert compare_outputs({"y": r}, {"y": a}, atol=0.01, rtol=1e-3, scale_tol=1e-3).passed
    assert not compare_outputs({"y": r}, {"y": a}, atol=0.01, rtol=1e-3).passed
    report = compare_outputs({"y": r}, {"y": a}, atol=0.01)
    assert report.tolerance.scale == 0 and report.outputs[0].required_rtol == pytest.approx(0.01 / 1.0)
    assert str(report.tolerance) == "|actual - reference| <= 0.01"
    with pytest.raises(BncalError, match="tolerance atol=-1: give a finite number >= 0"):
        compare_outputs({"y": r}, {"y": a}, atol=-1)


def test_error_quantiles_and_worst_output():
    rng = np.random.default_rng(3)
    reference = rng.normal(0, 1, 1000)
    actual = reference + rng.normal(0, 1e-3, 1000)
    report = compare_outputs({"y": [reference[:400], reference[400:]]}, {"y": [actual[:400], actual[400:]],
                                                                          "extra": [reference]})
    (out,) = report.outputs
    error = np.abs(actual - reference)
    assert out.median_abs_error == pytest.approx(np.median(error))
    assert out.p90_abs_error == pytest.approx(np.quantile(error, 0.9))
    assert out.p99_abs_error == pytest.approx(np.quantile(error, 0.99))
    assert out.mean_abs_error <= out.p99_abs_error <= out.max_abs_error
    assert report.worst() is out and report.table().splitlines()[-1] == ("PASSED" if out.passed else "FAILED")

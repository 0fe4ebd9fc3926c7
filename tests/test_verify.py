"""Output comparison against hand-computed numbers, and the onnxruntime helpers on a tiny model."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, helper, numpy_helper

from bncal.errors import BncalError, VerificationError
from bncal.verify import compare_outputs, input_specs, measure_latency, ort_session, run_onnx


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


@pytest.mark.parametrize("ref, act, passed", [
    ([np.nan, 1.0], [np.nan, 1.0], True),
    ([np.nan, 1.0], [0.0, 1.0], False),
    ([1.0, 1.0], [np.nan, 1.0], False),
    ([np.inf, -np.inf], [np.inf, -np.inf], True),
    ([np.inf, 1.0], [-np.inf, 1.0], False),
    ([np.inf, 1.0], [1e30, 1.0], False),
])
def test_nan_and_inf_match_only_themselves(ref, act, passed):
    (out,) = compare_outputs({"y": np.array(ref)}, {"y": np.array(act)}).outputs
    assert out.passed is passed
    if not passed:
        assert out.reason == "1 NaN/inf elements do not match" and out.required_atol == float("inf")


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


@pytest.fixture(scope="module")
def add_one_model():
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "one"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", None, 3]),
         helper.make_tensor_value_info("one", TensorProto.FLOAT, [])],  # an IR < 4 style initializer input
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", None, 3])],
        [numpy_helper.from_array(np.array(1.0, np.float32), "one")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_run_onnx_and_input_specs(add_one_model, tmp_path):
    path = tmp_path / "add.onnx"
    path.write_bytes(add_one_model.SerializeToString())
    assert input_specs(path) == [("x", np.dtype(np.float32), ("N", None, 3))]
    x = np.arange(6, dtype=np.float32).reshape(1, 2, 3)
    session = ort_session(path, optimization_level="disable", threads=1)
    np.testing.assert_array_equal(run_onnx(session, {"x": x})["y"], x + 1)
    np.testing.assert_array_equal(run_onnx(add_one_model, {"x": x})["y"], x + 1)
    with pytest.raises(BncalError, match=r"missing \['x'\], unknown \['z'\]"):
        run_onnx(session, {"z": x})
    latency = measure_latency(session, {"x": x}, warmup=1, repeat=3)
    assert set(latency) == {"median_ms", "min_ms"} and 0 < latency["min_ms"] <= latency["median_ms"]


def test_session_errors_are_bncal_errors(add_one_model, tmp_path):
    with pytest.raises(BncalError, match="unknown optimization level 'max'"):
        ort_session(add_one_model, optimization_level="max")
    with pytest.raises(BncalError, match="CUDAExecutionProvider is not available"):
        ort_session(add_one_model, providers=["CUDAExecutionProvider"])
    with pytest.raises(BncalError, match="onnxruntime cannot load the model"):
        ort_session(tmp_path / "missing.onnx")

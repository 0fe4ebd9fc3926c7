"""bncal.onnx.runtime: sessions, feeds by input name or position, latency; and the shared calibration policy."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from bncal.calibration import DataOrder, data_source
from bncal import check_onnx
from bncal.errors import BncalError
from bncal.onnx.graphs import find_batchnorms
from bncal.onnx.recalibration import recalibrate_onnx
from bncal.onnx.runtime import input_specs, measure_latency, ort_session, run_onnx


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
    np.testing.assert_array_equal(run_onnx(session, x)["y"], x + 1)  # a bare array for a single input
    np.testing.assert_array_equal(run_onnx(session, (x,))["y"], x + 1)
    with pytest.raises(BncalError, match=r"missing \['x'\], unknown \['z'\]"):
        run_onnx(session, {"z": x})
    latency = measure_latency(session, {"x": x}, warmup=1, repeat=3)
    assert set(latency) == {"median_ms", "min_ms", "max_ms", "times_ms"} and len(latency["times_ms"]) == 3
    assert 0 < latency["min_ms"] <= latency["median_ms"] <= latency["max_ms"]
    assert (latency["min_ms"], latency["max_ms"]) == (min(latency["times_ms"]), max(latency["times_ms"]))


def test_session_errors_are_bncal_errors(add_one_model, tmp_path):
    with pytest.raises(BncalError, match="unknown optimization level 'max'"):
        ort_session(add_one_model, optimization_level="max")
    with pytest.raises(BncalError, match="CUDAExecutionProvider is not available"):
        ort_session(add_one_model, providers=["CUDAExecutionProvider"])
    with pytest.raises(BncalError, match="onnxruntime cannot load the model") as error:
        ort_session(tmp_path / "missing.onnx")
    assert "\n" not in str(error.value)
    assert ort_session(add_one_model).get_providers()[-1] == "CPUExecutionProvider"


# ------------------------------------------------------------------------------------------------
# Feeds by name: a graph with two inputs of the same shape, so a mix-up gives wrong numbers, not an error.

EPS = 1e-3


def two_input_model():
    """``y = relu(bn_a(a)) + bn_b(b)``, ``a`` and ``b`` both ``(n, 3)``, distinct BN statistics."""
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    for name in ("a", "b"):
        params = {"scale": rng.uniform(0.5, 1.5, 3), "bias": rng.uniform(-0.5, 0.5, 3),
                  "mean": rng.uniform(-1, 1, 3), "var": rng.uniform(0.5, 2.0, 3)}
        inits += [numpy_helper.from_array(v.astype(np.float32), f"{name}.{k}") for k, v in params.items()]
        nodes.append(helper.make_node("BatchNormalization", [name] + [f"{name}.{k}" for k in params],
                                      [f"bn_{name}.y"], name=f"bn_{name}", epsilon=EPS))
    nodes += [helper.make_node("Relu", ["bn_a.y"], ["relu_a"]), helper.make_node("Add", ["relu_a", "bn_b.y"], ["y"])]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["n", 3]) for n in ("a", "b")]
    graph = helper.make_graph(nodes, "two_inputs", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])


def two_input_data():
    rng = np.random.default_rng(1)
    a = rng.normal(2.0, 3.0, (40, 3)).astype(np.float32)
    b = rng.normal(-1.0, 0.5, (40, 3)).astype(np.float32)
    return a, b


BATCH_FORMS = {
    "dict a, b": lambda a, b: {"a": a, "b": b},
    "dict b, a": lambda a, b: {"b": b, "a": a},
    "tuple": lambda a, b: (a, b),
    "list": lambda a, b: [a, b],
}


def batches_as(form, a, b):
    return [BATCH_FORMS[form](a[i:i + 16], b[i:i + 16]) for i in range(0, 40, 16)]


@pytest.mark.parametrize("form", BATCH_FORMS)
def test_recalibrate_onnx_feeds_by_name_or_position(form):
    model = two_input_model()
    a, b = two_input_data()
    new, report = recalibrate_onnx(model, batches_as(form, a, b))
    values = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in new.graph.initializer}
    for info, x in zip(find_batchnorms(new), (a, b)):
        x = x.astype(np.float64)
        np.testing.assert_allclose(values[info.mean_initializer], x.mean(0), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(values[info.var_initializer], x.var(0), rtol=1e-6)
    assert [l.name for l in report.layers] == ["bn_a", "bn_b"] and report.samples == 40 and report.batches == 3


@pytest.mark.parametrize("form", BATCH_FORMS)
def test_check_onnx_feeds_by_name_or_position(form):
    model = two_input_model()
    a, b = two_input_data()
    report = check_onnx(model, batches_as(form, a, b))
    stored = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    for layer, name, x in zip(report.layers, ("a", "b"), (a, b)):
        x = x.astype(np.float64)
        expected = np.max(np.abs(stored[f"{name}.mean"] - x.mean(0)) / np.sqrt(x.var(0) + EPS))
        assert layer.name == f"bn_{name}" and layer.values_per_channel == 40
        assert layer.mean_shift == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("batch,message", [
    ((np.zeros((4, 3), np.float32),) * 3, r"batch 0 holds 3 values but the model has 2 inputs \['a', 'b'\]"),
    ({"a": np.zeros((4, 3), np.float32), "c": np.zeros((4, 3), np.float32)}, r"missing \['b'\], unknown \['c'\]"),
    (np.zeros((4, 3), np.float32), "give each batch as a dict"),
    ((np.zeros((4, 3), np.float32), np.zeros((4, 2), np.float32)), r"input 'b': expected shape \(n, 3\), got \(4, 2\) in batch 0"),
])
def test_feeds_that_do_not_fit_are_one_line_errors(batch, message):
    model = two_input_model()
    for command in (lambda: recalibrate_onnx(model, [batch]), lambda: check_onnx(model, [batch])):
        with pytest.raises(BncalError, match=message) as error:
            command()
        assert "\n" not in str(error.value)


def test_single_input_model_refuses_an_inputs_and_labels_tuple(add_one_model):
    x = np.zeros((2, 1, 3), np.float32)
    with pytest.raises(BncalError, match=r"holds 2 values but the model has 1 inputs \['x'\]"):
        run_onnx(add_one_model, (x, np.zeros(2)))


# ------------------------------------------------------------------------------------------------
# bncal.calibration


def test_data_order_anchors_until_the_first_mismatch_and_notes_it_once():
    order = DataOrder()
    order.start_pass()  # the first eval pass has no previous pass to pair batches with
    assert [order.anchored(i, f) for i, f in enumerate([1.0, 2.0, 3.0])] == [False] * 3
    order.end_pass()
    order.start_pass()
    assert [order.anchored(i, f) for i, f in enumerate([1.0, 2.0, 3.0])] == [True] * 3
    order.end_pass()
    assert order.notes == []
    for _ in range(2):
        order.start_pass()
        assert [order.anchored(i, f) for i, f in enumerate([1.0, 9.0, 3.0, 4.0])] == [True, False, False, False]
        order.end_pass()
        order.start_pass()
        assert [order.anchored(i, f) for i, f in enumerate([1.0, 2.0, 3.0])] == [True, False, False]
        order.end_pass()
    assert order.notes == [DataOrder.NOTE]


def test_data_source_refusals():
    with pytest.raises(BncalError, match="a list, a DataLoader or a function returning a fresh iterable, "
                                         "not a one-shot iterator"):
        data_source(iter([1, 2]), reread=True)
    assert list(data_source(iter([1, 2]), reread=False)()) == [1, 2]
    fresh = data_source(lambda: iter([1, 2]), reread=True)
    assert list(fresh()) == list(fresh()) == [1, 2]
    for single in (np.zeros((4, 3)), {"x": np.zeros(3)}):
        with pytest.raises(BncalError, match="not a single batch"):
            data_source(single, reread=False)
    with pytest.raises(BncalError, match="iterable of batches, got int"):
        data_source(3, reread=False)


# ------------------------------------------------------------------------------------------------
# Execution providers and the form of derived graph they get.


def test_provider_names_resolve_as_users_write_them():
    from bncal.onnx.runtime import available_providers, resolve_providers

    assert available_providers()[-1] == "CPUExecutionProvider"
    assert "AzureExecutionProvider" not in available_providers()
    assert resolve_providers(["cpu"]) == resolve_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert resolve_providers([" CPU ", "cpuexecutionprovider"]) == ["CPUExecutionProvider"]  # once, in order
    with pytest.raises(BncalError, match=r"provider potato is not available here \(available: .*CPUExecutionProvider"):
        resolve_providers(["cpu", "potato"])


def test_statistics_form_follows_the_first_provider():
    from bncal.onnx.runtime import providers_on_device, statistics_form

    assert statistics_form(None) == statistics_form([]) == statistics_form(["CPUExecutionProvider"]) == "batchnorm"
    for first in ("CUDAExecutionProvider", "TensorrtExecutionProvider", "OpenVINOExecutionProvider",
                  "DmlExecutionProvider", ("CUDAExecutionProvider", {"device_id": "1"})):
        assert statistics_form([first, "CPUExecutionProvider"]) == "arithmetic"
    assert statistics_form(["CPUExecutionProvider", "CUDAExecutionProvider"]) == "batchnorm"
    # onnxruntime's PyPI build lists Azure (remote endpoints, no local nodes) first: not a device.
    assert statistics_form(["AzureExecutionProvider", "CPUExecutionProvider"]) == "batchnorm"
    assert statistics_form(["AzureExecutionProvider", "CUDAExecutionProvider"]) == "arithmetic"
    assert providers_on_device(["TensorrtExecutionProvider", "CUDAExecutionProvider", "OpenVINOExecutionProvider",
                                ("CUDAExecutionProvider", {"device_id": "3"}), "CPUExecutionProvider"], 1) == [
        ("TensorrtExecutionProvider", {"device_id": "1"}), ("CUDAExecutionProvider", {"device_id": "1"}),
        "OpenVINOExecutionProvider", ("CUDAExecutionProvider", {"device_id": "3"}), "CPUExecutionProvider"]


def test_ort_session_takes_providers_with_options(add_one_model):
    session = ort_session(add_one_model, providers=[("CPUExecutionProvider", {})])
    assert session.get_providers() == ["CPUExecutionProvider"]
    with pytest.raises(BncalError, match="CUDAExecutionProvider is not available"):
        ort_session(add_one_model, providers=[("CUDAExecutionProvider", {"device_id": "0"})])


def test_arithmetic_form_forced_on_cpu_gives_the_same_statistics(monkeypatch):
    """What a CUDA/TensorRT/OpenVINO session would run, run on the CPU: same recalibration, same check."""
    import bncal.onnx.runtime

    from test_onnx_recalibrate import data, export, first_bn_net, split, stored

    model = export(first_bn_net(), [(2, 3, 9, 9)])
    batches = split(data(), [16, 7, 16, 21])
    results, used = {}, []
    for form in ("batchnorm", "arithmetic"):
        # Every derived graph is built in the form statistics_form picks: force it, and see it asked.
        monkeypatch.setattr(bncal.onnx.runtime, "statistics_form", lambda providers=None, form=form: used.append(form) or form)
        results[form] = {mode: recalibrate_onnx(model, batches, mode=mode, tol=1e-7)[0] for mode in ("train", "eval")}
        results[form]["check"] = check_onnx(model, batches)
    assert set(used) == {"batchnorm", "arithmetic"}
    for mode in ("train", "eval"):
        ours, theirs = stored(results["arithmetic"][mode]), stored(results["batchnorm"][mode])
        for name, (mean, var) in theirs.items():
            assert np.max(np.abs(ours[name][0] - mean) / np.sqrt(var)) < 1e-5, (mode, name)
            np.testing.assert_allclose(ours[name][1], var, rtol=1e-5, err_msg=f"{mode} {name}")
    for ours, theirs in zip(results["arithmetic"]["check"].layers, results["batchnorm"]["check"].layers, strict=True):
        assert ours.values_per_channel == theirs.values_per_channel
        assert ours.mean_shift == pytest.approx(theirs.mean_shift, rel=1e-5)
        assert ours.var_ratio == pytest.approx(theirs.var_ratio, rel=1e-5)

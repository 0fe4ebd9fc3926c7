"""One ONNX BatchNorm view (bncal.onnx.view) read by inspect, check, recalibrate and fold-export.

The case that split them before: a TorchScript export (IR 3, every initializer also a graph
input) of a network whose statistics were never updated. The exporter deduplicates the equal
all-0 / all-1 tensors, so the BNs read their statistics through Identity nodes of one shared
tensor (another BN's scale or shift). Every command must see the same BNs, by the same names,
with the same values.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper
from torch import nn

import bncal
from bncal import check_onnx
from bncal.folding import fold_onnx
from bncal.onnx.recalibration import recalibrate_onnx
from bncal.onnx.view import constant_array, find_batchnorms
from models import other_exporters


def never_updated_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4),
                         nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 6), nn.BatchNorm1d(6)).eval()


@pytest.fixture(scope="module")
def shared_file():
    net = never_updated_net()
    model = other_exporters.as_ir3(other_exporters.torchscript_file(net, torch.zeros(8, 3, 8, 8), opset=9))
    assert sum(n.op_type == "Identity" for n in model.graph.node) >= 6  # the shared statistics
    return net, model


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return [rng.normal(0.3, 1.5, (8, 3, 8, 8)).astype(np.float32) for _ in range(6)]


def test_the_view_reads_identity_shared_statistics(shared_file):
    _, model = shared_file
    infos = find_batchnorms(model)
    assert len(infos) == 3 and all(info.handled for info in infos)
    for info in infos:
        assert np.all(info.mean_value == 0) and np.all(info.var_value == 1)
        assert info.channels == info.mean_value.size and info.momentum == pytest.approx(0.9)
        # Reached through Identity nodes: the initializer is not the node's own input.
        assert info.mean_initializer != info.mean


def test_inspect_check_recalibrate_and_fold_agree_on_every_bn(shared_file, data):
    net, model = shared_file
    names = [info.name for info in find_batchnorms(model)]

    report = bncal.inspect_model(model)
    assert [layer.name for layer in report.layers] == names
    assert all(layer.stats == "never updated" for layer in report.layers)
    (bn001,) = report.by_rule("BN001")
    assert bn001.layers == names

    before = check_onnx(model, data)
    assert not before.passed and [layer.name for layer in before.layers] == names
    assert all(not layer.passed for layer in before.layers)

    fixed, recal = recalibrate_onnx(model, data)
    assert [layer.name for layer in recal.layers] == names and not recal.skipped
    # Independent reference: the same network recalibrated in PyTorch on the same batches.
    reference = never_updated_net()
    bncal.recalibrate(reference, [torch.from_numpy(x) for x in data])
    bns = [m for m in reference.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for info, bn in zip(find_batchnorms(fixed), bns):
        np.testing.assert_allclose(info.mean_value, bn.running_mean.double().numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(info.var_value, bn.running_var.double().numpy(), rtol=1e-5, atol=1e-6)
    assert check_onnx(fixed, data).passed
    assert bncal.inspect_model(fixed).by_rule("BN001") == []

    _, decisions = fold_onnx(model, treat_initializer_inputs_as_constant=True)
    assert [d.bn for d in decisions] == names and all(d.folded for d in decisions)


def constant_node_model() -> onnx.ModelProto:
    """Conv -> BN whose scale, shift and statistics are Constant nodes (some behind an Identity)."""
    rng = np.random.default_rng(1)
    w = numpy_helper.from_array(rng.normal(size=(3, 2, 1, 1)).astype(np.float32), "w")

    def constant(name, value):
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value, np.float32)))

    nodes = [constant("scale", [1.5, 0.5, 2.0]), constant("shift", [0.1, -0.2, 0.3]), constant("mean", [0, 0, 0]),
             constant("var_source", [1, 1, 1]), helper.make_node("Identity", ["var_source"], ["var"]),
             helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("BatchNormalization", ["c", "scale", "shift", "mean", "var"], ["y"], name="bn")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 2, 4, 4])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3, 4, 4])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])


def test_constant_node_parameters_are_read_folded_and_named_where_they_cannot_be_written():
    model = constant_node_model()
    (info,) = find_batchnorms(model)
    np.testing.assert_array_equal(info.scale_value, [1.5, 0.5, 2.0])
    np.testing.assert_array_equal(info.var_value, [1, 1, 1])
    assert not info.handled and "Constant node" in info.skip_reason  # recalibrate cannot write into it

    assert bncal.inspect_model(model).by_rule("BN001")[0].layers == ["bn"]

    folded, (decision,) = fold_onnx(model)
    assert decision.folded
    assert [n.op_type for n in folded.graph.node] == ["Conv"]  # the Constant and Identity nodes went too
    import onnxruntime as ort

    x = np.random.default_rng(2).normal(size=(2, 2, 4, 4)).astype(np.float32)
    expected = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    got = ort.InferenceSession(folded.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_constant_array_follows_identity_chains_only():
    import onnx_ir as ir

    model = ir.from_proto(constant_node_model())
    values = {v.name: v for node in model.graph for v in node.outputs}
    np.testing.assert_array_equal(constant_array(values["var"]), [1, 1, 1])
    assert constant_array(values["c"]) is None  # computed by a Conv


def test_bncal_check_is_the_front_door_whatever_was_imported_first(shared_file, data):
    """``bncal.check`` is the function even after its module was imported by name (it lives in
    bncal.api, so no submodule import can shadow it), and it routes an ONNX model to check_onnx."""
    import bncal.api  # noqa: F401

    _, model = shared_file
    report = bncal.check(model, data)
    assert callable(bncal.check) and report.verdict == check_onnx(model, data).verdict == "FAILED"

"""Writing and running an ``onnx_ir.Model`` without a protobuf copy of its weights
(:mod:`bncal.onnx.io`): the file is one ONNX file that onnx and onnxruntime read as the
model, byte for byte in its tensors, and a session fed the tensors' own memory computes the same."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from torch import nn

from bncal.torch.export import export_owned_ir
from bncal.folding import fold
from bncal.onnx.io import save_onnx, serialized_size
from bncal.onnx.runtime import ort_session


def _model() -> ir.Model:
    """Large float32 and float16 weights, an int64 shape constant, a small bias: every kind of initializer."""
    rng = np.random.default_rng(0)
    x = ir.val("x", ir.DataType.FLOAT, ("batch", 300))
    weight = ir.Value(name="w", const_value=ir.tensor(rng.standard_normal((300, 400)).astype(np.float32)))
    half = ir.Value(name="h", const_value=ir.tensor(rng.standard_normal((400, 100)).astype(np.float16)))
    bias = ir.Value(name="b", const_value=ir.tensor(rng.standard_normal(400).astype(np.float32)))
    shape = ir.Value(name="shape", const_value=ir.tensor(np.array([-1, 100], np.int64)))
    matmul = ir.node("MatMul", [x, weight])
    add = ir.node("Add", [matmul.outputs[0], bias])
    cast = ir.node("Cast", [add.outputs[0]], attributes={"to": ir.DataType.FLOAT16})
    second = ir.node("MatMul", [cast.outputs[0], half])
    reshape = ir.node("Reshape", [second.outputs[0], shape])
    out = reshape.outputs[0]
    out.name, out.dtype, out.shape = "y", ir.DataType.FLOAT16, ir.Shape(["batch", 100])
    graph = ir.Graph([x], [out], nodes=[matmul, add, cast, second, reshape],
                     initializers=[weight, half, bias, shape], opset_imports={"": 18}, name="g")
    return ir.Model(graph, ir_version=10)


def _expected(model: ir.Model, x: np.ndarray) -> np.ndarray:
    tensors = {name: value.const_value.numpy() for name, value in model.graph.initializers.items()}
    hidden = (x @ tensors["w"] + tensors["b"]).astype(np.float16)
    return (hidden @ tensors["h"]).reshape(-1, 100)


def test_the_written_file_is_the_model(tmp_path):
    model = _model()
    order = list(model.graph.initializers)
    path = save_onnx(model, tmp_path / "m.onnx")
    assert path.stat().st_size == serialized_size(model)
    assert list(model.graph.initializers) == order  # the model is left as it was

    loaded = onnx.load(str(path))
    onnx.checker.check_model(loaded, full_check=True)
    reference = ir.serde.serialize_model(model)
    by_name = {t.name: t for t in loaded.graph.initializer}
    assert sorted(by_name) == sorted(t.name for t in reference.graph.initializer)
    for tensor in reference.graph.initializer:  # same name, type, shape and bytes
        assert by_name[tensor.name] == tensor
    assert [n.op_type for n in loaded.graph.node] == [n.op_type for n in reference.graph.node]

    x = np.random.default_rng(1).standard_normal((3, 300)).astype(np.float32)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    expected = _expected(model, x).astype(np.float32)  # float16 sums: within float16's rounding of the scale
    np.testing.assert_allclose(got.astype(np.float32), expected, rtol=0, atol=2e-3 * np.abs(expected).max())


@pytest.mark.parametrize("level", ["disable", "basic"])
def test_a_session_on_the_tensors_own_memory_computes_what_the_file_does(tmp_path, level):
    model = _model()
    path = save_onnx(model, tmp_path / "m.onnx")
    x = np.random.default_rng(2).standard_normal((2, 300)).astype(np.float32)
    from_memory = ort_session(model, optimization_level=level).run(None, {"x": x})[0]
    from_file = ort_session(path, optimization_level=level).run(None, {"x": x})[0]
    np.testing.assert_array_equal(from_memory, from_file)


def test_an_exported_model_written_from_ir_runs_as_the_module(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 64, 3), nn.BatchNorm2d(64), nn.ReLU(), nn.Flatten(), nn.Linear(64 * 14 * 14, 10)).eval()
    x = torch.randn(2, 3, 16, 16)
    exported = export_owned_ir(fold(net, (x,)).model, (x,), keep_batchnorm=True)
    path = save_onnx(exported, tmp_path / "m.onnx")
    onnx.checker.check_model(str(path))
    with torch.no_grad():
        expected = net(x).numpy()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_a_fold_without_weight_copies_shares_what_it_leaves_and_never_changes_the_model():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3)).eval()
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(2, 3, 8, 8)
    folded = fold(net, (x,), copy_weights=False).model
    assert folded[3].weight is net[3].weight  # left alone by the fold: shared, not copied
    assert folded[0].weight is not net[0].weight  # folded: a new parameter
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    with torch.no_grad():
        torch.testing.assert_close(folded(x), net(x), rtol=1e-5, atol=1e-5)

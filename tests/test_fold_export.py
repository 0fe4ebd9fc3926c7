"""fold-export: parity proven in onnxruntime, failures caught, nothing written on failure."""

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import helper, numpy_helper
from torch import nn

import bncal
import bncal.folding
from bncal.cli import main
from bncal.errors import VerificationError
from bncal.folding.export import fold_export_onnx, fold_export_torch
from models import zoo


def _randomize_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.3)
    return model.eval()


def _make_corrupting(original_fold):
    """A graph fold that gets one folded bias slightly wrong: verification must catch it."""
    def corrupting(model, **kwargs):
        proto, decisions = original_fold(model, **kwargs)
        for init in proto.graph.initializer:
            if init.name.endswith("_bnfold") and len(init.dims) == 1:
                values = numpy_helper.to_array(init).copy()
                values[0] += 0.05
                init.CopyFrom(numpy_helper.from_array(values, init.name))
                return proto, decisions
        raise AssertionError("no folded bias to corrupt")
    return corrupting


_corrupting_fold = _make_corrupting(bncal.folding.fold_onnx)


def _make_corrupting_module_fold(real_fold):
    """A module fold that gets the first folded Conv bias slightly wrong."""
    def corrupting(model, example_inputs, **kwargs):
        result = real_fold(model, example_inputs, **kwargs)
        conv = next(m for m in result.model.modules() if isinstance(m, nn.Conv2d))
        with torch.no_grad():
            conv.bias[0] += 0.05
        return result
    return corrupting


@pytest.mark.parametrize("factory", [zoo.resnet_small, zoo.mobilenet_small])
def test_torch_models_fold_completely_and_match(tmp_path, factory):
    model = _randomize_bn(factory())
    x = torch.randn(2, 3, 32, 32)
    out = tmp_path / "m.onnx"
    proto, report = fold_export_torch(model, (x,), out, latency_batches=(1,))
    assert report.passed and out.exists()
    assert report.bn_left == 0 and all(d.folded for d in report.decisions)
    assert report.ops_before["BatchNormalization"] == len(report.decisions)
    onnx.checker.check_model(onnx.load(out))
    worst = max(o.max_abs_error / o.scale for o in report.comparison.outputs)
    assert worst <= 1e-5
    assert "PASSED" in report.table()


def test_corrupted_fold_is_caught_and_nothing_is_written(tmp_path):
    model = _randomize_bn(zoo.resnet_small())
    out = tmp_path / "m.onnx"
    with pytest.raises(VerificationError, match="does not match") as info:
        fold_export_torch(model, (torch.randn(2, 3, 32, 32),), out, module_fold=False, fold_fn=_corrupting_fold,
                          latency_batches=())
    assert not out.exists()
    assert not info.value.report.passed and "FAILED" in info.value.report.table()
    with pytest.raises(VerificationError):
        fold_export_torch(model, (torch.randn(2, 3, 32, 32),), out, module_fold=False, fold_fn=_corrupting_fold,
                          latency_batches=(), keep_failed=True)
    assert not out.exists() and (tmp_path / "m.FAILED-VERIFICATION.onnx").exists()


def test_a_corrupted_module_fold_is_caught_by_the_fold_figure(tmp_path, monkeypatch):
    """The module fold is checked against the model in PyTorch: a wrong folded bias fails the
    fold figure (not the export figure, which compares the export with what was exported)."""
    monkeypatch.setattr(bncal.folding, "fold", _make_corrupting_module_fold(bncal.folding.fold))
    model = _randomize_bn(zoo.resnet_small())
    out = tmp_path / "m.onnx"
    with pytest.raises(VerificationError, match="the folded model does not match the original") as info:
        fold_export_torch(model, (torch.randn(2, 3, 32, 32),), out)
    report = info.value.report
    assert not report.comparison.passed and report.export_comparison.passed and not out.exists()


def test_what_only_a_module_must_keep_is_folded_in_the_graph(tmp_path):
    """A BN module called twice and a BN with a hook stay BNs in the module fold; the graph fold
    folds their nodes, and the fold figure then includes the graph fold's own comparison."""

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3)
            self.shared = nn.BatchNorm2d(4)
            self.hooked = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
            self.hooked[1].register_forward_hook(lambda module, inputs, output: output * 2)

        def forward(self, x):
            return self.hooked(self.shared(self.b(torch.relu(self.shared(self.a(x))))))

    model = _randomize_bn(Twice())
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        expected = model(x)
    proto, report = fold_export_torch(model, (x,), tmp_path / "m.onnx")
    assert report.passed and report.bn_left == 0
    assert [d.bn for d in report.decisions if d.folded] == ["shared", "hooked.1", *[d.bn for d in report.decisions[2:]]]
    assert len(report.decisions) == 3 and all(d.folded for d in report.decisions)
    import onnxruntime as ort

    got = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_in_place_activations_export_out_of_place_and_the_model_keeps_its_own(tmp_path):
    model = _randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU6(inplace=True),
                                        nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU(inplace=True)))
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        expected = model(x).numpy()
    _, report = fold_export_torch(model, (x,), tmp_path / "m.onnx")
    assert report.passed and report.bn_left == 0
    assert model[2].inplace and model[5].inplace  # the user's model is never changed
    import onnxruntime as ort

    got = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def _gemm_bn_model():
    """Gemm (alpha, beta, transB) -> BN: what onnxruntime leaves unfused."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 4)).astype(np.float32)
    c = rng.standard_normal(6).astype(np.float32)
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(c, "C")]
    for name, value in [("s", rng.random(6) + 0.5), ("b", rng.standard_normal(6)), ("m", rng.standard_normal(6)),
                        ("v", rng.random(6) + 0.5)]:
        inits.append(numpy_helper.from_array(value.astype(np.float32), name))
    nodes = [helper.make_node("Gemm", ["x", "W", "C"], ["g"], alpha=0.7, beta=1.3, transB=1),
             helper.make_node("BatchNormalization", ["g", "s", "b", "m", "v"], ["y"], name="bn")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 6])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_onnx_input_folds_gemm_bn_and_verifies(tmp_path):
    model = _gemm_bn_model()
    feeds = [{"x": np.random.default_rng(i).standard_normal((5, 4)).astype(np.float32)} for i in range(2)]
    out = tmp_path / "f.onnx"
    folded, report = fold_export_onnx(model, out, verify_feeds=feeds, latency_batches=())
    assert report.passed and report.bn_left == 0 and report.decisions[0].target
    assert [n.op_type for n in onnx.load(out).graph.node] == ["Gemm"]


def test_onnx_corrupted_fold_caught(tmp_path):
    out = tmp_path / "f.onnx"
    feeds = [{"x": np.ones((3, 4), np.float32)}]
    with pytest.raises(VerificationError):
        fold_export_onnx(_gemm_bn_model(), out, verify_feeds=feeds, fold_fn=_corrupting_fold, latency_batches=())
    assert not out.exists()


def _write_model_file(tmp_path):
    (tmp_path / "net.py").write_text(
        "import sys\nsys.path.insert(0, %r)\nfrom models import zoo\n"
        "def build():\n    return zoo.resnet_small(width=8)\n" % str(zoo.Path(zoo.__file__).resolve().parents[1]))
    model = _randomize_bn(zoo.resnet_small(width=8))
    from safetensors.torch import save_file

    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((12, 3, 32, 32)).astype(np.float32))


def test_cli_fold_export_with_data_and_json(tmp_path):
    _write_model_file(tmp_path)
    out = tmp_path / "m.onnx"
    result = CliRunner().invoke(main, ["fold-export", str(tmp_path / "net.py:build"), "--weights", str(tmp_path / "w.safetensors"),
                                       "--data", str(tmp_path / "x.npy"), "--batch-size", "4", "--no-check", "-o", str(out),
                                       "--report-json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    assert "PASSED" in result.output and out.exists()
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["fold_export"]["ops_after"].get("BatchNormalization", 0) == 0


def test_cli_corrupted_fold_exits_1_without_output(tmp_path, monkeypatch):
    _write_model_file(tmp_path)
    monkeypatch.setattr(bncal.folding, "fold", _make_corrupting_module_fold(bncal.folding.fold))
    out = tmp_path / "m.onnx"
    result = CliRunner().invoke(main, ["fold-export", str(tmp_path / "net.py:build"), "--weights", str(tmp_path / "w.safetensors"),
                                       "--input-shape", "2,3,32,32", "-o", str(out)])
    assert result.exit_code == 1
    assert "FAILED" in result.output and result.output.strip().splitlines()[-1].startswith("error: the folded model does not match")
    assert not out.exists()



def test_cli_ir3_file_parameters_as_inputs(tmp_path):
    """An IR 3 file lists initializers as inputs: left with a reason, folded when declared constant."""
    model = onnx.load(zoo.Path(zoo.__file__).with_name("mnist_cnn_stale.onnx"))
    inputs = {i.name for i in model.graph.input}
    for init in model.graph.initializer:
        if init.name not in inputs:
            model.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    model.ir_version = 3
    onnx.save(model, tmp_path / "ir3.onnx")
    out = tmp_path / "folded.onnx"
    allow = ["--allow", "BN001"]  # the shipped stale statistics: this test is about the IR 3 convention
    result = CliRunner().invoke(main, ["fold-export", str(tmp_path / "ir3.onnx"), "-o", str(out), *allow])
    assert result.exit_code == 0, result.output
    assert "7 BatchNormalization left" in result.output and "also a graph input (IR < 4 model)" in result.output
    result = CliRunner().invoke(main, ["fold-export", str(tmp_path / "ir3.onnx"), "-o", str(out), "--force",
                                       "--constant-initializer-inputs", *allow])
    assert result.exit_code == 0, result.output
    assert "0 BatchNormalization left" in result.output and "PASSED" in result.output


def _wrong_epsilon_fold(model, **kwargs):
    """A fold that uses epsilon 1e-3 where the graph says 1e-5: a plausible bug, small but real."""
    wrong = onnx.ModelProto()
    wrong.CopyFrom(model)
    for node in wrong.graph.node:
        if node.op_type != "BatchNormalization":
            continue
        for a in node.attribute:
            if a.name == "epsilon":
                a.f = 1e-3
                break
        else:
            node.attribute.append(helper.make_attribute("epsilon", 1e-3))
    return bncal.folding.fold_onnx(wrong, **kwargs)


def test_a_wrong_epsilon_fails_the_default_tolerance(tmp_path):
    model = _randomize_bn(zoo.resnet_small())
    out = tmp_path / "m.onnx"
    with pytest.raises(VerificationError, match="the folded model does not match the original") as info:
        fold_export_torch(model, (torch.randn(2, 3, 32, 32),), out, module_fold=False, fold_fn=_wrong_epsilon_fold)
    report = info.value.report
    assert not out.exists() and not report.comparison.passed and report.export_comparison.passed
    # The error, relative to the output's scale, is far above 1e-5 and far below a gross mistake.
    assert 1e-4 < report.comparison.worst().required_scale_tol < 1e-1
    proto = bncal.export_onnx(model, (torch.randn(2, 3, 32, 32),), keep_batchnorm=True)
    with pytest.raises(VerificationError, match="does not match the original"):
        fold_export_onnx(proto, fold_fn=_wrong_epsilon_fold)


def test_two_figures_blame_the_exporter_not_the_fold(tmp_path):
    """A model that computes something else while torch.export traces it: the export figure fails,
    the fold figure is exact, and the error says so."""

    class TracesDifferently(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())

        def forward(self, x):
            y = self.body(x)
            return y + 1e-3 if torch.compiler.is_exporting() else y

    model = _randomize_bn(TracesDifferently())
    out = tmp_path / "m.onnx"
    with pytest.raises(VerificationError, match="the export differs from the model it was exported from, in "
                                                "onnxruntime: an exporter or runtime difference, not the fold") as info:
        fold_export_torch(model, (torch.randn(2, 3, 8, 8),), out)
    report = info.value.report
    assert report.comparison.passed and report.comparison.worst().required_scale_tol < 1e-6
    assert not report.export_comparison.passed and not out.exists()
    assert "export: exported graph in onnxruntime vs the folded model in PyTorch eval" in report.table()


def test_a_graph_onnxruntime_cannot_run_is_one_line_naming_the_node():
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["y"], name="bad_reshape")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.array([3, 5], np.int64), "shape")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(bncal.BncalError) as info:
        fold_export_onnx(model)
    message = str(info.value)
    assert "\n" not in message and message.startswith("the original model: onnxruntime refused to run node "
                                                      "'bad_reshape' (Reshape)")


def test_latency_is_opt_in_and_skips_what_a_fixed_batch_cannot_take(tmp_path):
    model = _randomize_bn(zoo.resnet_small(width=8))
    proto = bncal.export_onnx(model, (torch.randn(4, 3, 32, 32),), keep_batchnorm=True, dynamic_batch=False)
    messages = []
    _, report = fold_export_onnx(proto, progress=messages.append)
    assert report.latency_ms == {} and "latency" not in report.step_seconds
    assert messages == ["folding BatchNorms in the graph", "verifying in onnxruntime"]
    _, report = fold_export_onnx(proto, latency_batches=(1, 4, 32))
    assert list(report.latency_ms["folded"]) == [4] and list(report.latency_ms["original"]) == [4]
    assert report.notes == ["latency at batch 1, 32 skipped: the model's batch size is fixed at 4"]
    # Each figure is the median of its timed runs, shown with their range (what tells noise from a difference).
    for label in ("original", "folded"):
        low, high = report.latency_range_ms[label][4]
        assert 0 < low <= report.latency_ms[label][4] <= high
        assert f"{report.latency_ms[label][4]:.3g} ({low:.3g}..{high:.3g})" in report.table()


def test_verification_takes_the_models_own_shapes():
    from bncal.folding.export import example_feeds

    fixed = _gemm_bn_model()
    fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 3
    assert [f["x"].shape for f in example_feeds(fixed)] == [(3, 4), (3, 4)]
    assert [f["x"].shape for f in example_feeds(_gemm_bn_model())] == [(1, 4), (2, 4)]
    assert [f["x"].shape for f in example_feeds(_gemm_bn_model(), input_shapes=[(5, 4)])] == [(5, 4), (5, 4)]
    with pytest.raises(bncal.BncalError, match="input 'x' fixes dimension 1 at 4, the shape given has 3"):
        example_feeds(_gemm_bn_model(), input_shapes={"x": (2, 3)})
    image = _gemm_bn_model()
    image.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "features"
    with pytest.raises(bncal.BncalError, match="dynamic dimension 1 .features. besides the batch; give its shape"):
        example_feeds(image)


def test_fit_to_batch_size_cuts_and_skips_with_notes():
    from bncal.folding.export import fit_to_batch_size

    notes = []
    batches = [np.arange(10).reshape(5, 2), np.zeros((1, 2)), {"x": np.ones((4, 2))}]
    pieces = list(fit_to_batch_size(batches, 2, notes))
    assert [p.shape if isinstance(p, np.ndarray) else p["x"].shape for p in pieces] == [(2, 2), (2, 2), (2, 2), (2, 2)]
    assert pieces[1].tolist() == [[4, 5], [6, 7]]
    assert notes == ["batches of 5 samples were cut into batches of 2, the model's fixed batch size",
                     "a batch of 1 samples was skipped: the model's batch size is fixed at 2",
                     "batches of 4 samples were cut into batches of 2, the model's fixed batch size"]

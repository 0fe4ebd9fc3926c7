"""bncal.onnx.recalibration against float64 references, PyTorch, and the inputs it must refuse."""

import copy
import io
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from bncal.errors import BncalError
from bncal.onnx.graphs import find_batchnorms, make_train_graph
from bncal.onnx.recalibration import recalibrate_onnx
from tests_support import randomize_bn


def export(net, args, names=("x",), dynamic_spatial=False):
    """TorchScript export keeping BN nodes (``TrainingMode.PRESERVE``; the default folds Conv+BN)."""
    axes = {name: ({0: "n", 2: "h", 3: "w"} if dynamic_spatial else {0: "n"}) for name in names}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net.eval(), tuple(torch.zeros(*a) for a in args), buffer, dynamo=False,
                          training=torch.onnx.TrainingMode.PRESERVE, input_names=list(names),
                          output_names=["y"], dynamic_axes=axes)
    model = onnx.load_from_string(buffer.getvalue())
    assert any(n.op_type == "BatchNormalization" for n in model.graph.node)
    return model


def bn_modules(net):
    return [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def first_bn_net():
    """The first BN sees the raw input; then conv/BN/ReLU stages and a BatchNorm1d head."""
    torch.manual_seed(0)
    return randomize_bn(nn.Sequential(
        nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 3 * 3, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)))


def data(n=60, seed=0):
    rng = np.random.default_rng(seed)
    scale = np.array([1.0, 5.0, 0.1]).reshape(1, 3, 1, 1)
    return (rng.standard_normal((n, 3, 9, 9)) * scale + 3.0).astype(np.float32)


def split(x, sizes):
    assert sum(sizes) == len(x)
    return np.split(x, np.cumsum(sizes)[:-1])


def moments64(a):
    axes = tuple(i for i in range(a.ndim) if i != 1)
    a = a.astype(np.float64)
    return a.mean(axes), a.var(axes)


def stored(model):
    """``{bn name: (mean, var)}`` as stored in ``model``, float64."""
    values = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    return {i.name: (values[i.mean_initializer], values[i.var_initializer])
            for i in find_batchnorms(model) if i.handled}


def assert_stats_close(got, expected, tol):
    """Relative agreement: variances within ``tol``; means within ``tol`` times the larger of
    |mean| and the standard deviation (a mean near 0 has no meaningful relative error, and a
    float32 mean of 3.0 is only stored to about 1e-7 * 3)."""
    mean, var = got
    ref_mean, ref_var = expected
    assert np.max(np.abs(mean - ref_mean) / np.maximum(np.abs(ref_mean), np.sqrt(ref_var))) < tol
    np.testing.assert_allclose(var, ref_var, rtol=tol)


def torch_train_reference(net, batches):
    """PreciseBN by hand: float64 train-mode forward of each batch, BN inputs pooled exactly."""
    net = copy.deepcopy(net).double().train()
    inputs = {i: [] for i in range(len(bn_modules(net)))}
    hooks = [bn.register_forward_pre_hook(lambda m, a, i=i: inputs[i].append(a[0].detach().numpy()))
             for i, bn in enumerate(bn_modules(net))]
    with torch.no_grad():
        for x in batches:
            net(torch.from_numpy(x).double())
    for h in hooks:
        h.remove()
    return [moments64(np.concatenate([np.moveaxis(a, 1, -1).reshape(-1, a.shape[1]) for a in arrays])[:, :, None])
            for arrays in inputs.values()]


# ------------------------------------------------------------------------------------------------


def test_first_bn_equals_float64_population_statistics_for_any_split():
    model = export(first_bn_net(), [(2, 3, 9, 9)])
    x = data()
    first = find_batchnorms(model)[0].name
    expected = moments64(x)
    for sizes in ([16, 16, 16, 12], [7, 40, 13]):
        new, report = recalibrate_onnx(model, split(x, sizes))
        assert_stats_close(stored(new)[first], expected, 1e-6)
        assert report.batches == len(sizes) and report.samples == 60 and report.passes == 1
        assert report.layers[0].values_per_channel == 60 * 81


def test_train_mode_matches_pytorch_float64_reference():
    net = first_bn_net()
    model = export(net, [(2, 3, 9, 9)])
    batches = split(data(), [16, 16, 16, 12])
    new, report = recalibrate_onnx(model, batches)
    got = stored(new)
    for info, expected in zip(find_batchnorms(model), torch_train_reference(net, batches)):
        assert_stats_close(got[info.name], expected, 1e-5)
    assert [l.name for l in report.layers] == [i.name for i in find_batchnorms(model)]


def test_eval_mode_reaches_the_one_batch_fixed_point_for_any_split():
    model = export(first_bn_net(), [(2, 3, 9, 9)])
    x = data()
    train_model, infos = make_train_graph(model, expose_stats=True, keep_model_outputs=False)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    one_batch = ort.InferenceSession(train_model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    values = one_batch.run(None, {"x": x})
    outputs = dict(zip([o.name for o in train_model.graph.output], values))
    for sizes in ([16, 16, 16, 12], [5, 50, 5]):
        new, report = recalibrate_onnx(model, split(x, sizes), mode="eval", tol=1e-7, max_passes=20)
        assert report.converged and report.passes > 1
        got = stored(new)
        for info in infos:
            expected = (outputs[info.mean_output].astype(np.float64), outputs[info.var_output].astype(np.float64))
            assert_stats_close(got[info.name], expected, 1e-5)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_agrees_with_bncal_recalibrate(mode):
    import bncal

    net = first_bn_net()
    model = export(net, [(2, 3, 9, 9)])
    batches = split(data(), [16, 16, 16, 12])
    new, report = recalibrate_onnx(model, batches, mode=mode, tol=1e-7, max_passes=20)
    torch_net = copy.deepcopy(net)
    torch_report = bncal.recalibrate(torch_net, [torch.from_numpy(b) for b in batches], mode=mode, tol=1e-7,
                                     max_passes=20)
    assert report.converged and torch_report.converged
    got = stored(new)
    for info, bn in zip(find_batchnorms(new), bn_modules(torch_net)):
        assert_stats_close(got[info.name], (bn.running_mean.double().numpy(), bn.running_var.double().numpy()), 1e-5)


def test_stale_mnist_cnn_with_shared_statistics_agrees_with_bncal_recalibrate():
    """The stale MNIST CNN's statistics (all 0 / 1) are deduplicated by the exporter into
    Identity nodes of shared tensors; they are un-shared and the result matches PyTorch."""
    import bncal
    from models import zoo

    net = zoo.mnist_cnn_stale()
    model = export(net, [(2, 1, 28, 28)])
    assert any(n.op_type == "Identity" for n in model.graph.node)
    images, _ = zoo.mnist_arrays("calib")
    x = images.numpy()[np.random.default_rng(0).permutation(len(images))[:128]]
    batches = split(x, [64, 64])
    new, report = recalibrate_onnx(model, batches)
    assert report.notes and all("initializer" in note for note in report.notes)
    onnx.checker.check_model(new, full_check=True)
    torch_net = copy.deepcopy(net)
    bncal.recalibrate(torch_net, [torch.from_numpy(b) for b in batches])
    got = stored(new)
    for info, bn in zip(find_batchnorms(new), bn_modules(torch_net)):
        assert_stats_close(got[info.name], (bn.running_mean.double().numpy(), bn.running_var.double().numpy()), 1e-5)


def test_only_statistics_initializers_change():
    model = export(first_bn_net(), [(2, 3, 9, 9)])
    model.metadata_props.add(key="owner", value="someone")
    model.graph.initializer[0].doc_string = "kept"
    original = model.SerializeToString()
    new, report = recalibrate_onnx(model, split(data(), [30, 30]))
    assert model.SerializeToString() == original  # input untouched
    changed = {n for i in find_batchnorms(model) for n in (i.mean_initializer, i.var_initializer)}

    def without_statistics(m):
        m = copy.deepcopy(m)
        kept = [t for t in m.graph.initializer if t.name not in changed]
        del m.graph.initializer[:]
        m.graph.initializer.extend(kept)
        return m.SerializeToString()

    assert without_statistics(new) == without_statistics(model)
    old_inits = {t.name: t for t in model.graph.initializer}
    for t in new.graph.initializer:
        if t.name in changed:
            assert (t.data_type, list(t.dims)) == (old_inits[t.name].data_type, list(old_inits[t.name].dims))
            assert not np.array_equal(numpy_helper.to_array(t), numpy_helper.to_array(old_inits[t.name]))
    assert report.notes == [] and report.skipped == []


def test_multi_input_model():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn_a, self.bn_b = nn.BatchNorm2d(2), nn.BatchNorm1d(3)
            self.head = nn.Linear(2 + 3, 2)

        def forward(self, a, b):
            return self.head(torch.cat([self.bn_a(a).mean((2, 3)), torch.relu(self.bn_b(b))], 1))

    model = export(randomize_bn(TwoInputs()), [(2, 2, 4, 4), (2, 3)], names=("a", "b"))
    rng = np.random.default_rng(0)
    a = rng.normal(2, 3, (40, 2, 4, 4)).astype(np.float32)
    b = rng.normal(-1, 0.5, (40, 3)).astype(np.float32)
    batches = [{"a": a[i:i + 16], "b": b[i:i + 16]} for i in range(0, 40, 16)]
    new, report = recalibrate_onnx(model, batches)
    got = list(stored(new).values())
    assert_stats_close(got[0], moments64(a), 1e-6)
    assert_stats_close(got[1], moments64(b), 1e-6)
    with pytest.raises(BncalError, match="give each batch as a dict"):
        recalibrate_onnx(model, [a])


def test_dynamic_spatial_size():
    torch.manual_seed(0)
    net = randomize_bn(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                                   nn.AdaptiveAvgPool2d(1), nn.Flatten()))
    model = export(net, [(2, 3, 8, 8)], dynamic_spatial=True)
    rng = np.random.default_rng(0)
    batches = [rng.normal(1, 2, (4, 3, 8, 8)).astype(np.float32), rng.normal(1, 2, (6, 3, 11, 5)).astype(np.float32)]
    new, report = recalibrate_onnx(model, batches)
    pooled = np.concatenate([np.moveaxis(b, 1, -1).reshape(-1, 3) for b in batches])
    assert_stats_close(list(stored(new).values())[0], moments64(pooled[:, :, None]), 1e-6)
    assert report.layers[0].values_per_channel == 4 * 64 + 6 * 55
    assert report.layers[1].values_per_channel == 4 * 36 + 6 * 27
    new_eval, _ = recalibrate_onnx(model, batches, mode="eval")
    assert_stats_close(list(stored(new_eval).values())[0], moments64(pooled[:, :, None]), 1e-6)


def bn_graph_ir3():
    """An IR 3 graph: BN parameters are initializers listed as graph inputs too."""
    c = 3
    rng = np.random.default_rng(0)
    params = {"scale": rng.uniform(0.5, 1.5, c), "bias": rng.uniform(-0.5, 0.5, c),
              "mean": np.zeros(c), "var": np.ones(c)}
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in params.items()]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", c, 4, 4])]
    inputs += [helper.make_tensor_value_info(k, TensorProto.FLOAT, [c]) for k in params]
    node = helper.make_node("BatchNormalization", ["x", "scale", "bias", "mean", "var"], ["y"])
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", c, 4, 4])
    graph = helper.make_graph([node], "g", inputs, [output], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    model.ir_version = 3
    return model


def test_ir3_model_with_parameters_as_graph_inputs():
    model = bn_graph_ir3()
    x = np.random.default_rng(1).normal(4, 2, (10, 3, 4, 4)).astype(np.float32)
    new, _ = recalibrate_onnx(model, [x[:4], x[4:]])
    assert new.ir_version == 3 and [i.name for i in new.graph.input] == [i.name for i in model.graph.input]
    assert_stats_close(stored(new)["y"], moments64(x), 1e-6)


def test_max_samples_cuts_the_last_batch_and_progress_counts_batches():
    model = export(first_bn_net(), [(2, 3, 9, 9)])
    x = data()
    seen = []
    new, report = recalibrate_onnx(model, split(x, [10] * 6), max_samples=25, progress=seen.append)
    assert report.samples == 25 and report.batches == 3 and seen == [1, 2, 3]
    assert_stats_close(list(stored(new).values())[0], moments64(x[:25]), 1e-6)


def test_eval_mode_accepts_a_function_returning_batches_and_batches_of_one():
    model = export(first_bn_net(), [(2, 3, 9, 9)])
    x = data(12)
    new, report = recalibrate_onnx(model, lambda: iter(split(x, [1] * 12)), mode="eval", max_passes=20)
    assert report.batches == 12 and report.passes > 1
    assert_stats_close(list(stored(new).values())[0], moments64(x), 1e-6)


@pytest.mark.parametrize("batches,mode,message", [
    ([np.zeros((4, 3, 8, 8), np.float32)], "train", r"input 'x': expected shape \(n, 3, 9, 9\), got \(4, 3, 8, 8\)"),
    ([np.zeros((4, 3, 9, 9), np.float64)], "train", r"input 'x': expected dtype float32, got float64"),
    ([{"z": np.zeros((4, 3, 9, 9), np.float32)}], "train", r"missing \['x'\], unknown \['z'\]"),
    ([np.full((4, 3, 9, 9), np.nan, np.float32)], "train", "NaN or Inf"),
    ([], "train", "empty"),
    ((b for b in [np.zeros((4, 3, 9, 9), np.float32)]), "eval", "one-shot iterator"),
    ([np.ones((1, 3, 9, 9), np.float32)], "train", "only one value per channel"),
    (np.zeros((4, 3, 9, 9), np.float32), "train", "not a single batch"),
    ([np.zeros((4, 3, 9, 9), np.float32)], "fast", "mode must be"),
])
def test_refusals_are_one_line_errors(batches, mode, message):
    model = export(first_bn_net(), [(2, 3, 9, 9)])
    with pytest.raises(BncalError, match=message) as error:
        recalibrate_onnx(model, batches, mode=mode)
    assert "\n" not in str(error.value)


def test_model_without_inference_batchnorm_is_refused():
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    with pytest.raises(BncalError, match="no inference BatchNormalization"):
        recalibrate_onnx(helper.make_model(graph), [np.zeros(2, np.float32)])


def test_training_mode_batchnorm_is_skipped_with_reason():
    model = export(first_bn_net(), [(2, 3, 9, 9)])
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    bn.ClearField("attribute")
    bn.attribute.extend([helper.make_attribute("epsilon", 1e-5), helper.make_attribute("training_mode", 1)])
    bn.output.extend(["rm", "rv"])
    new, report = recalibrate_onnx(model, split(data(), [30, 30]))
    assert len(report.skipped) == 1 and "training mode" in report.skipped[0].reason
    assert len(report.layers) == 3 and "skipped" in report.table()


def test_no_torch_import_at_run_time(tmp_path):
    model = export(first_bn_net(), [(2, 3, 9, 9)])
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    script = f"""
import sys, numpy as np, onnx
from bncal.onnx.recalibration import recalibrate_onnx
from bncal import check_onnx
model = onnx.load({str(path)!r})
x = np.random.default_rng(0).normal(0, 1, (8, 3, 9, 9)).astype(np.float32)
new, _ = recalibrate_onnx(model, [x[:4], x[4:]], mode="eval")
check_onnx(new, [x])
assert "torch" not in sys.modules, "torch was imported"
"""
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=root)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""  # the library prints nothing


def test_eval_mode_anchored_passes_and_shuffled_fallback():
    """Eval mode converges in a few anchored passes; a loader that reorders batches falls back."""
    import torch

    import bncal
    from bncal.onnx.recalibration import recalibrate_onnx
    from models import zoo

    model = onnx.load(zoo.Path(zoo.__file__).with_name("mnist_cnn_stale.onnx"))
    x = torch.cat(zoo.calibration_batches())[:512]
    batches = [b.numpy() for b in x.split(64)]
    new, report = recalibrate_onnx(model, batches, mode="eval", tol=1e-5)
    assert report.converged and report.passes <= 6, report.passes
    torch_model = zoo.mnist_cnn_stale()
    bncal.recalibrate(torch_model, list(x.split(64)), mode="eval", tol=1e-5)
    values = {t.name: onnx.numpy_helper.to_array(t) for t in new.graph.initializer}
    bn = next(n for n in new.graph.node if n.op_type == "BatchNormalization" and n.name == "1.3")
    np.testing.assert_allclose(values[bn.input[3]], torch_model[1][3].running_mean.numpy(), rtol=1e-5, atol=2e-5)

    epoch = [0]

    def reshuffled():
        epoch[0] += 1
        order = np.random.default_rng(epoch[0]).permutation(len(batches))
        return [batches[i] for i in order]

    _, shuffled = recalibrate_onnx(model, reshuffled, mode="eval", tol=1e-5)
    assert any("different order" in n for n in shuffled.notes)

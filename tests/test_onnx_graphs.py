"""bncal.onnx.graphs: derived graphs against the ONNX reference evaluator, PyTorch and numpy float64."""

import copy
import io
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from torch import nn

from bncal.errors import BncalError
from bncal.onnx.graphs import FORMS, find_batchnorms, make_stats_graph, make_train_graph, write_statistics
from tests_support import randomize_bn


def export(net: nn.Module, shape, *, dynamic_spatial=False) -> onnx.ModelProto:
    """TorchScript export that keeps BatchNorm nodes.

    The default eval-mode export folds Conv+BN; ``training=TrainingMode.PRESERVE`` keeps every
    BatchNormalization (inference mode, since the module is in eval mode).
    """
    axes = {0: "n", 2: "h", 3: "w"} if dynamic_spatial else {0: "n"}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net.eval(), (torch.zeros(*shape),), buffer, dynamo=False,
                          training=torch.onnx.TrainingMode.PRESERVE, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": axes})
    return onnx.load_from_string(buffer.getvalue())


def small_cnn():
    torch.manual_seed(0)
    return randomize_bn(nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 3 * 3, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 5)))


def session(model):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run(model, feeds):
    s = session(model)
    return dict(zip([o.name for o in s.get_outputs()], s.run(None, feeds)))


def bn_inputs(net, x, train: bool):
    """Inputs of every BN of ``net`` on ``x`` (float64 forward of a copy), in order."""
    net = copy.deepcopy(net).double().train(train)
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().numpy().copy()))
             for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        net(torch.from_numpy(x).double())
    for h in hooks:
        h.remove()
    return seen


def moments64(a):
    axes = tuple(i for i in range(a.ndim) if i != 1)
    a = a.astype(np.float64)
    return a.mean(axes), a.var(axes), a.size // a.shape[1]


def bn_graph(opset, rank=4, channels=3, ir_version=8, params_as_inputs=False):
    """x -> BatchNormalization -> Relu, built by hand at the given opset, params as initializers."""
    rng = np.random.default_rng(opset)
    params = {
        "scale": rng.uniform(0.5, 1.5, channels), "bias": rng.uniform(-0.5, 0.5, channels),
        "mean": rng.uniform(-0.5, 0.5, channels), "var": rng.uniform(0.5, 1.5, channels),
    }
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in params.items()]
    dims = ["n", channels] + [f"s{i}" for i in range(rank - 2)]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)]
    if params_as_inputs:  # IR < 4: every initializer is listed as a graph input too
        inputs += [helper.make_tensor_value_info(k, TensorProto.FLOAT, [channels]) for k in params]
    nodes = [helper.make_node("BatchNormalization", ["x", "scale", "bias", "mean", "var"], ["bn"], name="bn",
                              epsilon=1e-3),
             helper.make_node("Relu", ["bn"], ["y"])]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    return model, {k: v.astype(np.float32) for k, v in params.items()}


# ------------------------------------------------------------------------------------------------


def test_export_keeps_batchnorm_and_input_is_not_mutated():
    model = export(small_cnn(), (2, 3, 8, 8))
    assert [n.op_type for n in model.graph.node].count("BatchNormalization") == 3
    before = model.SerializeToString()
    make_train_graph(model, expose_stats=True)
    make_stats_graph(model)
    assert model.SerializeToString() == before
    infos = find_batchnorms(model)
    assert [i.channels for i in infos] == [6, 8, 16] and all(i.handled for i in infos)


def test_train_graph_matches_reference_evaluator_and_torch_train_mode():
    net = small_cnn()
    model = export(net, (2, 3, 8, 8))
    train_model, infos = make_train_graph(model, expose_stats=True)
    onnx.checker.check_model(train_model, full_check=True)
    x = np.random.default_rng(1).normal(0.3, 2.0, (5, 3, 8, 8)).astype(np.float32)
    got = run(train_model, {"x": x})
    expected = ReferenceEvaluator(train_model).run(None, {"x": x})
    for name, value in zip([o.name for o in train_model.graph.output], expected):
        np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-5, err_msg=name)

    with torch.no_grad():
        torch_train = copy.deepcopy(net).train()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got["y"], torch_train, rtol=1e-5, atol=1e-5)
    # The exposed statistics are the batch mean and *biased* variance of each BN's input.
    for info, inp in zip(infos, bn_inputs(net, x, train=True)):
        mean, var, count = moments64(inp)
        sd = np.sqrt(var)
        assert np.max(np.abs(got[info.mean_output] - mean) / sd) < 1e-5
        np.testing.assert_allclose(got[info.var_output], var, rtol=1e-5)
        assert int(got[info.count_output]) // info.channels == count


def test_stats_graph_same_outputs_and_float64_moments():
    net = small_cnn()
    model = export(net, (2, 3, 8, 8))
    stats_model, infos = make_stats_graph(model)
    onnx.checker.check_model(stats_model, full_check=True)
    x = np.random.default_rng(2).normal(-1.0, 3.0, (7, 3, 8, 8)).astype(np.float32)
    got = run(stats_model, {"x": x})
    # Inference unchanged (up to onnxruntime fusing Conv+BN in the original only).
    np.testing.assert_allclose(got["y"], run(model, {"x": x})["y"], rtol=1e-5, atol=1e-6)
    for info, inp in zip(infos, bn_inputs(net, x, train=False)):
        mean, var, count = moments64(inp)
        assert np.max(np.abs(got[info.mean_output] - mean) / np.sqrt(var)) < 1e-5
        np.testing.assert_allclose(got[info.var_output], var, rtol=1e-5)
        assert int(got[info.count_output]) == count * info.channels


def test_stats_graph_feeds_override_moving_statistics():
    net = small_cnn()
    model = export(net, (2, 3, 8, 8))
    stats_model, infos = make_stats_graph(model, keep_model_outputs=True)
    x = np.random.default_rng(3).normal(0, 1, (4, 3, 8, 8)).astype(np.float32)
    rng = np.random.default_rng(4)
    feeds, bns = {"x": x}, [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for info, bn in zip(infos, bns):
        mean = rng.normal(0, 1, info.channels).astype(np.float32)
        var = rng.uniform(0.5, 2, info.channels).astype(np.float32)
        feeds[info.mean_feed], feeds[info.var_feed] = mean, var
        bn.running_mean.copy_(torch.from_numpy(mean))
        bn.running_var.copy_(torch.from_numpy(var))
    with torch.no_grad():
        expected = net.eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(run(stats_model, feeds)["y"], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("opset", [9, 13, 14, 15, 18, 21])
@pytest.mark.parametrize("rank", [2, 3, 5])
def test_training_form_at_every_opset_and_rank(opset, rank):
    model, p = bn_graph(opset, rank)
    train_model, (info,) = make_train_graph(model, expose_stats=True)
    onnx.checker.check_model(train_model)
    shape = (6, 3, 4, 3, 2)[:rank]
    x = np.random.default_rng(rank).normal(2.0, 0.5, shape).astype(np.float32)
    got = run(train_model, {"x": x})
    mean, var, count = moments64(x)
    assert np.max(np.abs(got[info.mean_output] - mean) / np.sqrt(var)) < 1e-6
    np.testing.assert_allclose(got[info.var_output], var, rtol=1e-6)
    assert int(got[info.count_output]) == count * 3
    bshape = (1, 3) + (1,) * (rank - 2)
    y = (x - mean.reshape(bshape)) / np.sqrt(var.reshape(bshape) + 1e-3) * p["scale"].reshape(bshape) \
        + p["bias"].reshape(bshape)
    np.testing.assert_allclose(got["y"], np.maximum(y, 0), rtol=1e-5, atol=1e-5)
    if opset >= 14:  # the reference evaluator knows only the training_mode form
        ref = ReferenceEvaluator(train_model).run(None, {"x": x})
        np.testing.assert_allclose(ref[0], got["y"], rtol=1e-5, atol=1e-5)


def test_opset_below_9_is_refused():
    model, _ = bn_graph(9)
    model.opset_import[0].version = 8
    with pytest.raises(BncalError, match="opset 8.*convert_version"):
        make_train_graph(model)


def test_dynamic_spatial_size():
    net = small_cnn()[:6]  # convolutional part only: any H, W
    model = export(net, (2, 3, 8, 8), dynamic_spatial=True)
    stats_model, infos = make_stats_graph(model, keep_model_outputs=False)
    train_model, train_infos = make_train_graph(model, expose_stats=True, keep_model_outputs=False)
    for h, w in ((8, 8), (13, 6)):
        x = np.random.default_rng(h).normal(0, 1, (3, 3, h, w)).astype(np.float32)
        for derived, derived_infos, train in ((stats_model, infos, False), (train_model, train_infos, True)):
            got = run(derived, {"x": x})
            for info, inp in zip(derived_infos, bn_inputs(net, x, train=train)):
                mean, var, count = moments64(inp)
                assert int(got[info.count_output]) == count * info.channels
                np.testing.assert_allclose(got[info.var_output], var, rtol=1e-5)


def test_ir3_graph_with_parameters_as_inputs_is_handled():
    model, _ = bn_graph(9, ir_version=3, params_as_inputs=True)
    (info,) = find_batchnorms(model)
    assert info.handled and info.mean_initializer == "mean"
    train_model, (info,) = make_train_graph(model, expose_stats=True)
    assert [i.name for i in train_model.graph.input] == ["x"]
    x = np.random.default_rng(0).normal(0, 1, (4, 3, 2, 2)).astype(np.float32)
    np.testing.assert_allclose(run(train_model, {"x": x})[info.var_output], moments64(x)[1], rtol=1e-6)


def test_parameter_graph_input_without_default_is_skipped_with_reason():
    model, _ = bn_graph(15)
    model.graph.initializer.pop(2)  # "mean"
    model.graph.input.append(helper.make_tensor_value_info("mean", TensorProto.FLOAT, [3]))
    (info,) = find_batchnorms(model)
    assert not info.handled and "graph input 'mean'" in info.skip_reason


def test_training_mode_batchnorm_is_left_alone():
    model, _ = bn_graph(15)
    bn = model.graph.node[0]
    bn.attribute.append(helper.make_attribute("training_mode", 1))
    bn.output.extend(["rm", "rv"])
    (info,) = find_batchnorms(model)
    assert "training mode" in info.skip_reason
    train_model, _ = make_train_graph(model, expose_stats=True)
    assert train_model.graph.node[0] == bn


def test_shared_statistics_are_unshared_when_written():
    # Fresh BNs (mean 0, var 1 = weight) exported by TorchScript: equal initializers are
    # deduplicated, so the statistics are Identity nodes of tensors other nodes read too.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
    model = export(net, (2, 3, 8, 8))
    assert any(n.op_type == "Identity" for n in model.graph.node)
    infos = find_batchnorms(model)
    assert all(i.handled for i in infos)
    rng = np.random.default_rng(0)
    stats = {i.name: (rng.normal(0, 1, 4), rng.uniform(0.5, 2, 4)) for i in infos}
    new, notes = write_statistics(model, stats)
    onnx.checker.check_model(new, full_check=True)
    assert notes and all("initializer" in n for n in notes)
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    for info, bn in zip(infos, bns):
        bn.running_mean.copy_(torch.from_numpy(stats[info.name][0]))
        bn.running_var.copy_(torch.from_numpy(stats[info.name][1]))
    x = np.random.default_rng(1).normal(0, 1, (2, 3, 8, 8)).astype(np.float32)
    with torch.no_grad():
        expected = net.eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(run(new, {"x": x})["y"], expected, rtol=1e-5, atol=1e-5)
    # Tensors the statistics were deduplicated with (e.g. a BN's scale of ones) keep their values.
    old = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for t in new.graph.initializer:
        if t.name in old and not t.name.endswith(("running_mean", "running_var")):
            np.testing.assert_array_equal(numpy_helper.to_array(t), old[t.name], err_msg=t.name)


def test_write_statistics_in_place_changes_only_those_initializers():
    model = export(small_cnn(), (2, 3, 8, 8))
    infos = find_batchnorms(model)
    stats = {i.name: (np.full(i.channels, 0.25), np.full(i.channels, 4.0)) for i in infos}
    new, notes = write_statistics(model, stats)
    assert notes == []
    changed = {n for i in infos for n in (i.mean_initializer, i.var_initializer)}
    strip = lambda m: [t for t in m.graph.initializer if t.name not in changed]
    assert strip(new) == strip(model)
    assert [t.name for t in new.graph.initializer] == [t.name for t in model.graph.initializer]
    assert new.graph.node == model.graph.node
    values = {t.name: numpy_helper.to_array(t) for t in new.graph.initializer}
    for i in infos:
        assert values[i.var_initializer].dtype == np.float32
        np.testing.assert_array_equal(values[i.var_initializer], np.full(i.channels, 4.0, np.float32))


def test_statistics_shared_directly_by_two_batchnorms():
    c = 2
    inits = [numpy_helper.from_array(v, k) for k, v in {
        "one": np.ones(c, np.float32), "zero": np.zeros(c, np.float32)}.items()]
    nodes = [helper.make_node("BatchNormalization", ["x", "one", "zero", "zero", "one"], ["a"], name="bn1"),
             helper.make_node("BatchNormalization", ["a", "one", "zero", "zero", "one"], ["y"], name="bn2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", c])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", c])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    stats = {"bn1": (np.array([1.0, 2.0]), np.array([4.0, 9.0])),
             "bn2": (np.array([-1.0, 0.5]), np.array([0.25, 1.0]))}
    new, notes = write_statistics(model, stats)
    onnx.checker.check_model(new, full_check=True)
    # Every statistics slot reads a tensor that scale or bias read too: each gets its own.
    assert len(notes) == 4
    assert {t.name for t in new.graph.initializer} == {
        "one", "zero", "bn1.running_mean", "bn1.running_var", "bn2.running_mean", "bn2.running_var"}
    x = np.array([[3.0, 5.0], [1.0, 2.0]], np.float32)
    a = (x - stats["bn1"][0]) / np.sqrt(stats["bn1"][1] + 1e-5)
    y = (a - stats["bn2"][0]) / np.sqrt(stats["bn2"][1] + 1e-5)
    np.testing.assert_allclose(run(new, {"x": x})["y"], y, rtol=1e-5)


def test_anchored_stats_graph_normalises_with_the_core_formula():
    """The anchored graph's BN uses exactly bncal.stats.anchored_statistics of its feeds."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from bncal.onnx.graphs import make_stats_graph
    from bncal.stats import anchored_statistics

    rng = np.random.default_rng(0)
    c, eps = 3, 1e-3
    params = {k: rng.random(c).astype(np.float32) + 0.5 for k in ("scale", "bias", "mean", "var")}
    graph = helper.make_graph(
        [helper.make_node("BatchNormalization", ["x", "scale", "bias", "mean", "var"], ["y"], epsilon=eps, name="bn")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", c, 4])],
        [numpy_helper.from_array(v, k) for k, v in params.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    derived, infos = make_stats_graph(model, anchored=True)
    info = infos[0]
    x = rng.standard_normal((5, c, 4)).astype(np.float32) * 2 + 1
    feeds = {"x": x, info.mean_feed: rng.standard_normal(c).astype(np.float32),
             info.var_feed: rng.random(c).astype(np.float32) + 0.1,
             info.previous_mean_feed: rng.standard_normal(c).astype(np.float32),
             info.previous_var_feed: np.array([0.0, 0.5, 2.0], np.float32)}
    session = ort.InferenceSession(derived.SerializeToString(), providers=["CPUExecutionProvider"])
    y, batch_mean, batch_var = session.run(["y", info.mean_output, info.var_output], feeds)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(batch_mean, x64.mean(axis=(0, 2)), rtol=1e-5)
    np.testing.assert_allclose(batch_var, x64.var(axis=(0, 2)), rtol=1e-5)
    mean, var = anchored_statistics(feeds[info.mean_feed].astype(np.float64), feeds[info.var_feed].astype(np.float64),
                                    x64.mean(axis=(0, 2)), x64.var(axis=(0, 2)),
                                    feeds[info.previous_mean_feed].astype(np.float64),
                                    feeds[info.previous_var_feed].astype(np.float64), eps)
    expected = ((x64 - mean[None, :, None]) / np.sqrt(var[None, :, None] + eps) * params["scale"][None, :, None]
                + params["bias"][None, :, None])
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# The arithmetic form: no training-mode BatchNormalization, same numbers.


def training_mode_batchnorms(model):
    """BatchNormalization nodes in their training form (training_mode=1, or extra outputs before opset 14)."""
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    return [n for n in model.graph.node if n.op_type == "BatchNormalization" and (
        any(a.name == "training_mode" and a.i == 1 for a in n.attribute) if opset >= 14 else len(n.output) > 1)]


def outputs_by_name(model, values):
    return dict(zip([o.name for o in model.graph.output], values))


@pytest.mark.parametrize("opset", [9, 13, 14, 17, 18, 21])
@pytest.mark.parametrize("rank", [2, 3, 4, 5])
def test_arithmetic_train_graph_matches_reference_evaluator_and_training_form(opset, rank):
    model, p = bn_graph(opset, rank)
    arithmetic, (info,) = make_train_graph(model, expose_stats=True, form="arithmetic")
    training, (train_info,) = make_train_graph(model, expose_stats=True)
    onnx.checker.check_model(arithmetic, full_check=True)
    assert training_mode_batchnorms(arithmetic) == [] and training_mode_batchnorms(training)
    assert [o.version for o in arithmetic.opset_import] == [opset]
    x = np.random.default_rng(rank).normal(2.0, 0.5, (6, 3, 4, 3, 2)[:rank]).astype(np.float32)
    got = run(arithmetic, {"x": x})
    reference = outputs_by_name(arithmetic, ReferenceEvaluator(arithmetic).run(None, {"x": x}))
    current = run(training, {"x": x})
    for name, ours, theirs, tol in [("y", "y", "y", 1e-5), ("mean", info.mean_output, train_info.mean_output, 1e-6),
                                    ("var", info.var_output, train_info.var_output, 1e-6)]:
        np.testing.assert_allclose(got[ours], reference[ours], rtol=tol, atol=tol, err_msg=f"reference {name}")
        np.testing.assert_allclose(got[ours], current[theirs], rtol=tol, atol=tol, err_msg=f"training form {name}")
    assert int(got[info.count_output]) == int(current[train_info.count_output]) == x.size
    mean, var, count = moments64(x)  # and both against float64
    assert np.max(np.abs(got[info.mean_output] - mean) / np.sqrt(var)) < 1e-6
    np.testing.assert_allclose(got[info.var_output], var, rtol=1e-6)


def test_arithmetic_graphs_of_a_cnn_match_reference_evaluator_and_training_form():
    net = small_cnn()
    model = export(net, (2, 3, 8, 8))
    x = np.random.default_rng(5).normal(0.3, 2.0, (5, 3, 8, 8)).astype(np.float32)
    graphs = {
        "train": lambda form: make_train_graph(model, expose_stats=True, form=form),
        "stats": lambda form: make_stats_graph(model, form=form),
        "stats, no model outputs": lambda form: make_stats_graph(model, keep_model_outputs=False, form=form),
    }
    for label, build in graphs.items():
        arithmetic, infos = build("arithmetic")
        training, train_infos = build("batchnorm")
        onnx.checker.check_model(arithmetic, full_check=True)
        assert training_mode_batchnorms(arithmetic) == [], label
        got, current = run(arithmetic, {"x": x}), run(training, {"x": x})
        reference = outputs_by_name(arithmetic, ReferenceEvaluator(arithmetic).run(None, {"x": x}))
        if "y" in got:
            np.testing.assert_allclose(got["y"], reference["y"], rtol=1e-5, atol=1e-5, err_msg=label)
            np.testing.assert_allclose(got["y"], current["y"], rtol=1e-5, atol=1e-5, err_msg=label)
        for info, train_info in zip(infos, train_infos):
            for ours, theirs in ((info.mean_output, train_info.mean_output), (info.var_output, train_info.var_output)):
                np.testing.assert_allclose(got[ours], reference[ours], rtol=1e-5, atol=1e-6, err_msg=label)
                np.testing.assert_allclose(got[ours], current[theirs], rtol=1e-5, atol=1e-6, err_msg=label)
            assert int(got[info.count_output]) == int(current[train_info.count_output])
    # The stats graph keeps inference BNs: the model's outputs are unchanged.
    arithmetic, _ = make_stats_graph(model, form="arithmetic")
    np.testing.assert_allclose(run(arithmetic, {"x": x})["y"], run(model, {"x": x})["y"], rtol=1e-5, atol=1e-6)


def test_arithmetic_anchored_stats_graph_equals_training_form():
    net = small_cnn()
    model = export(net, (2, 3, 8, 8))
    x = np.random.default_rng(6).normal(0, 1.5, (6, 3, 8, 8)).astype(np.float32)
    results = []
    for form in ("arithmetic", "batchnorm"):
        derived, infos = make_stats_graph(model, anchored=True, form=form)
        rng = np.random.default_rng(7)
        feeds = {"x": x}
        for info in infos:
            feeds[info.previous_mean_feed] = rng.normal(0, 0.3, info.channels).astype(np.float32)
            feeds[info.previous_var_feed] = rng.uniform(0.5, 2, info.channels).astype(np.float32)
        results.append((run(derived, feeds), infos))
    (got, infos), (current, train_infos) = results
    np.testing.assert_allclose(got["y"], current["y"], rtol=1e-5, atol=1e-5)
    for info, train_info in zip(infos, train_infos):
        np.testing.assert_allclose(got[info.var_output], current[train_info.var_output], rtol=1e-5)


def test_arithmetic_form_with_dynamic_spatial_size():
    net = small_cnn()[:6]
    model = export(net, (2, 3, 8, 8), dynamic_spatial=True)
    arithmetic, infos = make_train_graph(model, expose_stats=True, keep_model_outputs=False, form="arithmetic")
    training, train_infos = make_train_graph(model, expose_stats=True, keep_model_outputs=False)
    for size in (8, 11):
        x = np.random.default_rng(size).normal(0, 1, (3, 3, size, size)).astype(np.float32)
        got, current = run(arithmetic, {"x": x}), run(training, {"x": x})
        for info, train_info in zip(infos, train_infos):
            np.testing.assert_allclose(got[info.var_output], current[train_info.var_output], rtol=1e-5)
            assert int(got[info.count_output]) == int(current[train_info.count_output])


def test_unknown_form_is_refused():
    model, _ = bn_graph(15)
    with pytest.raises(ValueError, match="form must be one of"):
        make_train_graph(model, form="fused")


@pytest.mark.parametrize("opset", [15, 18])
def test_both_forms_keep_float32_statistics_of_many_values_per_channel_exact(opset):
    """131,072 values per channel: summed in float32 one after another, the variance would be
    about 1e-5 off (relative); both forms stay at float32 rounding of the float64 moments."""
    model, _ = bn_graph(opset, rank=4, channels=4)
    x = np.random.default_rng(opset).normal(1.5, 0.7, (8, 4, 128, 128)).astype(np.float32)
    mean, var, count = moments64(x)
    for form in FORMS:
        derived, (info,) = make_train_graph(model, expose_stats=True, form=form)
        got = run(derived, {"x": x})
        assert int(got[info.count_output]) == x.size
        assert np.max(np.abs(got[info.mean_output] - mean) / np.sqrt(var)) < 1e-6, form
        np.testing.assert_allclose(got[info.var_output], var, rtol=1e-6, err_msg=form)

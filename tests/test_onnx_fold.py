"""BN folding on small ONNX graphs, checked against the unfolded graph in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bncal.folding import fold_onnx, op_counts, strip_initializer_inputs
from bncal.verify import ort_session, run_onnx

FLOAT = TensorProto.FLOAT


def tensor(name, array):
    return numpy_helper.from_array(np.asarray(array, np.float32), name)


def bn_initializers(prefix, channels, rng):
    """Nontrivial statistics: signed gamma, means away from 0, variances away from 1."""
    return [
        tensor(f"{prefix}_scale", rng.uniform(0.5, 2.0, channels) * rng.choice([-1, 1], channels)),
        tensor(f"{prefix}_bias", rng.normal(0, 1, channels)),
        tensor(f"{prefix}_mean", rng.normal(1, 2, channels)),
        tensor(f"{prefix}_var", rng.uniform(0.1, 4.0, channels)),
    ]


def bn_node(prefix, x, y, name=None, **attributes):
    inputs = [x] + [f"{prefix}_{p}" for p in ("scale", "bias", "mean", "var")]
    return helper.make_node("BatchNormalization", inputs, [y], name=prefix if name is None else name,
                            epsilon=1e-3, **attributes)


def make_model(nodes, inputs, outputs, initializers, *, opset=17, ir_version=8, check=True):
    """A checked model; a shape given as an int is that many symbolic dimensions."""
    def info(name, shape):
        shape = [f"{name}_{i}" for i in range(shape)] if isinstance(shape, int) else shape
        return helper.make_tensor_value_info(name, FLOAT, shape)

    graph = helper.make_graph(nodes, "g", [info(*i) for i in inputs], [info(*o) for o in outputs], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)
    if check:
        onnx.checker.check_model(model, full_check=True)
    return model


def feeds_for(model, rng):
    initializers = {i.name for i in model.graph.initializer}
    return {
        i.name: rng.normal(0, 1, [d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32)
        for i in model.graph.input if i.name not in initializers
    }


def summary(decisions):
    return [(d.bn, d.target, d.direction) for d in decisions]


def assert_topologically_sorted(model):
    known = {i.name for i in model.graph.input} | {i.name for i in model.graph.initializer} | {""}
    for node in model.graph.node:
        assert set(node.input) <= known, f"{node.name} reads {set(node.input) - known} before they exist"
        known |= set(node.output)


def check_folded(original, folded, rng, *, tolerance=1e-5):
    """The folded model is valid, keeps its output names, and computes what the original does."""
    onnx.checker.check_model(folded, full_check=True)
    assert_topologically_sorted(folded)
    assert [o.name for o in folded.graph.output] == [o.name for o in original.graph.output]
    feeds = feeds_for(original, rng)
    expected = run_onnx(ort_session(original, optimization_level="disable"), feeds)
    actual = run_onnx(ort_session(folded, optimization_level="disable"), feeds)
    for name, reference in expected.items():
        scale = float(np.abs(reference).max())
        np.testing.assert_allclose(actual[name], reference, rtol=0, atol=tolerance * scale, err_msg=name)


def fold_and_check(model, rng, **options):
    before = model.SerializeToString()
    folded, decisions = fold_onnx(model, **options)
    assert model.SerializeToString() == before, "fold_onnx modified its input"
    check_folded(model, folded, rng)
    return folded, decisions


# -- into the preceding op ------------------------------------------------------------------


@pytest.mark.parametrize("spatial_dims, bias, groups", [
    (1, True, 1), (2, False, 1), (3, True, 2), (2, True, "depthwise"), (1, False, 2), (2, False, "depthwise"),
])
def test_conv_then_bn_folds_into_the_conv(spatial_dims, bias, groups):
    rng = np.random.default_rng(10 * spatial_dims + bias)
    c_in, c_out, group = (4, 4, 4) if groups == "depthwise" else (4, 6, groups)
    initializers = [tensor("W", rng.normal(0, 1, (c_out, c_in // group, *[3] * spatial_dims)))]
    initializers += [tensor("B", rng.normal(0, 1, c_out))] if bias else []
    initializers += bn_initializers("bn", c_out, rng)
    conv = helper.make_node("Conv", ["x", "W"] + (["B"] if bias else []), ["h"], name="conv", group=group,
                            pads=[1] * 2 * spatial_dims, strides=[2] * spatial_dims)
    model = make_model([conv, bn_node("bn", "h", "y")], [("x", [2, c_in, *[5] * spatial_dims])],
                       [("y", 2 + spatial_dims)], initializers)
    folded, decisions = fold_and_check(model, rng)
    assert summary(decisions) == [("bn", "conv", "into-preceding")]
    assert op_counts(folded) == {"Conv": 1}
    assert len(folded.graph.initializer) == 2  # new weight and bias; the BN's parameters are gone


@pytest.mark.parametrize("group, bias", [(1, True), (2, False), (3, True)])
def test_conv_transpose_then_bn_folds_with_group_major_output_channels(group, bias):
    rng = np.random.default_rng(group)
    c_in, c_out_per_group = 6, 2
    initializers = [tensor("W", rng.normal(0, 1, (c_in, c_out_per_group, 3, 3)))]
    initializers += [tensor("B", rng.normal(0, 1, c_out_per_group * group))] if bias else []
    initializers += bn_initializers("bn", c_out_per_group * group, rng)
    deconv = helper.make_node("ConvTranspose", ["x", "W"] + (["B"] if bias else []), ["h"], name="deconv",
                              group=group, strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1])
    model = make_model([deconv, bn_node("bn", "h", "y")], [("x", [2, c_in, 4, 4])], [("y", 4)], initializers)
    folded, decisions = fold_and_check(model, rng)
    assert summary(decisions) == [("bn", "deconv", "into-preceding")]
    assert op_counts(folded) == {"ConvTranspose": 1}


@pytest.mark.parametrize("trans_a, trans_b, alpha, beta, c_shape", [
    (0, 0, 1.0, 1.0, None), (0, 1, 1.0, 1.0, "N"), (1, 0, 0.7, 1.3, "1N"),
    (0, 1, 0.7, 1.3, "MN"), (0, 0, 1.0, 1.3, "N"), (1, 1, 1.5, 1.0, None),
])
def test_gemm_then_bn_folds_into_the_gemm(trans_a, trans_b, alpha, beta, c_shape):
    rng = np.random.default_rng(7)
    m, k, n = 3, 5, 4
    initializers = [tensor("B", rng.normal(0, 1, (n, k) if trans_b else (k, n)))]
    if c_shape:
        initializers.append(tensor("C", rng.normal(0, 1, {"N": (n,), "1N": (1, n), "MN": (m, n)}[c_shape])))
    initializers += bn_initializers("bn", n, rng)
    gemm = helper.make_node("Gemm", ["a", "B"] + (["C"] if c_shape else []), ["h"], name="fc",
                            transA=trans_a, transB=trans_b, alpha=alpha, beta=beta)
    model = make_model([gemm, bn_node("bn", "h", "y")], [("a", [k, m] if trans_a else [m, k])], [("y", [m, n])],
                       initializers)
    folded, decisions = fold_and_check(model, rng)
    assert summary(decisions) == [("bn", "fc", "into-preceding")]
    assert op_counts(folded) == {"Gemm": 1}


def test_matmul_with_constant_weight_becomes_gemm():
    rng = np.random.default_rng(3)
    initializers = [tensor("W", rng.normal(0, 1, (5, 4)))] + bn_initializers("bn", 4, rng)
    model = make_model([helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"), bn_node("bn", "h", "y")],
                       [("x", [3, 5])], [("y", [3, 4])], initializers)
    folded, decisions = fold_and_check(model, rng)
    assert summary(decisions) == [("bn", "mm", "into-preceding")]
    assert op_counts(folded) == {"Gemm": 1}


def test_matmul_with_3d_output_is_refused():
    # (2, 3, 5) @ (5, 3) -> (2, 3, 3): BN's axis 1 has 3 channels like the weight's columns, but is not them.
    rng = np.random.default_rng(4)
    initializers = [tensor("W", rng.normal(0, 1, (5, 3)))] + bn_initializers("bn", 3, rng)
    model = make_model([helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"), bn_node("bn", "h", "y")],
                       [("x", [2, 3, 5])], [("y", [2, 3, 3])], initializers)
    folded, decisions = fold_and_check(model, rng)
    assert summary(decisions) == [("bn", None, None)]
    assert "MatMul input rank is 3-D" in decisions[0].reason and "2-D (N, C)" in decisions[0].reason
    assert op_counts(folded) == {"MatMul": 1, "BatchNormalization": 1}


# -- into the following op ------------------------------------------------------------------


@pytest.mark.parametrize("group, bias", [(1, True), (2, False), (4, True)])
def test_bn_then_unpadded_conv_folds_into_the_conv(group, bias):
    rng = np.random.default_rng(group)
    initializers = [tensor("W", rng.normal(0, 1, (8, 4 // group, 3, 3)))] + bn_initializers("bn", 4, rng)
    initializers += [tensor("B", rng.normal(0, 1, 8))] if bias else []
    conv = helper.make_node("Conv", ["h", "W"] + (["B"] if bias else []), ["y"], name="conv", group=group,
                            strides=[2, 2], dilations=[1, 2])
    model = make_model([bn_node("bn", "x", "h"), conv], [("x", [2, 4, 9, 9])], [("y", 4)], initializers)
    folded, decisions = fold_and_check(model, rng)
    assert summary(decisions) == [("bn", "conv", "into-following")]
    assert op_counts(folded) == {"Conv": 1}


@pytest.mark.parametrize("padding", [{"pads": [1, 1, 1, 1]}, {"auto_pad": "SAME_UPPER"}])
def test_bn_then_padded_conv_is_refused(padding):
    rng = np.random.default_rng(5)
    initializers = [tensor("W", rng.normal(0, 1, (8, 4, 3, 3)))] + bn_initializers("bn", 4, rng)
    conv = helper.make_node("Conv", ["h", "W"], ["y"], name="conv", **padding)
    model = make_model([bn_node("bn", "x", "h"), conv], [("x", [2, 4, 6, 6])], [("y", 4)], initializers)
    folded, decisions = fold_and_check(model, rng)
    assert summary(decisions) == [("bn", None, None)]
    assert "is not produced by an op" in decisions[0].reason
    assert "pads its input with zeros" in decisions[0].reason
    assert op_counts(folded) == op_counts(model)


def test_bn_conv_bn_folds_both():
    rng = np.random.default_rng(6)
    initializers = [tensor("W", rng.normal(0, 1, (6, 4, 1, 1)))]
    initializers += bn_initializers("bn1", 4, rng) + bn_initializers("bn2", 6, rng)
    nodes = [bn_node("bn1", "x", "h"), helper.make_node("Conv", ["h", "W"], ["c"], name="conv"),
             bn_node("bn2", "c", "y")]
    model = make_model(nodes, [("x", [2, 4, 5, 5])], [("y", 4)], initializers)
    folded, decisions = fold_and_check(model, rng)
    assert summary(decisions) == [("bn1", "conv", "into-following"), ("bn2", "conv", "into-preceding")]
    assert op_counts(folded) == {"Conv": 1}
    assert len(folded.graph.initializer) == 2


@pytest.mark.parametrize("flatten, trans_b", [("Flatten", 0), ("Flatten", 1), ((0, -1), 0), ((-1, 48), 1)])
def test_bn_then_flatten_then_gemm_folds_per_feature(flatten, trans_b):
    rng = np.random.default_rng(8)
    initializers = bn_initializers("bn", 3, rng) + [
        tensor("B", rng.normal(0, 1, (5, 48) if trans_b else (48, 5))), tensor("C", rng.normal(0, 1, 5))]
    if flatten == "Flatten":
        flat = helper.make_node("Flatten", ["h"], ["f"], name="flatten", axis=1)
    else:
        initializers.append(numpy_helper.from_array(np.array(flatten, np.int64), "shape"))
        flat = helper.make_node("Reshape", ["h", "shape"], ["f"], name="flatten")
    gemm = helper.make_node("Gemm", ["f", "B", "C"], ["y"], name="fc", transB=trans_b, alpha=0.5, beta=2.0)
    model = make_model([bn_node("bn", "x", "h"), flat, gemm], [("x", [2, 3, 4, 4])], [("y", [2, 5])],
                       initializers)
    folded, decisions = fold_and_check(model, rng)
    assert summary(decisions) == [("bn", "fc", "into-following")]
    assert "BatchNormalization" not in op_counts(folded)


def test_reshape_that_mixes_batch_and_features_is_refused():
    rng = np.random.default_rng(9)
    initializers = bn_initializers("bn", 3, rng) + [
        tensor("B", rng.normal(0, 1, (16, 5))), numpy_helper.from_array(np.array([-1, 16], np.int64), "shape")]
    nodes = [bn_node("bn", "x", "h"), helper.make_node("Reshape", ["h", "shape"], ["f"], name="reshape"),
             helper.make_node("Gemm", ["f", "B"], ["y"], name="fc")]
    model = make_model(nodes, [("x", [2, 3, 4, 4])], [("y", [6, 5])], initializers)
    folded, decisions = fold_and_check(model, rng)
    assert summary(decisions) == [("bn", None, None)]
    assert "may not keep the batch axis" in decisions[0].reason


# -- sharing, names, refusals ---------------------------------------------------------------


def test_conv_output_used_elsewhere_is_refused():
    rng = np.random.default_rng(11)
    initializers = [tensor("W", rng.normal(0, 1, (4, 3, 3, 3)))] + bn_initializers("bn", 4, rng)
    nodes = [helper.make_node("Conv", ["x", "W"], ["h"], name="conv"), bn_node("bn", "h", "y"),
             helper.make_node("Relu", ["h"], ["z"], name="relu")]
    model = make_model(nodes, [("x", [2, 3, 6, 6])], [("y", 4), ("z", 4)], initializers)
    folded, decisions = fold_and_check(model, rng)
    assert summary(decisions) == [("bn", None, None)]
    assert "Conv output 'h' also feeds relu" in decisions[0].reason
    assert "'y' is a graph output" in decisions[0].reason
    assert op_counts(folded) == op_counts(model)


def test_weight_shared_by_three_convs_is_never_changed_in_place():
    rng = np.random.default_rng(12)
    weight = tensor("W", rng.normal(0, 1, (4, 4, 3, 3)))
    initializers = [weight] + bn_initializers("bn1", 4, rng) + bn_initializers("bn2", 4, rng)
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["h1"], name="conv1", pads=[1, 1, 1, 1]), bn_node("bn1", "h1", "y1"),
        helper.make_node("Conv", ["y1", "W"], ["h2"], name="conv2"), bn_node("bn2", "h2", "y2"),
        helper.make_node("Conv", ["y2", "W"], ["y3"], name="conv3"),  # no BN: must keep the original W
    ]
    model = make_model(nodes, [("x", [2, 4, 8, 8])], [("y1", 4), ("y3", 4)], initializers)
    folded, decisions = fold_and_check(model, rng)
    assert summary(decisions) == [("bn1", "conv1", "into-preceding"), ("bn2", "conv2", "into-preceding")]
    by_name = {i.name: i for i in folded.graph.initializer}
    assert len(by_name) == len(folded.graph.initializer)
    assert by_name["W"] == weight
    assert [n.input[1] for n in folded.graph.node] == ["W_bnfold", "W_bnfold_2", "W"]  # names from bncal.names.fresh_name


def test_graph_output_name_moves_to_the_folded_op():
    rng = np.random.default_rng(13)
    initializers = [tensor("W", rng.normal(0, 1, (4, 3, 1, 1)))] + bn_initializers("bn", 4, rng)
    nodes = [helper.make_node("Conv", ["x", "W"], ["conv_out"], name="conv"), bn_node("bn", "conv_out", "logits")]
    model = make_model(nodes, [("x", [1, 3, 4, 4])], [("logits", [1, 4, 4, 4])], initializers)
    folded, _ = fold_and_check(model, rng)
    (conv,) = folded.graph.node
    assert list(conv.output) == ["logits"] and folded.graph.output[0].name == "logits"


def test_training_mode_bn_is_left_alone():
    rng = np.random.default_rng(14)
    initializers = [tensor("W", rng.normal(0, 1, (4, 3, 3, 3)))] + bn_initializers("bn", 4, rng)
    bn = bn_node("bn", "h", "y", training_mode=1)
    bn.output.extend(["running_mean", "running_var"])
    nodes = [helper.make_node("Conv", ["x", "W"], ["h"], name="conv"), bn]
    model = make_model(nodes, [("x", [4, 3, 6, 6])], [("y", 4)], initializers, opset=15)
    folded, decisions = fold_onnx(model, bn_to_affine=True)
    assert decisions[0].reason == "training-mode BatchNormalization" and not decisions[0].folded
    assert op_counts(folded) == {"Conv": 1, "BatchNormalization": 1}
    assert folded.SerializeToString() == model.SerializeToString()
    feeds = feeds_for(model, rng)
    expected = run_onnx(ort_session(model, optimization_level="disable"), feeds)
    actual = run_onnx(ort_session(folded, optimization_level="disable"), feeds)
    np.testing.assert_array_equal(actual["y"], expected["y"])


def test_bn_parameter_from_a_graph_input_is_refused():
    rng = np.random.default_rng(15)
    initializers = [tensor("W", rng.normal(0, 1, (4, 3, 1, 1)))] + bn_initializers("bn", 4, rng)[1:]
    nodes = [helper.make_node("Conv", ["x", "W"], ["h"], name="conv"), bn_node("bn", "h", "y")]
    model = make_model(nodes, [("x", [1, 3, 4, 4]), ("bn_scale", [4])], [("y", 4)], initializers)
    folded, decisions = fold_onnx(model, bn_to_affine=True)
    assert decisions[0].reason == "BatchNormalization scale 'bn_scale' is not a constant initializer"
    assert op_counts(folded) == op_counts(model)


def old_ir_model(rng):
    """An IR 3 model: every initializer is also a graph input."""
    initializers = [tensor("W", rng.normal(0, 1, (4, 3, 3, 3))), tensor("B", rng.normal(0, 1, 4))]
    initializers += bn_initializers("bn", 4, rng)
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["h"], name="conv"), bn_node("bn", "h", "y")]
    inputs = [("x", [2, 3, 5, 5])] + [(i.name, list(i.dims)) for i in initializers]
    return make_model(nodes, inputs, [("y", [2, 4, 3, 3])], initializers, opset=8, ir_version=3)


def test_ir3_initializers_that_are_inputs_are_refused_then_folded_after_stripping():
    rng = np.random.default_rng(16)
    model = old_ir_model(rng)
    unchanged, decisions = fold_onnx(model)
    assert unchanged.SerializeToString() == model.SerializeToString()
    assert decisions[0].reason.startswith(
        "parameter 'bn_scale' is also a graph input (IR < 4 model), so it can be overridden at run time")
    stripped = strip_initializer_inputs(model)
    assert [i.name for i in stripped.graph.input] == ["x"] and stripped.ir_version == 4
    folded, decisions = fold_onnx(stripped)
    assert summary(decisions) == [("bn", "conv", "into-preceding")]
    check_folded(model, folded, rng)


def test_ir3_initializer_inputs_fold_when_trusted():
    rng = np.random.default_rng(17)
    model = old_ir_model(rng)
    folded, decisions = fold_and_check(model, rng, treat_initializer_inputs_as_constant=True)
    assert summary(decisions) == [("bn", "conv", "into-preceding")]
    assert [i.name for i in folded.graph.input] == ["x"] and folded.ir_version == 4


@pytest.mark.parametrize("shape", [[3, 4], [3, 4, 5], [2, 4, 3, 3]])
def test_leftover_bn_becomes_mul_add_when_asked(shape):
    rng = np.random.default_rng(len(shape))
    nodes = [helper.make_node("Relu", ["x"], ["h"], name="relu"), bn_node("bn", "h", "y")]
    model = make_model(nodes, [("x", shape)], [("y", shape)], bn_initializers("bn", 4, rng))
    _, decisions = fold_onnx(model)
    assert summary(decisions) == [("bn", None, None)]
    assert decisions[0].reason.startswith("preceding: its input comes from Relu")
    folded, decisions = fold_and_check(model, rng, bn_to_affine=True)
    assert summary(decisions) == [("bn", "bn_mul", "to-affine")]
    assert op_counts(folded) == {"Relu": 1, "Mul": 1, "Add": 1}
    scale = numpy_helper.to_array(next(i for i in folded.graph.initializer if i.name == "bn_scale_bnfold"))
    assert scale.shape == (4,) + (1,) * (len(shape) - 2)


def test_bn_to_affine_refuses_an_input_of_unknown_rank():
    rng = np.random.default_rng(18)
    nodes = [helper.make_node("Relu", ["x"], ["h"], name="relu"), bn_node("bn", "h", "y")]
    model = make_model(nodes, [("x", None)], [("y", 4)], bn_initializers("bn", 4, rng), check=False)
    _, decisions = fold_onnx(model, bn_to_affine=True)
    assert "to-affine: the rank or type of its input 'h' is unknown" in decisions[0].reason


def test_unnamed_nodes_get_stable_generated_names():
    rng = np.random.default_rng(19)
    initializers = [tensor("W", rng.normal(0, 1, (4, 3, 1, 1)))] + bn_initializers("bn", 4, rng)
    nodes = [helper.make_node("Conv", ["x", "W"], ["h"]), bn_node("bn", "h", "y", name="")]
    model = make_model(nodes, [("x", [1, 3, 4, 4])], [("y", 4)], initializers)
    folded, decisions = fold_and_check(model, rng)
    # The BN is named by the one BN naming rule (bncal.names: its output name); other ops <op>_<index>.
    assert summary(decisions) == [("y", "Conv_0", "into-preceding")]
    assert folded.graph.node[0].name == "Conv_0"


def test_onnx_folding_needs_no_torch():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    script = """
import sys, onnx
from bncal.folding import fold_onnx
folded, decisions = fold_onnx(onnx.load("models/mnist_cnn_stale.onnx"))
assert all(d.folded for d in decisions) and decisions, decisions
assert "torch" not in sys.modules, "torch was imported"
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=root)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""  # the library prints nothing


def test_op_counts_prefixes_other_domains():
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Relu", ["a"], ["b"]),
         helper.make_node("Conv", ["b"], ["c"], domain="com.microsoft.nchwc")],
        "g", [helper.make_tensor_value_info("x", FLOAT, [1])], [helper.make_tensor_value_info("c", FLOAT, [1])])
    assert op_counts(helper.make_model(graph)) == {"Relu": 2, "com.microsoft.nchwc::Conv": 1}


def test_bn_inside_a_subgraph_is_reported_and_left_alone():
    rng = np.random.default_rng(20)
    def branch(name):
        return helper.make_graph([bn_node("bn", "x", f"{name}_y", name=f"{name}_bn")], name, [],
                                 [helper.make_tensor_value_info(f"{name}_y", FLOAT, [2, 4, 3, 3])])
    node = helper.make_node("If", ["cond"], ["y"], name="if", then_branch=branch("then"), else_branch=branch("else"))
    model = make_model([node], [("x", [2, 4, 3, 3])], [("y", 4)], bn_initializers("bn", 4, rng), check=False)
    model.graph.input.append(helper.make_tensor_value_info("cond", TensorProto.BOOL, []))
    onnx.checker.check_model(model, full_check=True)
    folded, decisions = fold_onnx(model, bn_to_affine=True)
    assert sorted((d.bn, d.reason) for d in decisions) == [
        ("if/else_bn", "inside a subgraph; only the main graph is folded"),
        ("if/then_bn", "inside a subgraph; only the main graph is folded"),
    ]
    assert folded.SerializeToString() == model.SerializeToString()


# -- seeing through what exporters put in the way ---------------------------------------------
# Each case is checked in onnxruntime (check_folded) and in the ONNX reference evaluator.


def check_reference(original, folded, rng, *, tolerance=1e-5):
    """The folded model computes what the original does in onnx.reference, too."""
    from onnx.reference import ReferenceEvaluator

    feeds = feeds_for(original, rng)
    names = [o.name for o in original.graph.output]
    for name, want, got in zip(names, ReferenceEvaluator(original).run(None, feeds),
                               ReferenceEvaluator(folded).run(None, feeds)):
        np.testing.assert_allclose(got, want, rtol=0, atol=tolerance * float(np.abs(want).max()), err_msg=name)


def pad_node(name, x, y, pads, mode, initializers):
    initializers.append(numpy_helper.from_array(np.array(pads, np.int64), f"{name}_pads"))
    return helper.make_node("Pad", [x, f"{name}_pads"], [y], name=name, mode=mode)


def fold_everywhere(model, rng, **options):
    folded, decisions = fold_and_check(model, rng, **options)
    check_reference(model, folded, rng)
    return folded, decisions


@pytest.mark.parametrize("mode, pads", [
    ("reflect", [0, 0, 1, 2, 0, 0, 2, 1]), ("edge", [0, 0, 1, 1, 0, 0, 1, 1]), ("wrap", [0, 0, 2, 0, 0, 0, 0, 2]),
    ("constant", [0] * 8), ("reflect", [0] * 8), ("constant", [0, 0, -1, 0, 0, 0, 0, -1]),
])
def test_bn_then_copying_pad_then_conv_folds_into_the_conv(mode, pads):
    # reflect/edge/wrap copy BN outputs, an all-zero or cropping Pad only moves them: the
    # per-channel affine map commutes with the Pad, so the BN folds into the Conv behind it.
    rng = np.random.default_rng(30)
    initializers = [tensor("W", rng.normal(0, 1, (6, 4, 3, 3))), tensor("B", rng.normal(0, 1, 6))]
    initializers += bn_initializers("bn", 4, rng)
    nodes = [bn_node("bn", "x", "h"), pad_node("pad", "h", "p", pads, mode, initializers),
             helper.make_node("Conv", ["p", "W", "B"], ["y"], name="conv")]
    model = make_model(nodes, [("x", [2, 4, 6, 6])], [("y", 4)], initializers, opset=19)
    folded, decisions = fold_and_check(model, rng)
    if min(pads) >= 0:  # the reference evaluator cannot crop
        check_reference(model, folded, rng)
    assert summary(decisions) == [("bn", "conv", "into-following")]
    assert op_counts(folded) == {"Pad": 1, "Conv": 1}


@pytest.mark.parametrize("mode", ["reflect", "edge", "constant"])
def test_conv_then_copying_pad_then_bn_folds_into_the_conv(mode):
    rng = np.random.default_rng(31)
    pads = [0] * 8 if mode == "constant" else [0, 0, 1, 1, 0, 0, 1, 1]
    initializers = [tensor("W", rng.normal(0, 1, (4, 3, 3, 3)))] + bn_initializers("bn", 4, rng)
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"), pad_node("pad", "c", "p", pads, mode, initializers),
             bn_node("bn", "p", "y")]
    model = make_model(nodes, [("x", [2, 3, 7, 7])], [("y", 4)], initializers, opset=19)
    folded, decisions = fold_everywhere(model, rng)
    assert summary(decisions) == [("bn", "conv", "into-preceding")]
    assert op_counts(folded) == {"Conv": 1, "Pad": 1} and folded.graph.output[0].name == "y"


def test_constant_pad_with_nonzero_pads_before_a_conv_is_refused():
    # Conv would see the zeros Pad adds, where the original saw BN(0) = t: not exact.
    rng = np.random.default_rng(32)
    initializers = [tensor("W", rng.normal(0, 1, (6, 4, 3, 3)))] + bn_initializers("bn", 4, rng)
    nodes = [bn_node("bn", "x", "h"), pad_node("pad", "h", "p", [0, 0, 1, 1, 0, 0, 1, 1], "constant", initializers),
             helper.make_node("Conv", ["p", "W"], ["y"], name="conv")]
    model = make_model(nodes, [("x", [2, 4, 6, 6])], [("y", 4)], initializers)
    folded, decisions = fold_and_check(model, rng)
    assert summary(decisions) == [("bn", None, None)]
    assert "a constant-mode Pad with nonzero pads" in decisions[0].reason and "not exact" in decisions[0].reason
    assert op_counts(folded) == op_counts(model)


def test_pad_on_the_channel_axis_is_refused():
    rng = np.random.default_rng(33)
    initializers = [tensor("W", rng.normal(0, 1, (4, 6, 1, 1)))] + bn_initializers("bn", 4, rng)
    nodes = [bn_node("bn", "x", "h"), pad_node("pad", "h", "p", [0, 1, 0, 0, 0, 1, 0, 0], "reflect", initializers),
             helper.make_node("Conv", ["p", "W"], ["y"], name="conv")]
    model = make_model(nodes, [("x", [2, 4, 5, 5])], [("y", 4)], initializers)
    _, decisions = fold_and_check(model, rng)
    assert summary(decisions) == [("bn", None, None)] and "it pads the channel axis" in decisions[0].reason


def nhwc_block(prefix, x, y, c_in, c_out, rng, initializers):
    """A tf2onnx-style NHWC conv block: Transpose to NCHW, Conv, back to NHWC, then a BN that
    only works on NCHW, wrapped in its own Transpose pair."""
    initializers += [tensor(f"{prefix}_W", rng.normal(0, 1, (c_out, c_in, 3, 3))), tensor(f"{prefix}_B", rng.normal(0, 1, c_out))]
    initializers += bn_initializers(f"{prefix}_bn", c_out, rng)
    t = lambda name, a, b, perm: helper.make_node("Transpose", [a], [b], name=f"{prefix}_{name}", perm=perm)
    return [
        t("to_nchw", x, f"{prefix}_a", [0, 3, 1, 2]),
        helper.make_node("Conv", [f"{prefix}_a", f"{prefix}_W", f"{prefix}_B"], [f"{prefix}_c"], name=f"{prefix}_conv",
                         pads=[1, 1, 1, 1]),
        t("to_nhwc", f"{prefix}_c", f"{prefix}_d", [0, 2, 3, 1]),
        t("bn_in", f"{prefix}_d", f"{prefix}_e", [0, 3, 1, 2]),
        bn_node(f"{prefix}_bn", f"{prefix}_e", f"{prefix}_f"),
        t("bn_out", f"{prefix}_f", f"{prefix}_g", [0, 2, 3, 1]),
        helper.make_node("Relu", [f"{prefix}_g"], [y], name=f"{prefix}_relu"),
    ]


def test_tf_style_transpose_pairs_fold_all_four_bns():
    rng = np.random.default_rng(34)
    initializers, nodes, channels = [], [], [3, 4, 6, 4, 5]
    for i in range(4):
        nodes += nhwc_block(f"b{i}", "x" if i == 0 else f"y{i - 1}", f"y{i}", channels[i], channels[i + 1], rng,
                            initializers)
    model = make_model(nodes, [("x", [2, 7, 7, 3])], [("y3", 4)], initializers)
    folded, decisions = fold_everywhere(model, rng)
    assert summary(decisions) == [(f"b{i}_bn", f"b{i}_conv", "into-preceding") for i in range(4)]
    assert "BatchNormalization" not in op_counts(folded)


def test_bn_folds_forward_across_a_transpose_pair_into_the_conv():
    rng = np.random.default_rng(35)
    initializers = [tensor("W", rng.normal(0, 1, (5, 4, 3, 3)))] + bn_initializers("bn", 4, rng)
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"), bn_node("bn", "r", "h"),
             helper.make_node("Transpose", ["h"], ["t1"], name="to_nhwc", perm=[0, 2, 3, 1]),
             helper.make_node("Transpose", ["t1"], ["t2"], name="to_nchw", perm=[0, 3, 1, 2]),
             helper.make_node("Conv", ["t2", "W"], ["y"], name="conv")]
    model = make_model(nodes, [("x", [2, 4, 6, 6])], [("y", 4)], initializers)
    _, decisions = fold_everywhere(model, rng)
    assert summary(decisions) == [("bn", "conv", "into-following")]


@pytest.mark.parametrize("perm, folds", [([0, 1, 3, 2], True), ([0, 2, 1, 3], False)])
def test_a_transpose_folds_only_if_the_channels_stay_on_axis_1(perm, folds):
    rng = np.random.default_rng(36)
    initializers = [tensor("W", rng.normal(0, 1, (5, 3, 1, 1)))] + bn_initializers("bn", 5, rng)
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
             helper.make_node("Transpose", ["c"], ["t"], name="transpose", perm=perm), bn_node("bn", "t", "y")]
    model = make_model(nodes, [("x", [2, 3, 5, 5])], [("y", 4)], initializers)
    _, decisions = fold_everywhere(model, rng)
    if folds:
        assert summary(decisions) == [("bn", "conv", "into-preceding")]
    else:
        assert summary(decisions) == [("bn", None, None)]
        assert "put the BN's channels on its axis 2, not 1" in decisions[0].reason


@pytest.mark.parametrize("between", ["Identity", "Cast", "Dropout"])
def test_identity_same_type_cast_and_inference_dropout_are_seen_through(between):
    rng = np.random.default_rng(37)
    initializers = [tensor("W1", rng.normal(0, 1, (4, 3, 3, 3))), tensor("W2", rng.normal(0, 1, (2, 4, 1, 1)))]
    initializers += bn_initializers("bn1", 4, rng) + bn_initializers("bn2", 4, rng)
    extra = {"to": TensorProto.FLOAT} if between == "Cast" else {}
    nodes = [helper.make_node("Conv", ["x", "W1"], ["c"], name="conv1"),
             helper.make_node(between, ["c"], ["i1"], name="between1", **extra), bn_node("bn1", "i1", "h"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"), bn_node("bn2", "r", "b"),
             helper.make_node(between, ["b"], ["i2"], name="between2", **extra),
             helper.make_node("Conv", ["i2", "W2"], ["y"], name="conv2")]
    model = make_model(nodes, [("x", [2, 3, 6, 6])], [("y", 4)], initializers)
    _, decisions = fold_everywhere(model, rng)
    assert summary(decisions) == [("bn1", "conv1", "into-preceding"), ("bn2", "conv2", "into-following")]


def test_cast_to_another_type_is_in_the_way():
    rng = np.random.default_rng(38)
    initializers = [tensor("W", rng.normal(0, 1, (4, 3, 1, 1)))] + bn_initializers("bn", 4, rng)
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
             helper.make_node("Cast", ["c"], ["d"], name="to_double", to=TensorProto.DOUBLE),
             helper.make_node("Cast", ["d"], ["e"], name="to_float", to=TensorProto.FLOAT), bn_node("bn", "e", "y")]
    model = make_model(nodes, [("x", [2, 3, 4, 4])], [("y", 4)], initializers)
    _, decisions = fold_and_check(model, rng)
    assert summary(decisions) == [("bn", None, None)] and "it casts float64 to float32" in decisions[0].reason


def test_bn_then_reflect_pad_then_flatten_then_gemm_repeats_over_the_padded_size():
    rng = np.random.default_rng(39)
    initializers = bn_initializers("bn", 3, rng) + [tensor("B", rng.normal(0, 1, (3 * 6 * 6, 5))), tensor("C", rng.normal(0, 1, 5))]
    nodes = [bn_node("bn", "x", "h"), pad_node("pad", "h", "p", [0, 0, 1, 1, 0, 0, 1, 1], "reflect", initializers),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "B", "C"], ["y"], name="fc", alpha=0.5)]
    model = make_model(nodes, [("x", [2, 3, 4, 4])], [("y", [2, 5])], initializers)
    _, decisions = fold_everywhere(model, rng)
    assert summary(decisions) == [("bn", "fc", "into-following")]


def test_matmul_with_bias_add_then_bn_becomes_one_gemm():
    rng = np.random.default_rng(40)
    initializers = [tensor("W", rng.normal(0, 1, (5, 4))), tensor("b", rng.normal(0, 1, 4))] + bn_initializers("bn", 4, rng)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"], name="dense"), helper.make_node("Add", ["b", "m"], ["a"], name="bias"),
             bn_node("bn", "a", "y")]
    model = make_model(nodes, [("x", [3, 5])], [("y", [3, 4])], initializers)
    folded, decisions = fold_everywhere(model, rng)
    assert summary(decisions) == [("bn", "dense", "into-preceding")]
    assert op_counts(folded) == {"Gemm": 1} and len(folded.graph.initializer) == 2

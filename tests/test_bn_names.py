"""One name per ONNX BatchNorm in every command: unnamed nodes, repeated names, subgraphs."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import bncal
from bncal.names import batchnorm_names, fresh_name
from bncal.onnx.graphs import find_batchnorms

EXPECTED = ["y1", "bn", "bn#2"]


def unnamed_and_repeated_bns():
    """Conv -> BN (no name, output ``y1``) -> Relu named ``bn`` -> Conv -> BN ``bn`` -> Relu ->
    Conv -> BN ``bn`` again: every BN foldable into its Conv, every parameter a real initializer."""
    rng = np.random.default_rng(0)
    inits, nodes = [], []

    def init(name, value):
        inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    def conv_bn(k, x, cin, cout, bn_name, bn_out, conv_name=""):
        w = init(f"w{k}", rng.normal(0, 0.5, (cout, cin, 3, 3)))
        nodes.append(helper.make_node("Conv", [x, w], [f"c{k}"], name=conv_name, pads=[1, 1, 1, 1]))
        params = [init(f"bn{k}.{p}", v) for p, v in (
            ("scale", rng.uniform(0.5, 1.5, cout)), ("bias", rng.uniform(-0.5, 0.5, cout)),
            ("mean", rng.uniform(-0.5, 0.5, cout)), ("var", rng.uniform(0.5, 2.0, cout)))]
        nodes.append(helper.make_node("BatchNormalization", [f"c{k}", *params], [bn_out], name=bn_name))

    conv_bn(1, "x", 3, 4, "", "y1")
    nodes.append(helper.make_node("Relu", ["y1"], ["r1"], name="bn"))  # a non-BN node may share the name
    conv_bn(2, "r1", 4, 4, "bn", "y2", conv_name="conv")
    nodes.append(helper.make_node("Relu", ["y2"], ["r2"]))
    conv_bn(3, "r2", 4, 5, "bn", "out")
    graph = helper.make_graph(nodes, "names", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 6, 6])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", 5, 6, 6])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])


def batches():
    rng = np.random.default_rng(1)
    return [rng.normal(0.5, 2.0, (16, 3, 6, 6)).astype(np.float32) for _ in range(2)]


def names_from_recalibrate(model):
    return [layer.name for layer in bncal.recalibrate_onnx(model, batches())[1].layers]


def names_from_check(model):
    return [layer.name for layer in bncal.check_onnx(model, batches()).layers]


def names_from_inspect(model):
    return [layer.name for layer in bncal.inspect_model(model).layers]


def names_from_fold(model):
    return [decision.bn for decision in bncal.fold_onnx(model)[1]]


def names_from_inspect_with_fold_decisions(model):
    """Each layer shows its own fold decision (no decision lands on another layer, none is lost)."""
    report = bncal.inspect_model(model, fold_decisions=bncal.fold_onnx(model)[1])
    assert not any("not BNs of this model" in note for note in report.notes), report.notes
    assert all(layer.fold and layer.fold.startswith("into ") for layer in report.layers), report.table()
    return [layer.name for layer in report.layers]


@pytest.mark.parametrize("names_from", [
    names_from_recalibrate,
    names_from_check,
    names_from_inspect,
    names_from_fold,
    names_from_inspect_with_fold_decisions,
])
def test_every_command_names_the_same_bn_the_same_way(names_from):
    model = unnamed_and_repeated_bns()
    assert [info.name for info in find_batchnorms(model)] == EXPECTED
    assert names_from(model) == EXPECTED


def test_subgraph_batchnorms_are_named_after_their_owner_and_skipped():
    def branch(name, bn_name):
        params = [numpy_helper.from_array(np.ones(2, np.float32), f"{name}.{p}") for p in ("s", "b", "m", "v")]
        node = helper.make_node("BatchNormalization", ["x", *(p.name for p in params)], [f"{name}.y"], name=bn_name)
        return helper.make_graph([node], name, [], [helper.make_tensor_value_info(f"{name}.y", TensorProto.FLOAT, [2, 2])],
                                 params)

    cond = numpy_helper.from_array(np.array(True), "cond")
    owner = helper.make_node("If", ["cond"], ["y"], name="gate", then_branch=branch("then", "inner"),
                             else_branch=branch("else", ""))
    graph = helper.make_graph([owner], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])], [cond])
    infos = find_batchnorms(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)]))
    assert [i.name for i in infos] == ["gate/else.y", "gate/inner"]  # make_node sorts attributes: else first
    assert all("inside a subgraph" in i.skip_reason for i in infos)


def test_naming_rule_and_fresh_names():
    assert batchnorm_names([("bn", "a"), (None, "y"), ("bn", "b"), ("", None), ("bn", "c")]) == \
        ["bn", "y", "bn#2", "BatchNormalization_3", "bn#3"]
    taken = {"t", "t.2"}
    assert [fresh_name("t", taken), fresh_name("u", taken), fresh_name("t", taken, separator="_")] == \
        ["t.3", "u", "t_2"]
    assert {"t.3", "u", "t_2"} <= taken

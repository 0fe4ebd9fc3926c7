"""The ONNX front end of the inspection: an ONNX model as BN rows and a :class:`~bncal.inspect.model.Graph`,
read through the one ONNX BatchNorm view (:mod:`bncal.onnx.view`)."""

from __future__ import annotations

import numpy as np

from ..onnx.view import as_ir, constant_array, find_batchnorms, node_attribute
from .model import NOT_CONSTANT, BNLayer, Graph, Node, frozen_layer, statistics_status

__all__ = ["onnx_graph_and_layers"]

ACTS = {"Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Gelu", "Sigmoid", "HardSigmoid",
              "HardSwish", "Tanh", "Softplus", "Softsign", "Mish", "ThresholdedRelu", "Clip"}
PASS = {"Flatten", "Reshape", "Identity", "Squeeze", "Unsqueeze", "Transpose"}
LINEAR = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


def onnx_graph_and_layers(model) -> tuple[Graph, list[BNLayer]]:
    ir_model = as_ir(model)
    # BN layers carry the report name every command uses (bncal.onnx.view); other nodes only need unique keys.
    infos = {info.node_index: info for info in find_batchnorms(ir_model) if info.node_index >= 0}
    graph_nodes = list(ir_model.graph)
    keys, producer_of = [], {}
    for i, node in enumerate(graph_nodes):
        key = node.name or f"{node.op_type}_{i}"
        if key in producer_of.values():
            key = f"{key}_{i}"
        keys.append(key)
        for out in node.outputs:
            producer_of[out] = key

    nodes, layers = [], []
    for index, (key, node) in enumerate(zip(keys, graph_nodes)):
        if node.op_type == "Constant":
            continue
        inputs = [producer_of[value] for value in node.inputs if value is not None and value in producer_of]
        kind, label, layer = "other", f"{node.op_type} {key}", None
        if index in infos:
            kind, layer = "bn", infos[index].name
            label = f"{node.op_type} {layer}"
            layers.append(onnx_layer(infos[index]))
        elif node.op_type in ACTS:
            kind = "act"
        elif node.op_type in PASS:
            kind = "pass"
        elif node.op_type in LINEAR:
            kind = "linear"
        elif node.op_type == "Dropout":
            ratio = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
            if ratio is None:
                ratio = node_attribute(node, "ratio", 0.5)
            kind = "pass" if float(np.asarray(ratio)) == 0 else "dropout"
        elif node.op_type == "Mul" and len(node.inputs) == 2:
            # SiLU exports as x * Sigmoid(x): treat the Mul as the activation.
            for i in (0, 1):
                x, gate = node.inputs[1 - i], node.inputs[i]
                src = gate.producer() if gate is not None else None
                if src is not None and src.op_type == "Sigmoid" and src.inputs[0] is x:
                    kind, label = "act", f"SiLU (Mul {key})"
                    inputs = [producer_of[x]] if x in producer_of else []
        nodes.append(Node(key, kind, label, inputs, layer))
    outputs = [producer_of[value] for value in ir_model.graph.outputs if value in producer_of]
    nodes.append(Node("__output__", "output", "model output", outputs))
    return Graph(nodes), layers


def onnx_layer(info) -> BNLayer:
    """The inspect row of one BN as :func:`bncal.onnx.view.find_batchnorms` reads it."""
    momentum_tf = info.momentum  # None when absent: the file does not say (not ONNX's default)
    scale, bias, mean, var = info.scale_value, info.bias_value, info.mean_value, info.var_value
    if mean is not None and var is not None:
        stats, detail = statistics_status(mean, var, None)
    else:
        stats, detail = NOT_CONSTANT, "mean or variance is computed in the graph, not stored as a constant"
    # An affine=False PyTorch BN exports scale 1 and bias 0: that is no scale/shift at all.
    affine = not (scale is not None and bias is not None and np.all(scale == 1) and np.all(bias == 0))
    if info.frozen_class is not None:
        return frozen_layer(info.name, info.frozen_class, info.channels or None, info.epsilon)
    return BNLayer(name=info.name, type="BatchNormalization", channels=info.channels or None,
                   momentum_torch=None if momentum_tf is None else 1.0 - momentum_tf, momentum_tf=momentum_tf,
                   affine=affine, track_running_stats=True, eps=info.epsilon,
                   stats=stats, stats_detail=detail, training_mode=info.training_mode,
                   momentum_absent=momentum_tf is None)

"""ONNX files as other tools write them, for tests and benchmarks (plain torch and onnx, no bncal import).

The ONNX model zoo's files and many converted graphs come from PyTorch's TorchScript exporter with
a fixed batch size and BatchNorm nodes kept, and the oldest from IR 3, where every initializer is
also listed as a graph input.
"""

from __future__ import annotations

import io
import warnings

import onnx
import torch
from onnx import helper


def torchscript_file(model, example, *, opset: int = 13, training=torch.onnx.TrainingMode.PRESERVE) -> onnx.ModelProto:
    """``model`` through the TorchScript exporter at ``example``'s fixed shape: input ``data_0``,
    output ``prob`` (the model zoo's names), BatchNorms kept as they are (``PRESERVE``), or in
    training mode with ``TrainingMode.TRAINING`` (constant folding off then, which would fold them)."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), buffer, dynamo=False, opset_version=opset, input_names=["data_0"],
                          output_names=["prob"], training=training,
                          do_constant_folding=training != torch.onnx.TrainingMode.TRAINING)
    return onnx.load_from_string(buffer.getvalue())


def as_ir3(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``proto`` in IR 3's convention: every initializer also a graph input."""
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    listed = {i.name for i in model.graph.input}
    for init in model.graph.initializer:
        if init.name not in listed:
            model.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    model.ir_version = 3
    return model

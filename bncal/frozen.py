"""Frozen BatchNorm, worded once and recognised in exported ONNX graphs (no torch here).

A frozen BN (torchvision's ``ops.misc.FrozenBatchNorm2d``, timm's ``FrozenBatchNorm2d`` and
``FrozenBatchNormAct2d``) applies fixed statistics in training and inference alike: there is no
train/inference mismatch to check and nothing to recalibrate. torch's exporter turns the first
two into ``Mul -> Add`` and the last into an inference ``BatchNormalization``; in either case
each node records the PyTorch classes it came from (``pkg.torch.onnx.class_hierarchy``, with the
module paths in ``pkg.torch.onnx.name_scopes``), which is how :func:`frozen_origin` tells a
frozen BN from a converter's lowering (:mod:`bncal.onnx.lowered`) or a trainable BN.
"""

from __future__ import annotations

import ast

__all__ = ["FROZEN_NOTE", "FROZEN_IN_GRAPH", "is_frozen_class_name", "frozen_origin"]

#: Why a frozen BN is not recalibrated (PyTorch models).
FROZEN_NOTE = ("a frozen BatchNorm: its statistics are fixed constants (it has no training mode), so they cannot be "
               "recalibrated; convert it with bncal.unfreeze_batchnorm to recalibrate it")
#: Why a frozen BN in an exported graph is neither checked nor recalibrated.
FROZEN_IN_GRAPH = ("exported from a frozen BatchNorm ({cls}): fixed statistics, the same in training and inference, "
                   "so there is nothing to check or recalibrate (bncal.unfreeze_batchnorm in PyTorch makes it "
                   "trainable)")


def is_frozen_class_name(name: str) -> bool:
    """``FrozenBatchNorm2d``, ``FrozenBatchNormAct2d``, or a dotted path ending in one."""
    return name.rsplit(".", 1)[-1].startswith("FrozenBatchNorm")


def frozen_origin(node) -> tuple[str, str] | None:
    """``(class name, module path)`` of the frozen BN an ONNX node (``onnx.NodeProto`` or
    ``onnx_ir.Node``) was exported from by torch's exporter, or None (no such metadata, or not
    from a frozen BN)."""
    props = getattr(node, "metadata_props", ())
    if not isinstance(props, dict):  # a protobuf's repeated StringStringEntryProto
        props = {p.key: p.value for p in props}
    try:
        classes = ast.literal_eval(props.get("pkg.torch.onnx.class_hierarchy", "[]"))
        scopes = ast.literal_eval(props.get("pkg.torch.onnx.name_scopes", "[]"))
    except (ValueError, SyntaxError):
        return None
    for index in range(len(classes) - 1, -1, -1):
        if isinstance(classes[index], str) and is_frozen_class_name(classes[index]):
            path = scopes[index] if index < len(scopes) and isinstance(scopes[index], str) else ""
            return classes[index].rsplit(".", 1)[-1], path or node.name or ""
    return None

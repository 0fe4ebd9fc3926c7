"""Fold inference BatchNorm into neighbouring linear ops: one rulebook, two graph backends.

- :mod:`.affine` -- the float64 arithmetic (BN as ``s * x + t``; output side and input side of
  Conv/ConvTranspose with groups, Gemm with alpha/beta/transB, MatMul; flatten repeats).
- :mod:`.rules` -- the rules: which neighbours absorb a BN, the checks that refuse (with the
  reason a report shows), the ops a fold sees through.
- :mod:`.planner` -- applies the rules to a graph view, BN by BN.
- :mod:`.graph` -- the small graph view the rules read (ONNX vocabulary).
- :mod:`.onnx_backend` -- :func:`fold_onnx` on ONNX graphs (no torch needed).
- :mod:`.torch_backend` -- :func:`fold` and :func:`analyze_foldability` on PyTorch models,
  viewed the way the exporter emits them, so ``bncal inspect`` predicts what ``fold-export``
  (export with BN kept, then :func:`fold_onnx`) does.

This package imports torch only when a PyTorch name is used.
"""

from __future__ import annotations

from .._lazy import lazy_exports

_EXPORTS = {
    "fold": "torch_backend",
    "analyze_foldability": "torch_backend",
    "FoldResult": "torch_backend",
    "ChannelAffine": "torch_backend",
    "check_initialized": "torch_backend",
    "meta_clone": "torch_backend",
    "as_tuple": "torch_backend",
    "fold_onnx": "onnx_backend",
    "strip_initializer_inputs": "onnx_backend",
    "op_counts": "onnx_backend",
}

__all__ = list(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

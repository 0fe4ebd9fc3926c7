"""The arithmetic of BatchNorm folding, in float64 (numpy only; no torch, no onnx).

An inference BN is a per-channel affine map on axis 1::

    BN(x) = s * x + t,    s = gamma / sqrt(var + eps),    t = beta - mean * s

**Output side** (``y = W x + b`` then BN, the op *before* the BN): scale each output channel,
``W' = W * s`` along the output-channel axis and ``b' = s * b + t``.

**Input side** (BN then ``z = W y + b``, the op *after* the BN): scale each input channel,
``W' = W * s`` along the input-channel axis, and the shift becomes bias,
``b' = b + sum over inputs and taps of W * t``. Exact only when every output sees the shift at
every tap (no zero padding; the rules check that). After a flatten of ``(N, C, *S)`` the
features are channel-major: feature ``f`` belongs to channel ``f // prod(S)``, so ``s`` and
``t`` are repeated ``prod(S)`` times.

Weight layouts are ONNX's, which are also PyTorch's:

- Conv ``(C_out, C_in/g, k...)``: output channel ``o`` is ``W[o]``; it reads input channels
  ``(o // (C_out/g)) * (C_in/g) + j`` through ``W[o, j]``.
- ConvTranspose ``(C_in, C_out/g, k...)``: output channel ``o = g_i * (C_out/g) + j`` is
  ``W[g_i*(C_in/g):(g_i+1)*(C_in/g), j]`` (group-major).
- Gemm ``alpha * A @ op(B) + beta * C`` (transA=0): ``op(B)`` is ``(K, N)``, stored ``(N, K)``
  when transB=1. The result keeps alpha and has beta 1: output side ``C' = s * beta * C + t``,
  input side ``C' = beta * C + alpha * t @ op(B)``.
- MatMul ``(K, N)``: like Gemm with transB=0, alpha=beta=1.
"""

from __future__ import annotations

import numpy as np

__all__ = ["bn_scale_shift", "output_channels", "input_channels", "fold_output_side", "fold_input_side"]


def bn_scale_shift(gamma, beta, mean, var, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """``(s, t)`` of an inference BN as float64 vectors."""
    scale = _f64(gamma) / np.sqrt(_f64(var) + eps)
    return scale, _f64(beta) - _f64(mean) * scale


def output_channels(op: str, weight_shape, *, group: int = 1, trans_b: int = 0) -> int:
    """How many output channels an op with this weight produces."""
    if op == "ConvTranspose":
        return weight_shape[1] * group
    if op == "Conv" or (op == "Gemm" and trans_b):
        return weight_shape[0]
    return weight_shape[1]  # Gemm (K, N), MatMul


def input_channels(op: str, weight_shape, *, group: int = 1, trans_b: int = 0) -> int:
    """How many input channels (features) an op with this weight reads."""
    if op == "Conv":
        return weight_shape[1] * group
    return weight_shape[1] if trans_b else weight_shape[0]  # Gemm, MatMul


def fold_output_side(op: str, weight, bias, scale, shift, *, group: int = 1, trans_b: int = 0,
                     beta: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """``(W', b')`` of ``op`` followed by the affine map ``s * y + t`` (``bias`` may be None)."""
    new_weight = np.array(weight, dtype=np.float64)  # a copy, scaled in place: one weight-sized buffer
    new_weight *= _output_factor(op, new_weight.shape, scale, group, trans_b)
    new_bias = shift if bias is None else scale * beta * _f64(bias) + shift
    return new_weight, new_bias


def fold_input_side(op: str, weight, bias, scale, shift, *, group: int = 1, trans_b: int = 0,
                    alpha: float = 1.0, beta: float = 1.0, repeat: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``(W', b')`` of the affine map ``s * x + t`` followed by ``op`` (Conv or Gemm).

    ``repeat`` is the number of features per channel after a flatten (1 without one).
    """
    w = _f64(weight)
    scale, shift = np.repeat(scale, repeat), np.repeat(shift, repeat)
    per_output_axes = tuple(range(1, w.ndim)) if op == "Conv" else (1 if trans_b else 0)
    absorbed = (w * _input_factor(op, w.shape, shift, group, trans_b)).sum(axis=per_output_axes)
    new_bias = alpha * absorbed + (0.0 if bias is None else beta * _f64(bias))
    return w * _input_factor(op, w.shape, scale, group, trans_b), new_bias


def _output_factor(op, shape, per_channel, group, trans_b) -> np.ndarray:
    """``per_channel`` broadcast so that ``W * factor`` multiplies output channel ``o`` by it."""
    ones = (1,) * (len(shape) - 2)
    if op == "ConvTranspose":
        c_in, out_per_group = shape[0], shape[1]
        grouped = per_channel.reshape(group, 1, out_per_group, *ones)
        return np.broadcast_to(grouped, (group, c_in // group, out_per_group, *ones)).reshape(c_in, out_per_group, *ones)
    if op == "Conv" or (op == "Gemm" and trans_b):
        return per_channel.reshape(-1, *[1] * (len(shape) - 1))
    return per_channel[None, :]


def _input_factor(op, shape, per_channel, group, trans_b) -> np.ndarray:
    """``per_channel`` broadcast so that ``W * factor`` multiplies input channel ``c`` by it."""
    if op == "Conv":
        c_out, in_per_group, ones = shape[0], shape[1], (1,) * (len(shape) - 2)
        grouped = per_channel.reshape(group, 1, in_per_group)
        return np.broadcast_to(grouped, (group, c_out // group, in_per_group)).reshape(c_out, in_per_group, *ones)
    return per_channel[None, :] if trans_b else per_channel[:, None]


def _f64(array) -> np.ndarray:
    return np.asarray(array, dtype=np.float64)

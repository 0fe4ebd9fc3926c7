"""Batch Renormalization layers (Ioffe 2017, "Batch Renormalization: Towards Reducing
Minibatch Dependence in Batch-Normalized Models", Algorithm 1).

Training normalises with the batch statistics, then corrects towards the moving ones::

    sigma_B = sqrt(var_B + eps)                  var_B: biased batch variance, as BatchNorm
    sigma   = sqrt(running_var + eps)
    r = stop_gradient(clip(sigma_B / sigma, 1 / r_max, r_max))
    d = stop_gradient(clip((mu_B - running_mean) / sigma, -d_max, d_max))
    x_hat = (x - mu_B) / sigma_B * r + d
    y = weight * x_hat + bias

Without clipping ``x_hat = (x - running_mean) / sigma``, which is the inference computation, so
the network trains on what it will run; ``eps`` sits inside both square roots so that the
unclipped identity holds exactly. Inference is plain ``F.batch_norm`` with the running
statistics, so an exported model contains an ordinary ``BatchNormalization``.

The running statistics are the paper's moving averages mu and sigma, updated after the
forward as PyTorch's BatchNorm updates them (unbiased batch variance, ``momentum`` in PyTorch
convention, ``None`` for a cumulative average). The paper averages sigma; averaging the variance
keeps the buffers and the inference path identical to BatchNorm's. The layers keep BatchNorm's
buffers and parameters, so state dicts move freely between the two.

Defaults follow the paper's ImageNet runs: ``momentum=0.01`` (its "relatively fast" update rate
alpha = 0.01, since the moving averages take part in training), r_max = 3 and d_max = 5, plain
BatchNorm (r_max = 1, d_max = 0) for the first 5000 steps, then linear relaxation reaching
r_max at step 40000 and d_max at step 25000. Short runs should scale these steps down.
The step counter is ``num_batches_tracked`` (the number of training forwards so far).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import BncalError

__all__ = ["BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d", "is_batch_renorm", "copy_batchnorm_state", "convert_to_batchrenorm",
           "convert_to_batchnorm"]


def _ramp(step: int, start: int, end: int, low: float, high: float) -> float:
    """``low`` until ``start``, then linear to ``high`` at ``end`` and constant after."""
    if step >= end:
        return high
    if step <= start:
        return low
    return low + (high - low) * (step - start) / (end - start)


class _BatchRenorm(_BatchNorm):
    """Shared implementation; use :class:`BatchRenorm1d`, ``2d`` or ``3d``."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.01,
                 affine: bool = True, *, rmax: float = 3.0, dmax: float = 5.0,
                 warmup_start: int = 5000, rmax_warmup_end: int = 40000,
                 dmax_warmup_end: int = 25000, device=None, dtype=None):
        if rmax < 1.0:
            raise ValueError(f"rmax must be at least 1, got {rmax}")
        if dmax < 0.0:
            raise ValueError(f"dmax must be non-negative, got {dmax}")
        if min(warmup_start, rmax_warmup_end, dmax_warmup_end) < 0:
            raise ValueError("warm-up steps must be non-negative")
        # Batch renorm needs the moving averages during training: always track them.
        super().__init__(num_features, eps, momentum, affine, track_running_stats=True,
                         device=device, dtype=dtype)
        self.rmax = float(rmax)
        self.dmax = float(dmax)
        self.warmup_start = int(warmup_start)
        self.rmax_warmup_end = int(rmax_warmup_end)
        self.dmax_warmup_end = int(dmax_warmup_end)

    def current_rmax(self, step: int | None = None) -> float:
        """The bound on r at ``step`` (default: the next training step)."""
        step = int(self.num_batches_tracked) if step is None else step
        return _ramp(step, self.warmup_start, self.rmax_warmup_end, 1.0, self.rmax)

    def current_dmax(self, step: int | None = None) -> float:
        """The bound on |d| at ``step`` (default: the next training step)."""
        step = int(self.num_batches_tracked) if step is None else step
        return _ramp(step, self.warmup_start, self.dmax_warmup_end, 0.0, self.dmax)

    def training_reference(self):
        """The renorm averages (the running statistics) and the clipping bounds of the last
        training step, as :class:`bncal.renorm.RenormReference`: what recalibration and the
        check reproduce where r and d were not clipped."""
        import numpy as np

        from ..renorm import RenormReference

        step = max(int(self.num_batches_tracked) - 1, 0)
        rmax = self.current_rmax(step)
        var = self.running_var.detach().double().cpu().numpy()
        return RenormReference(mean=self.running_mean.detach().double().cpu().numpy(), std=np.sqrt(var + self.eps),
                               eps=float(self.eps), rmin=1.0 / rmax, rmax=rmax, dmax=self.current_dmax(step))

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", rmax={self.rmax}, dmax={self.dmax}, "
                f"warmup_start={self.warmup_start}, rmax_warmup_end={self.rmax_warmup_end}, "
                f"dmax_warmup_end={self.dmax_warmup_end}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not self.training:
            # Pass the momentum as nn.BatchNorm does, so exports record the same attribute.
            momentum = 0.0 if self.momentum is None else self.momentum
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                False, momentum, self.eps)

        reduce_dims = [0] + list(range(2, x.dim()))
        count = x.numel() // x.shape[1]
        if count < 2:
            raise ValueError("Expected more than 1 value per channel when training, "
                             f"got input size {tuple(x.shape)}")
        shape = [1, -1] + [1] * (x.dim() - 2)
        batch_mean = x.mean(reduce_dims)
        batch_var = x.var(reduce_dims, unbiased=False)
        batch_std = torch.sqrt(batch_var + self.eps)

        step = int(self.num_batches_tracked)
        rmax, dmax = self.current_rmax(step), self.current_dmax(step)
        with torch.no_grad():  # r and d are constants for backpropagation (stop_gradient)
            running_std = torch.sqrt(self.running_var + self.eps)
            r = (batch_std / running_std).clamp(1.0 / rmax, rmax)
            d = ((batch_mean - self.running_mean) / running_std).clamp(-dmax, dmax)

        x_hat = (x - batch_mean.view(shape)) / batch_std.view(shape) * r.view(shape) + d.view(shape)
        if self.affine:
            x_hat = x_hat * self.weight.view(shape) + self.bias.view(shape)

        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            factor = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else self.momentum
            unbiased_var = x.detach().var(reduce_dims, unbiased=True)
            # Same expression as PyTorch's BatchNorm, so rmax=1, dmax=0 reproduces it closely.
            self.running_mean.copy_(factor * batch_mean.detach() + (1.0 - factor) * self.running_mean)
            self.running_var.copy_(factor * unbiased_var + (1.0 - factor) * self.running_var)
        return x_hat


class BatchRenorm1d(_BatchRenorm):
    """Batch Renormalization over (N, C) or (N, C, L) inputs; see :mod:`bncal.torch.nn`."""

    def _check_input_dim(self, x):
        if x.dim() not in (2, 3):
            raise ValueError(f"expected 2D or 3D input (got {x.dim()}D input)")


class BatchRenorm2d(_BatchRenorm):
    """Batch Renormalization over (N, C, H, W) inputs; see :mod:`bncal.torch.nn`."""

    def _check_input_dim(self, x):
        if x.dim() != 4:
            raise ValueError(f"expected 4D input (got {x.dim()}D input)")


class BatchRenorm3d(_BatchRenorm):
    """Batch Renormalization over (N, C, D, H, W) inputs; see :mod:`bncal.torch.nn`."""

    def _check_input_dim(self, x):
        if x.dim() != 5:
            raise ValueError(f"expected 5D input (got {x.dim()}D input)")


_TO_RENORM = {nn.BatchNorm1d: BatchRenorm1d, nn.BatchNorm2d: BatchRenorm2d, nn.BatchNorm3d: BatchRenorm3d}
_TO_NORM = {v: k for k, v in _TO_RENORM.items()}


def is_batch_renorm(module: nn.Module) -> bool:
    """Whether ``module`` is one of bncal's batch renormalisation layers (:class:`BatchRenorm2d` and kin)."""
    return isinstance(module, _BatchRenorm)


def copy_batchnorm_state(old: _BatchNorm, new: _BatchNorm) -> _BatchNorm:
    """``new`` (another BN class) given ``old``'s parameters, statistics, device, dtype, mode and
    ``requires_grad`` flags; returns ``new``."""
    ref = old.running_mean if old.running_mean is not None else old.weight
    new.to(device=ref.device, dtype=ref.dtype)
    new.load_state_dict(old.state_dict())
    new.train(old.training)
    for tensor_name in ("weight", "bias"):
        param = getattr(old, tensor_name)
        if param is not None:
            getattr(new, tensor_name).requires_grad_(param.requires_grad)
    return new


def _replace(model: nn.Module, mapping: dict, make, inplace: bool) -> nn.Module:
    if not inplace:
        model = copy.deepcopy(model)
    if type(model) in mapping:
        return make(model)
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            # Exact types only: a subclass (e.g. timm's BatchNormAct2d) adds behaviour we would lose.
            if type(child) in mapping:
                setattr(parent, child_name, make(child))
    return model


def convert_to_batchrenorm(model: nn.Module, *, inplace: bool = False, momentum="keep",
                           **renorm_kwargs) -> nn.Module:
    """Replace every ``nn.BatchNorm1d/2d/3d`` (exact types) with the matching BatchRenorm layer.

    Weights, running statistics, ``num_batches_tracked``, eps, affine, device, dtype and
    train/eval mode are kept. ``momentum="keep"`` keeps each layer's momentum; pass a number (or
    None) to set it. ``renorm_kwargs`` (``rmax``, ``dmax``, ``warmup_start``, ...) go to every new
    layer; note that the warm-up counts from each layer's ``num_batches_tracked``, so a trained
    model starts with its correction already relaxed unless the warm-up steps are set past it.
    Returns a converted deep copy, or ``model`` itself changed in place when ``inplace``.
    Raises :class:`BncalError` for a BN without running statistics (batch renorm needs them).
    """

    def make(bn: _BatchNorm) -> _BatchNorm:
        if not bn.track_running_stats:
            raise BncalError("a BatchNorm with track_running_stats=False has no moving averages for batch "
                             "renormalisation; enable track_running_stats before converting")
        layer_momentum = bn.momentum if momentum == "keep" else momentum
        new = _TO_RENORM[type(bn)](bn.num_features, bn.eps, layer_momentum, bn.affine, **renorm_kwargs)
        return copy_batchnorm_state(bn, new)

    return _replace(model, _TO_RENORM, make, inplace)


def convert_to_batchnorm(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Replace every BatchRenorm layer with the plain ``nn.BatchNorm1d/2d/3d`` it corresponds to.

    Inference outputs are unchanged (both layers run ``F.batch_norm`` in eval mode); weights,
    statistics, momentum, eps, device, dtype and mode are kept. Returns a converted deep copy,
    or ``model`` itself changed in place when ``inplace``.
    """

    def make(layer: _BatchRenorm) -> _BatchNorm:
        new = _TO_NORM[type(layer)](layer.num_features, layer.eps, layer.momentum, layer.affine)
        return copy_batchnorm_state(layer, new)

    return _replace(model, _TO_NORM, make, inplace)

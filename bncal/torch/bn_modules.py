"""The BatchNorm modules model libraries build with, recognised in one place.

Three kinds besides a plain ``nn.BatchNorm``:

- **BN with activation**: a ``_BatchNorm`` subclass whose forward is ``bn -> drop -> act``
  (timm's ``BatchNormAct2d``, ``SyncBatchNormAct``, ``FrozenBatchNormAct2d``). Its BN part is
  an ordinary BN; ``drop`` (DropBlock, dropout) and ``act`` are its own submodules.
  :func:`activation_split` names them. A class of one's own documents the same split with a
  class attribute ``bncal_activation_split = ("drop", "act")`` (the submodules its forward
  applies after the BN, in order).
- **Frozen BN** (torchvision's ``ops.misc.FrozenBatchNorm2d``, timm's ``FrozenBatchNorm2d`` and
  ``FrozenBatchNormAct2d``): not an ``nn.BatchNorm``; ``weight``, ``bias``, ``running_mean`` and
  ``running_var`` are buffers and ``eps`` an attribute, and it always computes the fixed
  per-channel affine ``(x - running_mean) / sqrt(running_var + eps) * weight + bias``. Its
  statistics cannot be recalibrated (it has no training mode); it folds like a BN in eval mode.
- **SyncBatchNorm**: on one process it computes what a BatchNorm computes.

:func:`unfreeze_batchnorm` and :func:`sync_to_batchnorm` turn the last two into plain BatchNorms.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..frozen import FROZEN_NOTE, is_frozen_class_name

__all__ = ["is_frozen_batchnorm", "activation_split", "frozen_batchnorm_layers", "describe_frozen",
           "unfreeze_batchnorm", "sync_to_batchnorm", "per_rank_class", "FROZEN_NOTE"]

# timm's classes, which document their split in their source rather than with the attribute.
_TIMM_ACTIVATION_CLASSES = {"BatchNormAct1d", "BatchNormAct2d", "SyncBatchNormAct", "FrozenBatchNormAct2d"}
_FROZEN_BUFFERS = ("weight", "bias", "running_mean", "running_var")


def is_frozen_batchnorm(module: nn.Module) -> bool:
    """True for a frozen BN (see the module docstring): a ``FrozenBatchNorm*`` class that is not an
    ``nn.BatchNorm`` and holds the four statistics as buffers of one length, and a numeric ``eps``."""
    if isinstance(module, _BatchNorm) or not is_frozen_class_name(type(module).__name__):
        return False
    buffers = dict(module.named_buffers(recurse=False))
    if not all(isinstance(buffers.get(name), torch.Tensor) for name in _FROZEN_BUFFERS):
        return False
    shapes = {buffers[name].shape for name in _FROZEN_BUFFERS}
    return len(shapes) == 1 and len(next(iter(shapes))) == 1 and isinstance(getattr(module, "eps", None), (int, float))


def activation_split(module: nn.Module) -> tuple[nn.Module, ...] | None:
    """The submodules a BN-with-activation applies after its BN part, in order (``(drop, act)``),
    or None for a module that does not document that split (see the module docstring)."""
    names = getattr(type(module), "bncal_activation_split", None)
    if names is None and type(module).__name__ in _TIMM_ACTIVATION_CLASSES and \
            type(module).__module__.startswith("timm."):
        names = ("drop", "act")
    if names is None:
        return None
    parts = tuple(getattr(module, name, None) for name in names)
    return parts if all(isinstance(p, nn.Module) for p in parts) else None


def frozen_batchnorm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every frozen BN of ``model``, by module path."""
    return [(name or "<root>", m) for name, m in model.named_modules() if is_frozen_batchnorm(m)]


def describe_frozen(frozen: list[tuple[str, nn.Module]], limit: int = 4) -> str:
    """``"3 frozen BatchNorm layers (FrozenBatchNorm2d: bn1, layer1.0.bn1, ... )"``."""
    types = ", ".join(sorted({type(m).__name__ for _, m in frozen}))
    names = ", ".join(name for name, _ in frozen[:limit]) + (f" and {len(frozen) - limit} more"
                                                            if len(frozen) > limit else "")
    count = f"{len(frozen)} frozen BatchNorm layer{'s' if len(frozen) != 1 else ''}"
    return f"{count} ({types}: {names})"


def _replace(model: nn.Module, make, wanted, inplace: bool) -> nn.Module:
    if not inplace:
        model = copy.deepcopy(model)
    if wanted(model):
        return make(model)
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if wanted(child):
                setattr(parent, child_name, make(child))
    return model


def unfreeze_batchnorm(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Replace every plain frozen BN (torchvision's and timm's ``FrozenBatchNorm2d``) with an
    ``nn.BatchNorm2d`` in eval mode holding the same statistics, eps and affine (now trainable
    parameters), so it can be recalibrated or trained; outputs in eval mode are unchanged.

    A frozen BN with an activation (timm's ``FrozenBatchNormAct2d``) is left as it is: timm's own
    ``unfreeze_batch_norm_2d`` turns it into its ``BatchNormAct2d``. Returns a converted deep copy,
    or ``model`` itself changed in place when ``inplace``.
    """

    def make(frozen: nn.Module) -> nn.Module:
        new = nn.BatchNorm2d(frozen.running_mean.shape[0], eps=float(frozen.eps))
        new.to(device=frozen.running_mean.device, dtype=frozen.running_mean.dtype)
        with torch.no_grad():
            for name in _FROZEN_BUFFERS:
                getattr(new, name).copy_(getattr(frozen, name))
        return new.eval()

    return _replace(model, make, lambda m: is_frozen_batchnorm(m) and activation_split(m) is None, inplace)


def sync_to_batchnorm(model: nn.Module, dims: int = 2, *, inplace: bool = False) -> nn.Module:
    """Replace every ``nn.SyncBatchNorm`` (exact type; a subclass adds behaviour that would be
    lost) with ``nn.BatchNorm{dims}d`` for single-process use: weights, statistics, momentum,
    eps, device, dtype and mode are kept. ``dims`` (1, 2 or 3) is the BN's spatial rank, which a
    SyncBatchNorm does not record. Returns a converted deep copy, or ``model`` changed in place."""
    classes = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
    if dims not in classes:
        raise ValueError(f"dims must be 1, 2 or 3, not {dims!r}")

    def make(sync: nn.SyncBatchNorm) -> nn.Module:
        from .nn import copy_batchnorm_state

        new = classes[dims](sync.num_features, sync.eps, sync.momentum, sync.affine, sync.track_running_stats)
        return copy_batchnorm_state(sync, new)

    return _replace(model, make, lambda m: type(m) is nn.SyncBatchNorm, inplace)


class _PerRankSyncBatchNorm(nn.SyncBatchNorm):
    """A SyncBatchNorm whose BN computation never synchronises (each rank's own batch statistics)."""

    forward = _BatchNorm.forward


_PER_RANK_CLASSES: dict[type, type] = {nn.SyncBatchNorm: _PerRankSyncBatchNorm}


def per_rank_class(cls: type) -> type:
    """``cls`` (nn.SyncBatchNorm or a subclass) with its SyncBatchNorm.forward replaced by
    _BatchNorm.forward: a subclass's ``super().forward(x)`` then reaches the plain BN, while the
    subclass's own forward (e.g. timm's SyncBatchNormAct: BN, drop, act) runs as it is."""
    if cls not in _PER_RANK_CLASSES:
        # MRO: cls, its bases up to SyncBatchNorm's, then _PerRankSyncBatchNorm, then SyncBatchNorm.
        _PER_RANK_CLASSES[cls] = type(cls.__name__, (cls, _PerRankSyncBatchNorm), {"__module__": cls.__module__})
    return _PER_RANK_CLASSES[cls]

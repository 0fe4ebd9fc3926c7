"""Small stand-ins for the BatchNorm modules of timm and torchvision, so tests and benchmarks need neither.

Each copies its original's forward (timm 1.0 ``timm/layers/norm_act.py``, ``drop_block.py``,
``timm/layers/norm.py``; torchvision ``ops/misc.py``) and carries its class name and, for timm's,
its module path, which is how bncal recognises them.
"""

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class DropBlock2d(nn.Module):
    """Like timm's DropBlock2d: zeroes random blocks in training, the identity in eval mode."""

    def __init__(self, drop_prob=0.5, block_size=3):
        super().__init__()
        self.drop_prob, self.block_size = drop_prob, block_size

    def forward(self, x):
        if not self.training or not self.drop_prob:
            return x
        gamma = self.drop_prob / self.block_size ** 2
        mask = (torch.rand_like(x[:, :1]) < gamma).float()
        mask = F.max_pool2d(mask, self.block_size, stride=1, padding=self.block_size // 2)
        keep = 1 - mask
        return x * keep * keep.numel() / keep.sum().clamp(min=1)


def _batch_norm(bn, x):
    """timm's BatchNormAct2d BN part, as written there."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    bn_training = True if bn.training else (bn.running_mean is None and bn.running_var is None)
    return F.batch_norm(x, bn.running_mean if not bn.training or bn.track_running_stats else None,
                        bn.running_var if not bn.training or bn.track_running_stats else None,
                        bn.weight, bn.bias, bn_training, factor, bn.eps)


class BatchNormAct2d(nn.BatchNorm2d):
    """Like timm's BatchNormAct2d: BN, then ``drop``, then ``act``, in its own forward."""

    def __init__(self, num_features, drop_block=0.0, act=nn.ReLU):
        super().__init__(num_features)
        self.drop = DropBlock2d(drop_block) if drop_block else nn.Identity()
        self.act = act()

    def forward(self, x):
        return self.act(self.drop(_batch_norm(self, x)))


class SyncBatchNormAct(nn.SyncBatchNorm):
    """Like timm's SyncBatchNormAct (what convert_sync_batchnorm makes of a BatchNormAct2d)."""

    def __init__(self, num_features, drop_block=0.0, act=nn.ReLU):
        super().__init__(num_features)
        self.drop = DropBlock2d(drop_block) if drop_block else nn.Identity()
        self.act = act()

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


class FrozenBatchNorm2d(nn.Module):
    """Like torchvision's ops.misc.FrozenBatchNorm2d: fixed statistics and affine, all buffers."""

    def __init__(self, num_features, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x):
        w, b = self.weight.reshape(1, -1, 1, 1), self.bias.reshape(1, -1, 1, 1)
        rv, rm = self.running_var.reshape(1, -1, 1, 1), self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        return x * scale + (b - rm * scale)


class FrozenBatchNormAct2d(FrozenBatchNorm2d):
    """Like timm's FrozenBatchNormAct2d: the frozen affine, then ``drop`` and ``act``."""

    def __init__(self, num_features, act=nn.SiLU):
        super().__init__(num_features)
        self.drop, self.act = nn.Identity(), act()

    def forward(self, x):
        return self.act(self.drop(F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                               False, 0.0, self.eps)))


for _cls in (DropBlock2d, BatchNormAct2d, SyncBatchNormAct, FrozenBatchNormAct2d):
    _cls.__module__ = "timm.layers.norm_act"


class RepVGGBlock(nn.Module):
    """RepVGG's training-time block: 3x3 conv + BN, 1x1 conv + BN and an identity BN, summed, then ReLU.
    The identity BN has no layer of its own to fold into (its affine is summed with two others)."""

    def __init__(self, c):
        super().__init__()
        self.conv3, self.bn3 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv1, self.bn1 = nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)
        self.identity = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(self.bn3(self.conv3(x)) + self.bn1(self.conv1(x)) + self.identity(x))


def randomize(net, seed=0):
    """Distinct statistics and affine for every BN, frozen ones included."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if hasattr(m, "running_var") and m.running_var is not None and hasattr(m, "eps"):
                c = m.running_var.shape[0]
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.rand(c, generator=g) - 0.5)
                m.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return net


class SqueezeExcite(nn.Module):
    """Squeeze-excitation as LCNet/MobileNetV3 use it (global mean, two 1x1 convs, hardsigmoid gate)."""

    def __init__(self, c):
        super().__init__()
        self.reduce, self.expand = nn.Conv2d(c, c // 4, 1), nn.Conv2d(c // 4, c, 1)

    def forward(self, x):
        return x * F.hardsigmoid(self.expand(torch.relu(self.reduce(x.mean((2, 3), keepdim=True)))))


def lcnet_like(seed=0):
    """A small LCNet-like net (depthwise separable blocks with hardswish, squeeze-excitation in the
    last two blocks): at 32x32 inputs its deepest BNs see 4 values per sample and channel."""

    def block(cin, cout, stride, se=False):
        return nn.Sequential(nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin),
                             nn.Hardswish(), *([SqueezeExcite(cin)] if se else []),
                             nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.Hardswish())

    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.Hardswish(),
                         block(8, 16, 1), block(16, 24, 2), block(24, 24, 1), block(24, 48, 2), block(48, 48, 1),
                         block(48, 96, 2), block(96, 96, 1, se=True), block(96, 96, 1, se=True),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(96, 10)).eval()


def float64_bn_statistics(net, batches, *, one_batch: bool):
    """Each BN's input population statistics ``(mean, biased var)`` in float64 with only the BNs in
    training mode (their drop and act modules, dropout, DropBlock in eval mode): over the batches
    as they come (what train-mode recalibration computes), or over all data as one batch (the
    eval-mode fixed point). BNs in ``net.modules()`` order."""
    ref = copy.deepcopy(net).double().eval()
    bns = [m for m in ref.modules() if isinstance(m, _BatchNorm)]
    seen = {m: [] for m in bns}
    hooks = [m.register_forward_pre_hook(lambda m, a: seen[m].append(a[0])) for m in bns]
    for m in bns:
        m.training = True
    with torch.no_grad():
        for x in ([torch.cat(list(batches))] if one_batch else batches):
            ref(x.double())
    for h in hooks:
        h.remove()
    stats = []
    for m in bns:
        x = torch.cat(seen[m])
        dims = [0, *range(2, x.dim())]
        stats.append((x.mean(dims), x.var(dims, unbiased=False)))
    return stats


def error_in_sd(net, reference) -> float:
    """The largest error of ``net``'s BN statistics against ``reference``
    (:func:`float64_bn_statistics`), in units of the reference standard deviation (mean, and sd)."""
    worst = 0.0
    bns = [m for m in net.modules() if isinstance(m, _BatchNorm)]
    for bn, (mean, var) in zip(bns, reference, strict=True):
        sd = var.sqrt()
        worst = max(worst, float(((bn.running_mean.double() - mean).abs() / sd).max()),
                    float(((bn.running_var.double().sqrt() - sd).abs() / sd).max()))
    return worst

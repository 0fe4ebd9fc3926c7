"""Seeded random small BatchNorm architectures, for checking the fold rules on many shapes.

Plain PyTorch, no dependency on bncal. Each *branch* is a short random stack on a
``(N, 4, 8, 8)`` input built from Conv2d (groups, stride, dilation, padding 0 or k//2, every
``padding_mode``), ConvTranspose2d (groups), BatchNorm2d (affine or not), ReLU, Dropout,
Identity, an occasional residual add (a value used twice) and a head: flatten -> Linear ->
BatchNorm1d, BatchNorm2d -> flatten -> Linear, or pooling -> BatchNorm1d -> Linear.
:func:`packed_model` puts several branches side by side on one input (one output each), so
one ONNX export covers many architectures.

Every BatchNorm gets seeded, nontrivial statistics and affine parameters.
"""

from __future__ import annotations

import random

import torch
from torch import nn

__all__ = ["random_branch", "packed_model", "Branches", "randomize_batchnorms", "INPUT_SHAPE"]

INPUT_SHAPE = (2, 4, 8, 8)
_MODES = ("zeros", "reflect", "replicate", "circular")


class Residual(nn.Module):
    """``x + body(x)``: the input is used twice, so a BN next to it cannot swallow it."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


class Flatten(nn.Module):
    """``torch.flatten(x, 1)`` as a function call (nn.Flatten is a module; both occur)."""

    def forward(self, x):
        return torch.flatten(x, 1)


class Branches(nn.Module):
    """Several networks side by side on one input; one output each (``branches.<i>.`` names)."""

    def __init__(self, branches):
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x):
        return tuple(branch(x) for branch in self.branches)


def _conv(rng: random.Random, c: int, size: int) -> tuple[nn.Module, int, int]:
    c_out = rng.choice([4, 6, 8])
    k = rng.choice([1, 3])
    dilation = rng.choice([1, 2]) if k == 3 and size >= 7 else 1
    padding = dilation * (k // 2) if (rng.random() < 0.6 or size - dilation * (k - 1) < 4) else 0
    mode = rng.choice(_MODES)
    stride = 2 if size >= 8 and rng.random() < 0.25 else 1
    groups = rng.choice([g for g in (1, 2, c) if c % g == 0 and c_out % g == 0])
    conv = nn.Conv2d(c, c_out, k, stride=stride, padding=padding, dilation=dilation, padding_mode=mode,
                     groups=groups, bias=rng.random() < 0.5)
    out = (size + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    return conv, c_out, out


def _conv_transpose(rng: random.Random, c: int, size: int) -> tuple[nn.Module, int, int]:
    groups = rng.choice([g for g in (1, 2) if c % g == 0])
    c_out = groups * rng.choice([2, 3])
    k = rng.choice([1, 2, 3])
    return nn.ConvTranspose2d(c, c_out, k, groups=groups, bias=rng.random() < 0.5), c_out, size + k - 1


def random_branch(seed: int) -> nn.Sequential:
    """A random stack of 3-6 layers on ``INPUT_SHAPE`` with at least one BatchNorm, and a head."""
    rng = random.Random(seed)
    layers, c, size = [], INPUT_SHAPE[1], INPUT_SHAPE[2]
    for _ in range(rng.randint(3, 6)):
        kind = rng.choice(["conv", "conv", "conv", "bn", "bn", "relu", "dropout", "identity", "deconv", "residual"])
        if kind == "conv" or (kind == "deconv" and size > 10):
            layer, c, size = _conv(rng, c, size)
        elif kind == "deconv":
            layer, c, size = _conv_transpose(rng, c, size)
        elif kind == "bn":
            layer = nn.BatchNorm2d(c, affine=rng.random() < 0.7)
        elif kind == "relu":
            layer = nn.ReLU()
        elif kind == "dropout":
            layer = rng.choice([nn.Dropout(0.3), nn.Dropout2d(0.2)])
        elif kind == "identity":
            layer = nn.Identity()
        else:
            body = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1, padding_mode=rng.choice(_MODES)))
            layer = Residual(body)
        layers.append(layer)
    if not any(isinstance(m, nn.BatchNorm2d) for m in nn.Sequential(*layers).modules()):
        layers.append(nn.BatchNorm2d(c))
    head = rng.randrange(3)
    flatten = rng.choice([nn.Flatten(), Flatten()])
    if head == 0:
        layers += [flatten, nn.Linear(c * size * size, 6), nn.BatchNorm1d(6)]
    elif head == 1:
        layers += [nn.BatchNorm2d(c), flatten, nn.Dropout(0.1), nn.Linear(c * size * size, 5)]
    else:
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.BatchNorm1d(c), nn.Linear(c, 5)]
    return randomize_batchnorms(nn.Sequential(*layers), seed)


def packed_model(seeds) -> nn.Module:
    """The branches :func:`random_branch` builds for ``seeds``, side by side on one input."""
    return Branches([random_branch(seed) for seed in seeds]).eval()


def randomize_batchnorms(model: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
                if m.affine:
                    m.weight.copy_((torch.rand(n, generator=gen) + 0.5) * (torch.randint(0, 2, (n,), generator=gen) * 2 - 1))
                    m.bias.copy_(torch.randn(n, generator=gen) * 0.5)
    return model

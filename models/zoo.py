"""Example BatchNorm networks and the shipped MNIST subset, for bncal's demos, tests and benchmarks.

Plain PyTorch, no dependency on bncal. Importable two ways:

- as a file spec, e.g. ``models/zoo.py:mnist_cnn`` (model) or ``models/zoo.py:calibration_batches`` (data);
- as ``models.zoo`` when the repository root is on ``sys.path``.

Models (all return logits; every BatchNorm keeps PyTorch's defaults eps=1e-5, momentum=0.1):

- :func:`mnist_cnn` -- small CNN for 1x28x28 digits. Its head puts a ``Dropout`` *before* a
  ``BatchNorm1d`` on purpose: in training the BN sees dropped-and-rescaled features, at inference
  it sees undropped ones, so its variance estimate is biased ("variance shift", Li et al. 2019,
  arXiv:1801.05134). That is one of the mistakes bncal diagnoses and repairs.
- :func:`mnist_cnn_stale` -- :func:`mnist_cnn` with the shipped ``mnist_cnn_stale.safetensors``
  loaded: trained with batch statistics but running statistics never updated (all 0 / 1).
- :func:`resnet_small`, :func:`resnet18_like` -- ResNet-18 layout (BasicBlocks, conv+BN shortcut).
  Attribute names follow torchvision's ``resnet18`` so its state dicts load into
  :func:`resnet18_like`; like torchvision, each block calls one ``ReLU`` module twice.
- :func:`mobilenet_small` -- MobileNetV2-style inverted residuals (depthwise convs, ReLU6).

Data (the 5000-digit MNIST subset in ``mnist5k.npz``, see README.md for its origin and licence):

- :func:`mnist_arrays` -- ``(x, y)``: float32 images normalised ``(x/255 - 0.1307)/0.3081`` and int64 labels.
- :func:`mnist_batches` -- iterator of ``(x, y)`` batches, shuffled with a fixed seed by default.
- :func:`calibration_batches` -- images only, calibration split, the data-spec entry point.

The rows of ``mnist5k.npz`` are sorted by class (all 0s, then all 1s, ...), and so are the split
indices. Batches taken in order would each hold a single digit; the helpers here therefore shuffle
with a fixed seed unless told not to.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn

try:
    from .mnist_data import MNIST_MEAN, MNIST_NPZ, MNIST_STD, mnist_numpy
except ImportError:  # loaded as a file (a spec such as models/zoo.py:...): read its neighbour by path
    import importlib.util as _util

    _spec = _util.spec_from_file_location("_bncal_models_mnist_data", Path(__file__).with_name("mnist_data.py"))
    _mnist_data = _util.module_from_spec(_spec)
    _spec.loader.exec_module(_mnist_data)
    MNIST_MEAN, MNIST_NPZ, MNIST_STD = _mnist_data.MNIST_MEAN, _mnist_data.MNIST_NPZ, _mnist_data.MNIST_STD
    mnist_numpy = _mnist_data.mnist_numpy

__all__ = [
    "HERE", "MNIST_NPZ", "MNIST_STALE_CKPT", "MNIST_MEAN", "MNIST_STD",
    "mnist_cnn", "mnist_cnn_stale", "resnet_small", "resnet18_like", "mobilenet_small",
    "BasicBlock", "ResNet", "InvertedResidual", "MobileNetV2Small",
    "mnist_arrays", "mnist_batches", "calibration_batches", "heldout_batches",
]

HERE = Path(__file__).resolve().parent
MNIST_STALE_CKPT = HERE / "mnist_cnn_stale.safetensors"


# --------------------------------------------------------------------------------------------
# MNIST CNN
# --------------------------------------------------------------------------------------------

def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def mnist_cnn(dropout: float = 0.5) -> nn.Sequential:
    """Small CNN for 1x28x28 digits (about 37k parameters, 6 Conv2d, 7 BatchNorm layers).

    ``features`` (index 0): 3 stages of 2 x conv3x3-BN-ReLU and a 2x2 maxpool, 8/16/32 channels,
    28 -> 14 -> 7 -> 3 pixels. ``head`` (index 1): flatten, Linear(288, 64, bias=False),
    **Dropout(p) then BatchNorm1d(64)** (deliberate mistake, see module docstring), ReLU,
    Linear(64, 10).

    Two convs per stage rather than one: with a single conv per stage the errors of stale running
    statistics barely compound and eval-mode accuracy stays near 80-90 %; at this depth a model
    whose statistics were never updated is near chance, as real ones are.
    """
    stages: list[nn.Module] = []
    cin = 1
    for c in (8, 16, 32):
        stages += [*_conv_bn_relu(cin, c), *_conv_bn_relu(c, c), nn.MaxPool2d(2)]
        cin = c
    return nn.Sequential(
        nn.Sequential(*stages),
        nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * 3 * 3, 64, bias=False),
            nn.Dropout(dropout),
            nn.BatchNorm1d(64),
            nn.ReLU(inplace=True),
            nn.Linear(64, 10),
        ),
    )


def mnist_cnn_stale() -> nn.Sequential:
    """:func:`mnist_cnn` with ``mnist_cnn_stale.safetensors`` loaded (strict), in eval mode.

    The weights were trained with batch statistics (``tools/train_demo.py``) but every BN's running
    statistics are still at their initial values (mean 0, var 1): in eval mode it is near chance.
    """
    from safetensors.torch import load_file

    model = mnist_cnn()
    model.load_state_dict(load_file(str(MNIST_STALE_CKPT)), strict=True)
    return model.eval()


# --------------------------------------------------------------------------------------------
# ResNet (torchvision resnet18 layout and attribute names)
# --------------------------------------------------------------------------------------------

class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)  # called twice in forward, as in torchvision
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet with BasicBlocks; ``stem="imagenet"`` is torchvision's 7x7/2 conv + 3x3/2 maxpool,
    ``stem="small"`` a 3x3/1 conv without maxpool (for 28..64 pixel inputs)."""

    def __init__(self, layers: Sequence[int] = (2, 2, 2, 2), widths: Sequence[int] = (64, 128, 256, 512),
                 num_classes: int = 1000, in_channels: int = 3, stem: str = "imagenet"):
        super().__init__()
        if stem not in ("imagenet", "small"):
            raise ValueError(f"stem must be 'imagenet' or 'small', got {stem!r}")
        self.inplanes = widths[0]
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, widths[0], 7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(3, stride=2, padding=1)
        else:
            self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        stages = []
        for i, (n, w) in enumerate(zip(layers, widths)):
            stages.append(self._make_layer(w, n, stride=1 if i == 0 else 2))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))
        mods = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        mods += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet_small(num_classes: int = 10, in_channels: int = 3, width: int = 16,
                 layers: Sequence[int] = (2, 2, 2, 2)) -> ResNet:
    """ResNet-18-like with widths ``width * (1, 2, 4, 8)`` and a 3x3 stem (no maxpool).

    Defaults: 20 Conv2d, 20 BatchNorm2d (17 on the main path, 3 in the downsample shortcuts),
    about 0.7M parameters; any input of at least 8x8 pixels.
    """
    return ResNet(layers, tuple(width * m for m in (1, 2, 4, 8)), num_classes, in_channels, stem="small")


def resnet18_like(num_classes: int = 1000, in_channels: int = 3) -> ResNet:
    """torchvision ``resnet18`` layout (7x7 stem, maxpool, widths 64..512; 11.7M parameters at
    1000 classes, 20 BatchNorm2d). State-dict keys match torchvision's."""
    return ResNet((2, 2, 2, 2), (64, 128, 256, 512), num_classes, in_channels, stem="imagenet")


# --------------------------------------------------------------------------------------------
# MobileNetV2-style
# --------------------------------------------------------------------------------------------

def _conv_bn_relu6(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """1x1 expand conv-BN-ReLU6 (skipped when ``expand_ratio == 1``), depthwise 3x3 conv-BN-ReLU6,
    1x1 project conv-BN (linear bottleneck); residual add when stride 1 and shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = cin * expand_ratio
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(_conv_bn_relu6(cin, hidden, 1))
        layers += [
            _conv_bn_relu6(hidden, hidden, 3, stride=stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


# (expand ratio t, output channels c, repeats n, first stride s), as in the MobileNetV2 paper, shortened.
MOBILENET_SMALL_CFG = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 2, 2), (6, 64, 2, 2))


class MobileNetV2Small(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0,
                 cfg: Sequence[tuple[int, int, int, int]] = MOBILENET_SMALL_CFG,
                 stem_channels: int = 32, last_channels: int = 256, dropout: float = 0.2):
        super().__init__()
        c_in = _make_divisible(stem_channels * width_mult)
        feats: list[nn.Module] = [_conv_bn_relu6(in_channels, c_in, 3, stride=2)]
        for t, c, n, s in cfg:
            c_out = _make_divisible(c * width_mult)
            for i in range(n):
                feats.append(InvertedResidual(c_in, c_out, s if i == 0 else 1, t))
                c_in = c_out
        self.last_channels = _make_divisible(last_channels * max(1.0, width_mult))
        feats.append(_conv_bn_relu6(c_in, self.last_channels, 1))
        self.features = nn.Sequential(*feats)
        self.pool = nn.AdaptiveAvgPool2d((1, 1))
        # Dropout after global pooling and before a Linear (no BN after it): the harmless placement.
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.last_channels, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def _make_divisible(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def mobilenet_small(num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0) -> MobileNetV2Small:
    """MobileNetV2-style network: stem conv3x3/2, 7 inverted residual blocks (3 with a residual add),
    1x1 conv to 256 channels, global pool, dropout, linear. Defaults: 22 Conv2d (7 of them depthwise,
    i.e. grouped), 22 BatchNorm2d; input downsampled 16x (any input of at least 16x16 pixels)."""
    return MobileNetV2Small(num_classes, in_channels, width_mult)


# --------------------------------------------------------------------------------------------
# MNIST subset
# --------------------------------------------------------------------------------------------

def mnist_arrays(split: str = "calib") -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` for ``split`` in ``"calib"`` (alias ``"train"``; 4000 digits), ``"test"`` (1000)
    or ``"all"`` (5000), in file order (sorted by class), as tensors (:func:`mnist_data.mnist_numpy`).

    ``x``: float32 (N, 1, 28, 28), ``(pixel/255 - 0.1307) / 0.3081``; ``y``: int64 (N,).
    """
    x, y = mnist_numpy(split)
    return torch.from_numpy(x), torch.from_numpy(y)


def mnist_batches(split: str = "calib", batch_size: int = 128, shuffle: bool = True,
                  seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x, y)`` batches of ``split`` (see :func:`mnist_arrays`). With ``shuffle`` (default)
    the order is a fixed permutation from ``seed``; the last batch may be smaller."""
    x, y = mnist_arrays(split)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed)) if shuffle \
        else torch.arange(len(y))
    for start in range(0, len(y), batch_size):
        i = order[start:start + batch_size]
        yield x[i], y[i]


def calibration_batches(batch_size: int = 128, seed: int = 0) -> list[torch.Tensor]:
    """Input batches (images only) of the 4000-digit calibration split, shuffled with ``seed``.

    With the default 128: 31 batches of 128 and a last one of 32 (unequal sizes on purpose; exact
    recalibration must weight batches by sample count). A list, so it can be iterated repeatedly.
    """
    return [x for x, _ in mnist_batches("calib", batch_size, shuffle=True, seed=seed)]


def heldout_batches(batch_size: int = 128, seed: int = 0) -> list[torch.Tensor]:
    """Input batches (images only) of the 1000-digit held-out split, shuffled with ``seed``."""
    return [x for x, _ in mnist_batches("test", batch_size, shuffle=True, seed=seed)]

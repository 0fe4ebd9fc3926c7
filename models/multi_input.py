"""A two-input BatchNorm network and dict batches for it, for bncal's multi-input examples and tests.

Plain PyTorch, no dependency on bncal. ``image_and_meta`` takes ``forward(image, meta)``: an image
branch (two conv-BN-ReLU) and a metadata branch (Linear-BN1d-ReLU) joined before a linear head.
The data functions give the same seeded synthetic batches as ``{"image": ..., "meta": ...}``
dicts, with the keys in either order (keyword inputs do not depend on it).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ImageAndMeta", "image_and_meta", "image_first_batches", "meta_first_batches"]


class ImageAndMeta(nn.Module):
    def __init__(self, classes: int = 10, meta_features: int = 4):
        super().__init__()
        # (A submodule called ``meta`` breaks torch.onnx.export's dynamo path in torch 2.13: "references
        # nonexistent attribute 0 of meta"; hence the ``_branch`` names.)
        self.image_branch = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.meta_branch = nn.Sequential(nn.Linear(meta_features, 16, bias=False), nn.BatchNorm1d(16), nn.ReLU())
        self.head = nn.Linear(32 + 16, classes)

    def forward(self, image: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.image_branch(image), self.meta_branch(meta)], 1))


def image_and_meta(classes: int = 10) -> ImageAndMeta:
    """:class:`ImageAndMeta`, seeded (the same weights on every call)."""
    torch.manual_seed(0)
    return ImageAndMeta(classes)


def _batches(keys, batch_size: int, batches: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        values = {"image": torch.rand(batch_size, 3, 16, 16, generator=g) * 2 - 1,
                  "meta": torch.randn(batch_size, 4, generator=g) * 3 + 1}
        out.append({k: values[k] for k in keys})
    return out


def image_first_batches(batch_size: int = 64, batches: int = 8, seed: int = 0) -> list[dict]:
    """``batches`` dicts ``{"image": (N, 3, 16, 16), "meta": (N, 4)}``, seeded."""
    return _batches(("image", "meta"), batch_size, batches, seed)


def meta_first_batches(batch_size: int = 64, batches: int = 8, seed: int = 0) -> list[dict]:
    """The same batches as :func:`image_first_batches`, with the keys in the other order."""
    return _batches(("meta", "image"), batch_size, batches, seed)

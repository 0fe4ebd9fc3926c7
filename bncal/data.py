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

from .errors import BncalError, one_line
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

    def __post_init__(self):
        if self.size is not None and (len(self.size) != 2 or any(int(v) < 1 for v in self.size)):
            raise BncalError(f"image size must be two positive numbers H W, not {tuple(self.size)}")
        if self.channels not in (1, 3):
            raise BncalError(f"images have 1 or 3 channels, not {self.channels}")
        n = self.channels
        if len(self.mean) not in (1, n) or len(self.std) not in (1, n):
            raise BncalError(f"--mean and --std need 1 or {n} values for {n}-channel images")
        if not all(np.isfinite(v) for v in (*self.mean, *self.std)):
            raise BncalError("--mean and --std values must be finite numbers")
        if any(v == 0 for v in self.std):
            raise BncalError("--std values must be nonzero")


class ArrayBatches:
    """Batches of ``batch_size`` samples over named arrays of equal length (re-iterable).

    ``arrays`` maps input names to arrays (or lazy loaders of rows); a single-input source
    yields plain arrays, a multi-input one yields dicts.
    """

    def __init__(self, arrays: dict, *, batch_size: int, rank: int = 0, world_size: int = 1, single: bool | None = None):
        if batch_size < 1:
            raise BncalError(f"batch size must be at least 1, not {batch_size}")
        if not arrays:
            raise BncalError("the data holds no arrays")
        for name, a in arrays.items():
            if getattr(a, "ndim", 1) == 0:
                raise BncalError(f"array {name!r} holds a single value (a 0-d array, shape ()); the data needs one "
                                 "row per sample: an array of shape (N, ...)")
        lengths = {name: len(a) for name, a in arrays.items()}
        if len(set(lengths.values())) != 1:
            raise BncalError(f"the data's arrays differ in length: {lengths}; every input needs one row per sample")
        total = next(iter(lengths.values()))
        if total == 0:
            raise BncalError("the calibration data is empty; give at least one sample")
        if total < world_size:  # raised on every rank alike, so no rank waits for the others
            raise BncalError(f"the data holds {total} sample{'s' if total != 1 else ''} for {world_size} ranks, so "
                             f"rank{'s' if world_size - total > 1 else ''} {_ranks_without_data(total, world_size)} "
                             "would get none; give at least one sample per rank, or run fewer ranks")
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
            batch = {name: _native(np.ascontiguousarray(a[lo:hi])) for name, a in self.arrays.items()}
            yield next(iter(batch.values())) if self.single else batch


def _ranks_without_data(total: int, world_size: int) -> str:
    empty = [r for r in range(world_size) if total * r // world_size == total * (r + 1) // world_size]
    return ", ".join(map(str, empty))


def _native(array):
    """The array in the machine's byte order (a big-endian ``.npy`` holds the same numbers)."""
    if isinstance(array, np.ndarray) and not array.dtype.isnative:
        return array.astype(array.dtype.newbyteorder("="))
    return array


class FunctionBatches:
    """Batches from a user callable; the callable is called again for every pass.

    In a distributed run each rank keeps batches ``i`` with ``i % world_size == rank``. A failure
    inside the function (or the generator it returns) is a BncalError naming the function.
    """

    def __init__(self, func, *, batch_size: int | None = None, rank: int = 0, world_size: int = 1, name: str = ""):
        self.func, self.batch_size, self.rank, self.world_size, self.name = func, batch_size, rank, world_size, name
        self._passes: list[int] = []  # batches this rank got in each pass
        self._last_result = None

    def __iter__(self):
        name = self.name or getattr(self.func, "__name__", "data function")
        try:
            accepts = "batch_size" in _inspect.signature(self.func).parameters
        except (TypeError, ValueError):
            accepts = False
        try:
            result = self.func(batch_size=self.batch_size) if accepts and self.batch_size else self.func()
        except Exception as exc:  # the user's own code
            raise BncalError(f"the data function {name} failed: {one_line(exc)}") from exc
        if result is not None and result is self._last_result and iter(result) is result:
            raise BncalError(f"the data function {name} returned the same iterator again, already used up by the "
                             "previous pass; passing over the data several times (mode 'eval') needs a re-iterable: "
                             "return a list, or a new generator on every call")
        try:
            iterator = iter(result)
        except TypeError:
            raise BncalError(f"data function {name} returned {type(result).__name__}, not an iterable of batches") from None
        self._last_result = result
        mine = index = 0
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                break
            except Exception as exc:
                raise BncalError(f"the data function {name} failed while producing batch {index}: {one_line(exc)}") from exc
            if index % self.world_size == self.rank:
                mine += 1
                yield batch
            index += 1
        if mine == 0 and self._passes and self._passes[0] > 0:
            raise BncalError(f"the data function {name} gave no batches on pass {len(self._passes) + 1} (it gave "
                             f"{self._passes[0]} on pass 1); passing over the data several times (mode 'eval') needs "
                             "a re-iterable: return a list, or a new generator on every call")
        if mine == 0 and index > 0 and self.world_size > 1:
            raise BncalError(f"the data function {name} gave {index} batch{'es' if index != 1 else ''} for "
                             f"{self.world_size} ranks, so rank {self.rank} got none (batch i goes to rank i mod "
                             f"{self.world_size}); give at least one batch per rank, or run fewer ranks")
        self._passes.append(mine)


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
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        raise BncalError(f"{path} is not a readable .npy file ({exc}); object arrays are refused") from exc
    except (OSError, EOFError) as exc:
        raise BncalError(f"{path} is not a readable .npy file ({exc}); is it truncated?") from exc
    if array.ndim == 0:
        raise BncalError(f"{path} holds a single value (a 0-d array, shape ()); the data needs one row per "
                         "sample: save an array of shape (N, ...)")
    return array


class _ImageRows:
    """Rows of an image folder, decoded on access (sorted file order)."""

    def __init__(self, folder: Path, options: ImageOptions):
        self.files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise BncalError(f"folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        self.options = options
        self.mean = np.asarray(options.mean, np.float32).reshape(-1, 1, 1)
        self.std = np.asarray(options.std, np.float32).reshape(-1, 1, 1)

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
        except Image.DecompressionBombError as exc:
            raise BncalError(f"image {path} is too large to decode safely ({exc}); shrink it, or remove it from "
                             "the data folder") from exc
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
                x = torch.from_numpy(np.array(_native(x)))
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
            return _native(np.asarray(x))

        for batch in self.batches:
            yield convert(batch)

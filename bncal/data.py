"""Calibration data as users have it: arrays, image folders, their own loaders, with or without labels.

A data spec (:func:`load_data`) is one of:

* ``data.npy``: one array of shape (N, ...), one model input;
* ``data.npz``: one array per model input, by input name (all with the same N); ``inputs=``
  picks the model inputs among the arrays (an archive that also holds labels or indices);
* a folder of images (PNG, JPEG, BMP, GIF, TIFF, WebP, PPM...), subfolders included (an
  ImageFolder layout with one subfolder per class: the labels are not used; symlinked folders
  and files are followed), read with Pillow at their own bit depth (8-bit, or 16-bit
  grayscale), converted to RGB or grayscale, resized, center-cropped and normalised
  (:class:`ImageOptions`; what happens to each pixel format: :class:`_ImageRows`);
* ``file.py:func`` or ``module:func``: a callable returning an iterable of batches, called
  with ``batch_size=`` only when one is given (its own batching is respected otherwise).

Order never decides the result: file data (the first three) is read in an order shuffled
with a fixed seed (``seed=0``; ``shuffle=False`` keeps file order). Memory stays bounded by
the batch: ``.npy`` files are memory-mapped and each batch reads its rows by the permuted
index, sorted within the batch for locality; images are decoded per batch. The order of data
whose batches bncal does not make (a data function, a user's DataLoader) is the user's:
:class:`bncal.calibration.BatchComposition` tells when it is far from random.

Batches are numpy arrays: one array for a single input, a ``{name: array}`` dict for several.
They are re-iterable and come in the same order on every pass (eval-mode recalibration passes
over them more than once). ``rank``/``world_size`` give each process of a distributed run its
own contiguous shard of the (shuffled) order.

``(inputs, labels)`` batches: :func:`select_inputs` (``inputs=`` of :func:`load_data`,
:func:`bncal.recalibrate` and the ONNX functions, ``--inputs`` on the command line) picks
the model inputs out of each batch, by position for tuples and lists, by key for dicts.
"""

from __future__ import annotations

import inspect as _inspect
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import BncalError, one_line
from .specs import resolve_callable

__all__ = ["ArrayBatches", "FunctionBatches", "SelectedInputs", "TorchBatches", "NumpyBatches", "ImageOptions",
           "load_data", "load_labelled_data", "LabelledBatches", "select_inputs", "select_batch", "parse_selectors", "input_hint", "leading_size",
           "IMAGE_SUFFIXES", "NORMALIZATION_PRESETS", "DEFAULT_BATCH_SIZE", "DEFAULT_SEED"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".jfif", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
DEFAULT_BATCH_SIZE = 32  # file data; a data function's own batching is kept unless a batch size is given
DEFAULT_SEED = 0

# ``(mean, std)`` per channel after scaling pixels to [0, 1], as the usual training pipelines use them.
NORMALIZATION_PRESETS = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # torchvision's ImageNet models
    "mnist": ((0.1307,), (0.3081,)),  # the PyTorch MNIST example; models/zoo.py
}


@dataclass
class ImageOptions:
    """How images (and, with ``normalize``, unsigned-integer pixel arrays) become model inputs.

    Image files: converted to ``channels`` 1 (grayscale) or 3 (RGB); resized to exactly
    ``size`` (H, W), or with ``resize`` so that the shorter side is ``resize`` pixels (aspect
    kept, as torchvision's ``Resize(int)``); then center-cropped to ``crop`` (H, W) where
    given. Without ``size`` or ``crop`` every image must have the same size. Pixels then
    become ``(x / maximum - mean) / std`` per channel (``maximum`` 255 for 8-bit images, 65535
    for 16-bit ones; 1 or ``channels`` values each; ``preset`` names a pair of
    :data:`NORMALIZATION_PRESETS`). Resampling is Pillow's bilinear filter.
    """

    size: tuple[int, int] | None = None
    channels: int = 3
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    resize: int | None = None
    crop: tuple[int, int] | None = None
    preset: str | None = None

    def __post_init__(self):
        if self.size is not None and (len(self.size) != 2 or any(int(v) < 1 for v in self.size)):
            raise BncalError(f"image size must be two positive numbers H W, not {tuple(self.size)}")
        if self.size is not None and self.resize is not None:
            raise BncalError("give --image-size H W (exact size) or --resize N (shorter side), not both")
        if self.resize is not None and int(self.resize) < 1:
            raise BncalError(f"--resize must be a positive number of pixels, not {self.resize}")
        if self.crop is not None and (len(self.crop) != 2 or any(int(v) < 1 for v in self.crop)):
            raise BncalError(f"--crop must be one or two positive numbers (H[,W]), not {tuple(self.crop)}")
        if self.channels not in (1, 3):
            raise BncalError(f"images have 1 or 3 channels, not {self.channels}")
        if self.preset is not None:
            if self.preset not in NORMALIZATION_PRESETS:
                raise BncalError(f"unknown normalisation preset {self.preset!r}; use one of "
                                 f"{', '.join(NORMALIZATION_PRESETS)}, or --mean/--std")
            if self.mean is not None or self.std is not None:
                raise BncalError(f"give --preset {self.preset} or --mean/--std, not both")
            self.mean, self.std = NORMALIZATION_PRESETS[self.preset]
        self.mean = tuple(float(v) for v in (self.mean if self.mean is not None else (0.0,)))
        self.std = tuple(float(v) for v in (self.std if self.std is not None else (1.0,)))
        n = self.channels
        if len(self.mean) not in (1, n) or len(self.std) not in (1, n):
            raise BncalError(f"--mean and --std need 1 or {n} values for {n}-channel images")
        if not all(np.isfinite(v) for v in (*self.mean, *self.std)):
            raise BncalError("--mean and --std values must be finite numbers")
        if any(v == 0 for v in self.std):
            raise BncalError("--std values must be nonzero")

    def normalise(self, pixels: np.ndarray, channel_axis: int) -> np.ndarray:
        """``(pixels - mean) / std`` (float32), the mean and std along ``channel_axis``."""
        shape = [1] * pixels.ndim
        shape[channel_axis] = -1
        mean = np.asarray(self.mean, np.float32).reshape(shape)
        std = np.asarray(self.std, np.float32).reshape(shape)
        return ((pixels - mean) / std).astype(np.float32, copy=False)

    def describe(self) -> str:
        geometry = (f"resized to {self.size[0]}x{self.size[1]}" if self.size else
                    f"shorter side resized to {self.resize}" if self.resize else "")
        if self.crop:
            geometry += (", " if geometry else "") + f"center-cropped to {self.crop[0]}x{self.crop[1]}"
        norm = f"preset {self.preset}" if self.preset else f"mean {_numbers(self.mean)}, std {_numbers(self.std)}"
        return ", ".join(filter(None, ["RGB" if self.channels == 3 else "grayscale", geometry, norm]))


def _numbers(values) -> str:
    return ",".join(f"{v:g}" for v in values)


# ------------------------------------------------------------------------------------------------
# Arrays


class ArrayBatches:
    """Batches of ``batch_size`` samples over named arrays of equal length (re-iterable).

    ``arrays`` maps input names to arrays (or lazy readers of rows, indexable by slices and
    by sorted integer arrays); a single-input source yields plain arrays, a multi-input one
    yields dicts. ``seed`` shuffles the samples (a permutation of all of them from
    ``numpy.random.default_rng(seed)``, the same on every pass and every rank; each batch
    reads its rows sorted); ``seed=None`` keeps file order. With ``pixels`` (an
    :class:`ImageOptions`), unsigned-integer arrays are image pixels: scaled by their dtype's
    maximum (255 for uint8) to [0, 1], then normalised along axis 1. ``source`` names the data
    in :attr:`description`.
    """

    def __init__(self, arrays: dict, *, batch_size: int = DEFAULT_BATCH_SIZE, rank: int = 0, world_size: int = 1,
                 single: bool | None = None, seed: int | None = None, pixels: ImageOptions | None = None,
                 source: str = "arrays"):
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
            raise BncalError(f"the data's arrays differ in length: {lengths}; every input needs one row per sample: "
                             "pick the model's inputs with --inputs NAME (library: inputs=)")
        total = next(iter(lengths.values()))
        if total == 0:
            raise BncalError("the calibration data is empty; give at least one sample")
        if total < world_size:  # raised on every rank alike, so no rank waits for the others
            raise BncalError(f"the data holds {total} sample{'s' if total != 1 else ''} for {world_size} ranks, so "
                             f"rank{'s' if world_size - total > 1 else ''} {_ranks_without_data(total, world_size)} "
                             "would get none; give at least one sample per rank, or run fewer ranks")
        if pixels is not None:
            integer = [n for n, a in arrays.items() if np.issubdtype(getattr(a, "dtype", np.float32), np.unsignedinteger)]
            if not integer:
                kinds = ", ".join(f"{n}: {getattr(a, 'dtype', '?')}" for n, a in arrays.items())
                raise BncalError(f"--normalize scales uint8/uint16 pixel arrays, and {source} holds none ({kinds}); "
                                 "drop --normalize")
        self.arrays, self.batch_size, self.seed, self.pixels, self.source = arrays, batch_size, seed, pixels, source
        self.single = len(arrays) == 1 if single is None else single
        self.start = total * rank // world_size
        self.stop = total * (rank + 1) // world_size
        self.total, self.world_size = total, world_size
        self._order = None if seed is None else np.random.default_rng(seed).permutation(total)

    def __len__(self):
        return -(-(self.stop - self.start) // self.batch_size)

    @property
    def samples(self) -> int:
        return self.stop - self.start

    @property
    def description(self) -> str:
        """What is read, in which order, in batches of which size (one line, for reports)."""
        share = f" ({self.samples} on this rank)" if self.world_size > 1 else ""
        order = (f"shuffled with seed {self.seed} (--no-shuffle keeps file order)" if self.seed is not None
                 else "in file order")
        return f"{self.source}, {self.total} samples{share}, {order}, batches of {self.batch_size}"

    def __iter__(self):
        for lo in range(self.start, self.stop, self.batch_size):
            hi = min(lo + self.batch_size, self.stop)
            rows = slice(lo, hi) if self._order is None else np.sort(self._order[lo:hi])
            batch = {name: self._convert(_native(np.ascontiguousarray(a[rows]))) for name, a in self.arrays.items()}
            yield next(iter(batch.values())) if self.single else batch

    def _convert(self, array):
        if self.pixels is None or not np.issubdtype(array.dtype, np.unsignedinteger):
            return array
        scaled = array.astype(np.float32) / np.float32(np.iinfo(array.dtype).max)
        channels = array.shape[1] if array.ndim > 1 else 1
        if len(self.pixels.mean) not in (1, channels) or len(self.pixels.std) not in (1, channels):
            raise BncalError(f"--mean/--std give {len(self.pixels.mean)} values, but the pixel arrays have {channels} "
                             "channels (axis 1); give 1 value or one per channel")
        return self.pixels.normalise(scaled, 1) if array.ndim > 1 else scaled


def _ranks_without_data(total: int, world_size: int) -> str:
    empty = [r for r in range(world_size) if total * r // world_size == total * (r + 1) // world_size]
    return ", ".join(map(str, empty))


def _native(array):
    """The array in the machine's byte order (a big-endian ``.npy`` holds the same numbers)."""
    if isinstance(array, np.ndarray) and not array.dtype.isnative:
        return array.astype(array.dtype.newbyteorder("="))
    return array


# ------------------------------------------------------------------------------------------------
# The user's own batches


class FunctionBatches:
    """Batches from a user callable; the callable is called again for every pass.

    ``batch_size`` is passed as ``func(batch_size=...)`` when given (a function that takes no
    such argument is refused then); without it the function batches as it likes. In a
    distributed run each rank keeps batches ``i`` with ``i % world_size == rank``. A failure
    inside the function (or the generator it returns) is a BncalError naming the function.
    """

    def __init__(self, func, *, batch_size: int | None = None, rank: int = 0, world_size: int = 1, name: str = ""):
        self.func, self.batch_size, self.rank, self.world_size = func, batch_size, rank, world_size
        self.name = name or getattr(func, "__name__", "data function")
        if batch_size is not None and not _accepts_batch_size(func):
            raise BncalError(f"the data function {self.name} takes no batch_size argument, so a batch size cannot be "
                             "passed to it; drop --batch-size (its own batches are used), or give it a batch_size "
                             "parameter")
        self._passes: list[int] = []  # batches this rank got in each pass
        self._last_result = None
        self.largest_batch = 0

    @property
    def description(self) -> str:
        batching = (f"called with batch_size={self.batch_size}" if self.batch_size is not None else
                    "its own batching (no batch size passed)")
        seen = f", batches of up to {self.largest_batch} samples" if self.largest_batch else ""
        return f"data function {self.name}, {batching}{seen}, in the order it gives"

    def __iter__(self):
        name = self.name
        try:
            result = self.func(batch_size=self.batch_size) if self.batch_size is not None else self.func()
        except Exception as exc:  # the user's own code
            raise BncalError(f"the data function {name} failed: {one_line(exc)}") from exc
        except SystemExit as exc:
            raise BncalError(_exited(name, exc)) from exc
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
            except SystemExit as exc:
                raise BncalError(_exited(name, exc, f" while producing batch {index}")) from exc
            if index % self.world_size == self.rank:
                mine += 1
                self.largest_batch = max(self.largest_batch, leading_size(batch) or 0)
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


def _exited(name: str, exc: SystemExit, when: str = "") -> str:
    return (f"the data function {name} called sys.exit({exc.code}){when}; a data function returns (or yields) "
            "batches: raise an exception to report a problem")


def _accepts_batch_size(func) -> bool:
    try:
        parameters = _inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return False
    return any((p.name == "batch_size" and p.kind is not p.POSITIONAL_ONLY) or p.kind is p.VAR_KEYWORD
               for p in parameters)


def leading_size(batch) -> int | None:
    """The number of samples of a batch: the first dimension of its first array (None without one)."""
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        return next((n for n in map(leading_size, batch) if n is not None), None)
    shape = getattr(batch, "shape", None)
    return int(shape[0]) if shape is not None and len(shape) > 0 else None


# ------------------------------------------------------------------------------------------------
# Picking the model inputs out of (inputs, labels) batches


def parse_selectors(inputs) -> tuple:
    """``inputs`` (a position, a key, or several; ``"0,1"`` and ``"image,meta"`` text too) as a tuple
    of ints (positions) and strings (keys)."""
    if inputs is None:
        return ()
    items = [inputs] if isinstance(inputs, (int, str)) else list(inputs)
    selectors = []
    for item in items:
        parts = item.split(",") if isinstance(item, str) else [item]
        for part in parts:
            if isinstance(part, str):
                part = part.strip()
                if not part:
                    continue
                part = int(part) if part.lstrip("-").isdigit() else part
            if isinstance(part, bool) or not isinstance(part, (int, str)):
                raise BncalError(f"an input selector is a position (0) or a key ('image'), not {part!r}")
            selectors.append(part)
    if not selectors:
        raise BncalError("give at least one input to select: a position such as 0 or a key such as image")
    return tuple(selectors)


def select_batch(batch, selectors: tuple, index: int | None = None):
    """The model inputs of one batch: ``batch[s]`` for each selector (positions for a tuple or list,
    keys for a dict); one selector gives the value itself, several a tuple (positions) or a
    dict (keys, in the selectors' order)."""
    which = "a batch" if index is None else f"batch {index}"
    if isinstance(batch, dict):
        keys = [k if k in batch or not isinstance(k, int) else str(k) for k in selectors]
        missing = [k for k in keys if k not in batch]
        if missing:
            raise BncalError(f"{which} has keys {list(batch)}, not {', '.join(map(repr, missing))}; select the model's "
                             "inputs by key (--inputs KEY; library: inputs=)")
        _refuse_labels_only(batch, keys, which)
        return batch[keys[0]] if len(keys) == 1 else {k: batch[k] for k in keys}
    if isinstance(batch, (list, tuple)):
        named = [s for s in selectors if isinstance(s, str)]
        if named:
            raise BncalError(f"{which} is a {type(batch).__name__} of {len(batch)} values, so its inputs are picked by "
                             f"position (--inputs 0; library: inputs=0), not by key {named[0]!r}")
        bad = [s for s in selectors if not -len(batch) <= s < len(batch)]
        if bad:
            raise BncalError(f"{which} holds {len(batch)} values, so there is no position {bad[0]}; select positions "
                             f"0 to {len(batch) - 1}")
        _refuse_labels_only(dict(enumerate(batch)), [s % len(batch) for s in selectors], which, selectors)
        return batch[selectors[0]] if len(selectors) == 1 else tuple(batch[s] for s in selectors)
    raise BncalError(f"{which} is a single {type(batch).__name__}, not a tuple or dict to pick inputs from; "
                     "drop --inputs (library: inputs=)")


def _refuse_labels_only(values: dict, picked: list, which: str, given=None) -> None:
    """BncalError when every picked value looks like class labels (a 1-D integer array of one
    value per sample) while a value left out is floating-point data of as many samples (2-D or
    more: features, not float targets)."""
    if not all(_is_integer_array(values[k]) and len(values[k].shape) == 1 for k in picked):
        return
    samples = values[picked[0]].shape[0]
    data = [k for k in values if k not in picked and not _is_integer_array(values[k])
            and str(getattr(values[k], "dtype", "")).rsplit(".", 1)[-1].startswith(("float", "bfloat", "half"))
            and len(values[k].shape) >= 2 and values[k].shape[0] == samples]
    if not data:
        return
    kind = "position" if given is not None else "key"
    name = lambda items: f"{kind}{'s' if len(items) > 1 else ''} {', '.join(map(repr, items))}"  # noqa: E731
    shown = ",".join(map(str, given if given is not None else picked))
    counted = " (counted from the end)" if given is not None and any(g < 0 for g in given) else ""
    other = ",".join(map(str, data))
    raise BncalError(f"--inputs {shown} picks {name(picked)}{counted} of {which}, one integer per sample: that looks "
                     f"like class labels, while {name(data)} holds floating-point data; give --inputs {other} "
                     f"(library: inputs={data[0] if len(data) == 1 else tuple(data)!r}), or return only the model's "
                     "inputs from a data function if the integers really are its input")


class SelectedInputs:
    """``data`` (an iterable of batches, or a function returning one) with :func:`select_batch`
    applied to every batch; re-iterable when ``data`` is."""

    def __init__(self, data, inputs):
        self.data, self.selectors = data, parse_selectors(inputs)

    def __len__(self):
        return len(self.data)

    @property
    def description(self):
        inner = getattr(self.data, "description", None)
        picked = f"inputs {', '.join(map(str, self.selectors))} of each batch"
        return f"{inner}, {picked}" if inner else picked

    def __iter__(self):
        data = self.data() if callable(self.data) and not hasattr(self.data, "__iter__") else self.data
        for index, batch in enumerate(data):
            yield select_batch(batch, self.selectors, index)


def select_inputs(data, inputs):
    """The model inputs of every batch of ``data`` (any loader, list or data function), e.g.
    ``select_inputs(loader, 0)`` for ``(images, labels)`` batches, ``select_inputs(loader,
    ["image", "meta"])`` for dicts; see :func:`select_batch`. ``inputs=None`` returns ``data``."""
    return data if inputs is None else SelectedInputs(data, inputs)


def _is_integer_array(value) -> bool:
    dtype = getattr(value, "dtype", None)
    if dtype is None:
        return False
    if hasattr(value, "is_floating_point"):  # a torch tensor, without importing torch here
        return not value.is_floating_point() and not value.is_complex() and str(dtype) != "torch.bool"
    return np.issubdtype(np.dtype(dtype), np.integer)


def input_hint(batch, message: str = "") -> str:
    """A hint (``"; ..."``, or ``""``) for a model that failed on ``batch`` with ``message``.

    Names the option that fixes the usual mismatches between data as users have it and the
    model: labels in a tuple batch (``--inputs``), extra keys in a dict batch, integer pixels
    fed to a float model (``--normalize``), an image channel count (``--channels``).
    """
    if isinstance(batch, (list, tuple)) and len(batch) >= 2:
        size = leading_size(batch[0])
        last = batch[-1]
        shape = getattr(last, "shape", None)
        if size is not None and shape is not None and len(shape) == 1 and shape[0] == size and _is_integer_array(last):
            keep = "0" if len(batch) == 2 else ",".join(map(str, range(len(batch) - 1)))
            return (f"; the batch looks like (inputs, labels): give the inputs only, with --inputs {keep} "
                    f"(library: inputs={keep if len(batch) == 2 else '(' + keep + ')'})")
    if isinstance(batch, dict) and ("unexpected keyword argument" in message or "unknown" in message):
        return "; pick the model's inputs out of each batch by key with --inputs KEY (library: inputs=)"
    first = next((v for v in (batch.values() if isinstance(batch, dict) else
                              batch if isinstance(batch, (list, tuple)) else [batch])), None)
    dtype = str(getattr(first, "dtype", ""))
    lowered = message.lower()
    if dtype.endswith(("uint8", "uint16")) and any(w in lowered for w in ("type", "dtype", "byte", "scalar")):
        return ("; the data is unsigned-integer pixels but the model computes in floating point: pass --normalize to "
                "scale .npy/.npz pixels to [0, 1] (then --mean/--std or --preset), or save float32 data")
    channels = _channel_mismatch(message)
    if channels is not None:
        expected, got = channels
        shape = tuple(getattr(first, "shape", ()))
        if len(shape) >= 3 and shape[-1] == expected and shape[1] == got:  # (N, H, W, C) fed to a (N, C, H, W) model
            order = ", ".join(map(str, [0, len(shape) - 1, *range(1, len(shape) - 1)]))
            return (f"; the data looks channels-last (shape {shape}, {expected} channel{'s' if expected != 1 else ''} on the last axis) and the model "
                    f"takes channels first: save the array as x.transpose({order})")
        return f"; the data has {got} channels and the model expects {expected}: for an image folder give --channels {expected}"
    return ""


def _channel_mismatch(message: str):
    found = re.search(r"to have (\d+) channels, but got (\d+) channels", message)
    if found and found.group(1) in ("1", "3"):
        return int(found.group(1)), int(found.group(2))
    return None


# ------------------------------------------------------------------------------------------------
# Specs


def load_data(spec, *, batch_size: int | None = None, rank: int = 0, world_size: int = 1,
              image_options: ImageOptions | None = None, shuffle: bool = True, seed: int = DEFAULT_SEED,
              inputs=None, normalize: bool = False):
    """Open a data spec (see the module docstring) as a re-iterable of batches.

    ``batch_size``: batches of file data (default 32); passed to a data function only when
    given. ``shuffle``/``seed``: file data is read in a random order from ``seed`` unless
    ``shuffle=False``. ``inputs``: the model inputs to pick (:func:`select_inputs`; for
    ``.npz`` files array names, only those arrays are read). ``normalize``: ``.npy``/``.npz``
    unsigned-integer arrays are image pixels, scaled and normalised as ``image_options`` says.
    The result's ``description`` says what was read, in which order and batch size.
    """
    text = str(spec)
    path = Path(text)
    options = image_options or ImageOptions()
    files = dict(batch_size=DEFAULT_BATCH_SIZE if batch_size is None else batch_size, rank=rank, world_size=world_size,
                 seed=seed if shuffle else None, pixels=options if normalize else None)
    selectors = parse_selectors(inputs)
    if path.is_dir():
        _refuse_selectors(selectors, f"an image folder gives images only ({path})")
        if normalize:
            raise BncalError("--normalize is for .npy/.npz pixel arrays; images from a folder are always normalised")
        rows = _ImageRows(path, options)
        return ArrayBatches({"input": rows}, **{**files, "pixels": None}, source=rows.description)
    if path.suffix.lower() == ".npy":
        if not path.is_file():
            raise BncalError(f"data file {path} does not exist")
        _refuse_selectors(selectors, f"{path} holds one array")
        return ArrayBatches({"input": _open_npy(path)}, **files, source=str(path))
    if path.suffix.lower() == ".npz":
        if not path.is_file():
            raise BncalError(f"data file {path} does not exist")
        arrays = _open_npz(path, selectors)
        picked = f" (arrays {', '.join(arrays)})" if selectors else ""
        return ArrayBatches(arrays, **files, single=len(arrays) == 1, source=f"{path}{picked}")
    if ":" in text and not path.exists():
        func = resolve_callable(text, "data")
        if not callable(func):
            raise BncalError(f"data spec {text} does not name a callable")
        if normalize:
            raise BncalError("--normalize is for .npy/.npz pixel arrays; a data function returns its batches as they are")
        return select_inputs(FunctionBatches(func, batch_size=batch_size, rank=rank, world_size=world_size, name=text),
                             selectors or None)
    if not path.exists():
        raise BncalError(f"data {text} does not exist; give a .npy/.npz file, an image folder or 'file.py:function'")
    raise BncalError(f"cannot read data from {text}: expected .npy, .npz, an image folder or 'file.py:function'")


class LabelledBatches:
    """``(inputs, labels)`` batches over an :class:`ArrayBatches` whose ``labels`` array holds the
    labels (re-iterable); ``inputs`` is one array, or a dict for several."""

    def __init__(self, arrays: ArrayBatches, description: str):
        self.arrays, self._description = arrays, description

    def __len__(self):
        return len(self.arrays)

    @property
    def description(self) -> str:
        return f"{self._description}; {self.arrays.description.split(', ', 1)[1]}"

    def __iter__(self):
        for batch in self.arrays:
            labels = batch.pop("labels")
            yield (next(iter(batch.values())) if len(batch) == 1 else batch), labels


def load_labelled_data(spec, *, batch_size: int | None = None, image_options: ImageOptions | None = None,
                       shuffle: bool = True, seed: int = DEFAULT_SEED, normalize: bool = False):
    """Open a labelled data spec as a re-iterable of ``(inputs, labels)`` batches (a held-out set).

    ``spec`` is an ``.npz`` file with a ``labels`` array (every other array of its length is a
    model input), a folder of images in class subfolders (label ``i`` is the ``i``-th subfolder
    name in sorted order), or ``file.py:func`` / ``module:func`` returning ``(inputs, labels)``
    batches. The other arguments are those of :func:`load_data`; labels are never scaled by
    ``normalize``.
    """
    text = str(spec)
    path = Path(text)
    options = image_options or ImageOptions()
    files = dict(batch_size=DEFAULT_BATCH_SIZE if batch_size is None else batch_size, seed=seed if shuffle else None)
    if path.is_dir():
        rows = _ImageRows(path, options)
        folders = [p.relative_to(path).parts for p in rows.files]
        loose = [p for p, parts in zip(rows.files, folders) if len(parts) < 2]
        if loose:
            raise BncalError(f"{loose[0]} is not in a class subfolder of {path}; labelled images need one subfolder "
                             "per class (the ImageFolder layout)")
        classes = sorted({parts[0] for parts in folders})
        labels = np.array([classes.index(parts[0]) for parts in folders], np.int64)
        shown = ", ".join(f"{i} {name}" for i, name in enumerate(classes[:4])) + (", ..." if len(classes) > 4 else "")
        return LabelledBatches(ArrayBatches({"input": rows, "labels": labels}, single=False, source=str(path), **files),
                               f"{rows.description.replace('labels not used', 'labels by sorted name')} ({shown})")
    if path.suffix.lower() == ".npz":
        if not path.is_file():
            raise BncalError(f"data file {path} does not exist")
        arrays = _open_npz(path, ())
        if "labels" not in arrays:
            raise BncalError(f"{path} holds no 'labels' array ({', '.join(arrays)}); labelled data needs one, "
                             "beside the model inputs of the same length")
        labels = np.asarray(arrays.pop("labels"))
        inputs = {name: a for name, a in arrays.items() if len(a) == len(labels)}
        if not inputs:
            raise BncalError(f"{path} holds no array of the labels' length {len(labels)} to feed the model")
        batches = ArrayBatches({**inputs, "labels": labels.astype(np.int64) if labels.dtype.kind in "ub" else labels},
                               single=False, pixels=options if normalize else None, source=str(path), **files)
        return LabelledBatches(batches, f"{path} (inputs {', '.join(inputs)}, labels)")
    if ":" in text and not path.exists():
        func = resolve_callable(text, "data")
        if not callable(func):
            raise BncalError(f"data spec {text} does not name a callable")
        return FunctionBatches(func, batch_size=batch_size, name=text)
    raise BncalError(f"cannot read labelled data from {text}: give an .npz file with a 'labels' array, an image folder "
                     "with one subfolder per class, or 'file.py:function' returning (inputs, labels) batches")


def _refuse_selectors(selectors, what: str) -> None:
    if selectors:
        raise BncalError(f"{what}: there are no inputs to pick; drop --inputs")


def _open_npz(path: Path, selectors: tuple) -> dict:
    try:
        with np.load(path, allow_pickle=False) as archive:
            names = list(archive.files)
            positions = [s for s in selectors if isinstance(s, int)]
            if positions:
                raise BncalError(f"{path} holds named arrays ({', '.join(names)}); pick them by name, e.g. "
                                 f"--inputs {names[0]}")
            missing = [s for s in selectors if s not in names]
            if missing:
                raise BncalError(f"{path} holds no array {missing[0]!r}; it holds {', '.join(names)}")
            return {name: archive[name] for name in (selectors or names)}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise BncalError(f"{path} is not a readable .npz file ({exc}); note that object arrays are refused") from exc


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


def _image_files(folder: Path) -> list[Path]:
    """The image files under ``folder``, sorted: subfolders included, symlinked folders and files
    followed (as torchvision's ImageFolder does), hidden files and folders skipped. A symlink
    back to a folder it sits in (a loop) and a link to nothing are refused by name."""
    import os

    files, ancestors = [], []

    def walk(directory: Path) -> None:
        real = os.path.realpath(directory)
        if real in ancestors:
            raise BncalError(f"{directory} in the data folder {folder} links back to {real}, a folder it is inside "
                             "(a loop); remove the link or point it elsewhere")
        ancestors.append(real)
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as exc:
            raise BncalError(f"cannot list {directory} in the data folder {folder}: {exc.strerror}") from exc
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            if entry.is_dir(follow_symlinks=True):
                walk(path)
            elif path.suffix.lower() in IMAGE_SUFFIXES:
                if entry.is_file(follow_symlinks=True):
                    files.append(path)
                elif entry.is_symlink():
                    raise BncalError(f"image {path} is a link to {os.readlink(path)}, which does not exist; remove the "
                                     "link or restore its target")
        ancestors.pop()

    walk(folder)
    return sorted(files)


# Pillow modes read exactly, by what becomes of them; every other mode is refused by name.
_EIGHT_BIT_MODES = {"1": "bilevel, read as 0 and 1", "L": "8-bit grayscale", "P": "palette, colours looked up",
                    "PA": "palette with alpha, colours looked up, alpha dropped", "LA": "8-bit grayscale, alpha dropped",
                    "RGB": "8-bit RGB", "RGBA": "8-bit RGB, alpha dropped", "RGBX": "8-bit RGB",
                    "YCbCr": "8-bit YCbCr, converted to RGB"}
_SIXTEEN_BIT_GRAY_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_REFUSED_MODES = {"I": "32-bit integer pixels, whose range bncal cannot know",
                  "F": "32-bit floating-point pixels, whose range bncal cannot know",
                  "CMYK": "CMYK (print colours), which has no exact conversion to RGB without a colour profile",
                  "LAB": "CIELAB colours", "HSV": "HSV colours"}


def _pixel_depth(img, path: Path) -> int:
    """The largest value of ``img``'s samples as stored (255 or 65535); BncalError for an image
    bncal cannot read exactly, named by its mode."""
    raw = [t.args[0] if isinstance(t.args, tuple) else t.args for t in (img.tile or []) if t.args]
    wide = [r for r in raw if isinstance(r, str) and ";16" in r]
    if img.mode in _SIXTEEN_BIT_GRAY_MODES:
        return 65535
    if img.mode in _EIGHT_BIT_MODES and not wide:
        return 255
    if wide:  # Pillow reads 16-bit colour (or gray with alpha) keeping only the high 8 bits of each sample
        what = f"16-bit {wide[0].split(';')[0]} ({img.format or 'image'}), which Pillow reads keeping only 8 bits per sample"
    else:
        what = f"mode {img.mode}: " + _REFUSED_MODES.get(img.mode, "a pixel format bncal does not read")
    raise BncalError(f"image {path} is {what}; convert it to 8-bit RGB/grayscale or 16-bit grayscale PNG, or save "
                     "the pixels as a uint8/uint16 .npy and pass --normalize")


class _ImageRows:
    """The images under a folder (see :func:`_image_files`), decoded on access at their own bit
    depth: rows by a slice or by an integer array.

    8-bit images (bilevel, grayscale, palette, RGB, with or without alpha) become ``channels``
    channels as Pillow converts them (palettes looked up; RGB to grayscale by ITU-R 601-2 luma),
    scaled by 255. 16-bit grayscale is scaled by 65535 (three equal channels for RGB). Alpha is
    dropped: colours are read as stored, not composited on a background (as torchvision's
    loader does). 16-bit colour, 32-bit integer or float, CMYK and other modes are refused."""

    def __init__(self, folder: Path, options: ImageOptions):
        self.folder = folder
        self.files = _image_files(folder)
        if not self.files:
            raise BncalError(f"folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        self.options = options
        self.classes = len({p.relative_to(folder).parts[0] for p in self.files if len(p.relative_to(folder).parts) > 1})

    def __len__(self):
        return len(self.files)

    @property
    def description(self) -> str:
        classes = f"{self.classes} class subfolders, labels not used; " if self.classes else ""
        return f"image folder {self.folder} ({classes}{self.options.describe()})"

    def __getitem__(self, index):
        files = self.files[index] if isinstance(index, slice) else [self.files[i] for i in np.asarray(index)]
        rows = [self._read(p) for p in files]
        shapes = {r.shape for r in rows}
        if len(shapes) > 1:
            raise BncalError(f"images differ in size {sorted(s[1:] for s in shapes)}; give --image-size H W, or "
                             "--resize N with --crop H W")
        return np.stack(rows)

    def _read(self, path: Path) -> np.ndarray:
        from PIL import Image

        try:
            with Image.open(path) as img:
                maximum = _pixel_depth(img, path)
                if maximum == 65535:
                    img = img.convert("F")  # exact for 16-bit values; resampled in floating point
                elif img.mode in ("P", "PA"):
                    img = img.convert("RGBA")  # palette transparency becomes alpha, then dropped
                if img.mode != "F":
                    img = img.convert("L" if self.options.channels == 1 else "RGB")
                img = self._geometry(img, path)
                array = np.asarray(img, dtype=np.float32)
        except BncalError:
            raise
        except Image.DecompressionBombError as exc:
            raise BncalError(f"image {path} is too large to decode safely ({exc}); shrink it, or remove it from "
                             "the data folder") from exc
        except (OSError, ValueError, SyntaxError) as exc:  # Pillow's errors for corrupt or truncated files
            raise BncalError(f"cannot read image {path}: {one_line(exc)}; remove or replace the file") from exc
        array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
        if array.shape[0] != self.options.channels:  # 16-bit grayscale read as RGB
            array = np.repeat(array, self.options.channels, axis=0)
        return self.options.normalise(array / np.float32(maximum), 0)

    def _geometry(self, img, path):
        from PIL import Image

        o = self.options
        if o.size is not None:
            h, w = o.size
            img = img.resize((w, h), Image.BILINEAR)
        elif o.resize is not None:
            w, h = img.size
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = o.resize, int(o.resize * long / short)
            img = img.resize((new_short, new_long) if w <= h else (new_long, new_short), Image.BILINEAR)
        if o.crop is not None:
            ch, cw = o.crop
            w, h = img.size
            if ch > h or cw > w:
                raise BncalError(f"image {path} is {h}x{w} pixels after resizing, smaller than --crop {ch} {cw}; "
                                 "give a smaller --crop or a larger --resize")
            top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
            img = img.crop((left, top, left + cw, top + ch))
        return img


# ------------------------------------------------------------------------------------------------
# Framework views


class TorchBatches:
    """Wrap numpy batches as torch tensors, floating arrays cast to ``dtype`` (re-iterable)."""

    def __init__(self, batches, dtype=None):
        self.batches, self.dtype = batches, dtype

    def __len__(self):
        return len(self.batches)

    @property
    def description(self):
        return getattr(self.batches, "description", None)

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

    @property
    def description(self):
        return getattr(self.batches, "description", None)

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

"""Corrupted MNIST digits (numpy only): the shifted domains of ``tools/bench_domain_shift.py``.

Each corruption maps pixel images in [0, 1] (any shape ending in 28x28) to corrupted ones in
[0, 1], at severities 1 (mild) to 3 (strong), in the spirit of Hendrycks & Dietterich's ImageNet-C,
with strengths chosen for 28x28 digits:

- evaluated: ``gaussian_noise``, ``shot_noise`` (Poisson), ``blur`` (Gaussian), ``contrast``,
  ``brightness``, ``inversion`` (a blend towards the negative);
- held out, to choose the prior's strength on (as Schneider et al. 2020 choose theirs on
  ImageNet-C's held-out corruptions): ``impulse_noise`` (salt and pepper), ``speckle_noise``,
  ``pixelate``.

Data functions for ``bncal --data`` (NCHW float32 batches, normalised as
:func:`models.zoo.mnist_arrays`): :func:`noisy_digits` (the unlabelled target samples of the
README: 32 calibration digits with Gaussian noise of severity 3), :func:`noisy_heldout` (the 1000
held-out digits with the same corruption); ``*_nhwc`` for Keras.
"""

from __future__ import annotations

import numpy as np

try:
    from . import zoo
except ImportError:  # loaded as a file (bncal --data models/corruptions.py:...): its folder is on sys.path
    import zoo

__all__ = ["EVALUATED", "HELD_OUT", "SEVERITIES", "corrupt", "pixels", "normalise", "noisy_digits",
           "noisy_heldout", "noisy_digits_nhwc"]

SEVERITIES = (1, 2, 3)


def _gaussian_noise(x, s, rng):
    return x + rng.normal(0.0, (0.25, 0.4, 0.6)[s - 1], x.shape)


def _shot_noise(x, s, rng):
    photons = (6.0, 2.5, 1.0)[s - 1]
    return rng.poisson(x * photons) / photons


def _blur(x, s, rng):
    sigma = (1.0, 1.5, 2.0)[s - 1]
    radius = int(np.ceil(3 * sigma))
    offsets = np.arange(28)[:, None] - np.arange(28)[None, :]
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2) * (np.abs(offsets) <= radius)
    kernel /= np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2).sum()
    return kernel @ x @ kernel.T  # separable, zero padding (the background is black)


def _contrast(x, s, rng):
    c = (0.4, 0.25, 0.15)[s - 1]
    mean = x.mean(axis=(-2, -1), keepdims=True)
    return (x - mean) * c + mean


def _brightness(x, s, rng):
    return x + (0.3, 0.5, 0.7)[s - 1]


def _inversion(x, s, rng):
    a = (0.7, 0.85, 1.0)[s - 1]
    return (1 - a) * x + a * (1 - x)


def _impulse_noise(x, s, rng):
    p = (0.05, 0.1, 0.2)[s - 1]
    u = rng.random(x.shape)
    return np.where(u < p / 2, 0.0, np.where(u > 1 - p / 2, 1.0, x))


def _speckle_noise(x, s, rng):
    return x + x * rng.normal(0.0, (0.4, 0.7, 1.0)[s - 1], x.shape)


def _pixelate(x, s, rng):
    block = (2, 4, 7)[s - 1]
    shape = x.shape
    blocks = x.reshape(*shape[:-2], 28 // block, block, 28 // block, block).mean(axis=(-3, -1))
    return np.repeat(np.repeat(blocks, block, axis=-2), block, axis=-1).reshape(shape)


EVALUATED = {"gaussian_noise": _gaussian_noise, "shot_noise": _shot_noise, "blur": _blur,
             "contrast": _contrast, "brightness": _brightness, "inversion": _inversion}
HELD_OUT = {"impulse_noise": _impulse_noise, "speckle_noise": _speckle_noise, "pixelate": _pixelate}


def corrupt(images: np.ndarray, kind: str, severity: int, seed: int = 0) -> np.ndarray:
    """``images`` (pixels in [0, 1], last two axes 28x28) corrupted by ``kind`` at ``severity``
    (1 to 3), clipped to [0, 1], float32. The noise is drawn from ``numpy.random.default_rng(seed)``."""
    table = {**EVALUATED, **HELD_OUT}
    if kind not in table:
        raise ValueError(f"unknown corruption {kind!r}; one of {', '.join(table)}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, not {severity!r}")
    out = table[kind](np.asarray(images, np.float64), severity, np.random.default_rng(seed))
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def pixels(split: str = "calib") -> tuple[np.ndarray, np.ndarray]:
    """``(images, labels)`` of a split of ``mnist5k.npz`` in file order: float32 (N, 1, 28, 28)
    pixels in [0, 1], int64 labels."""
    x, y = zoo.mnist_arrays(split)
    return (x.numpy() * zoo.MNIST_STD + zoo.MNIST_MEAN).astype(np.float32), y.numpy()


def normalise(images: np.ndarray) -> np.ndarray:
    """Pixels in [0, 1] to the model's input, ``(p - 0.1307) / 0.3081``, float32."""
    return ((images - zoo.MNIST_MEAN) / zoo.MNIST_STD).astype(np.float32)


def _noisy(split: str, count: int | None, seed: int) -> np.ndarray:
    images, _ = pixels(split)
    if count is not None:
        images = images[np.random.default_rng(seed).permutation(len(images))[:count]]
    return normalise(corrupt(images, "gaussian_noise", 3, seed=seed))


def noisy_digits(count: int = 32, seed: int = 0) -> list[np.ndarray]:
    """``count`` calibration digits drawn with ``seed``, Gaussian noise of severity 3, as one
    NCHW batch: the unlabelled target samples of the README."""
    return [_noisy("calib", count, seed)]


def noisy_heldout(batch_size: int = 100, seed: int = 1) -> list[np.ndarray]:
    """The 1000 held-out digits with Gaussian noise of severity 3, NCHW batches."""
    x = _noisy("test", None, seed)
    return [x[i:i + batch_size] for i in range(0, len(x), batch_size)]


def noisy_digits_nhwc(count: int = 32, seed: int = 0) -> list[np.ndarray]:
    """:func:`noisy_digits` in Keras's layout (NHWC)."""
    return [np.ascontiguousarray(b.transpose(0, 2, 3, 1)) for b in noisy_digits(count, seed)]

"""Batch renormalisation: the statistics a renorm layer's training forward normalised with.

Renorm's training forward (Ioffe 2017, Algorithm 1), with ``(mu_R, sigma_R)`` the renorm
averages (PyTorch :mod:`bncal.torch.nn`: the running statistics, ``sigma_R = sqrt(running_var +
eps)``; Keras: ``renorm_mean`` and ``max(renorm_stddev, sqrt(epsilon))``)::

    sigma_B = sqrt(var_B + eps)
    r = clip(sigma_B / sigma_R, rmin, rmax)
    d = clip((mu_B - mu_R) / sigma_R, -dmax, dmax)
    x_hat = (x - mu_B) / sigma_B * r + d

is a plain normalisation ``x_hat = (x - m) / s`` with ``s = sigma_B / r`` and
``m = mu_B - d * s``. Where r and d are not clipped, ``s = sigma_R`` and ``m = mu_R`` whatever
the batch: the network was trained against the renorm averages, which population statistics
would replace by something else. Where they are clipped to ``r = 1, d = 0`` (the warm-up) it is
plain BatchNorm: the batch statistics. A BN at inference divides by ``sqrt(var + eps)``, so the
inference statistics that reproduce the training forward are ``(m, s**2 - eps)``:
:meth:`RenormReference.training_statistics`, evaluated per batch where a pass runs the training
forward and on the population statistics where the final statistics are written or judged.
Recalibration, the check and the static inspection of both frameworks ask this one rule.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from .report import plural
from .stats import ChannelMoments

__all__ = ["RenormReference", "renorm_notes"]


@dataclasses.dataclass(frozen=True)
class RenormReference:
    """One renorm layer's renorm averages (``mean``, ``std`` = sigma_R as the training forward
    divides by it, float64 per channel), its ``eps`` and the clipping bounds of its last
    training step (``math.inf`` where unbounded)."""

    mean: np.ndarray
    std: np.ndarray
    eps: float
    rmin: float = 0.0
    rmax: float = math.inf
    dmax: float = math.inf

    def corrections(self, mean, var) -> tuple[np.ndarray, np.ndarray]:
        """Unclipped ``(r, d)`` for batch (or population) statistics ``mean``, biased ``var``."""
        sigma = np.sqrt(np.asarray(var, np.float64) + self.eps)
        return sigma / self.std, (np.asarray(mean, np.float64) - self.mean) / self.std

    def clipped(self, mean, var) -> np.ndarray:
        """Per channel: whether r or d is clipped at these statistics."""
        r, d = self.corrections(mean, var)
        return (r < self.rmin) | (r > self.rmax) | (np.abs(d) > self.dmax)

    def training_statistics(self, mean, var) -> tuple[np.ndarray, np.ndarray]:
        """The ``(mean, biased variance)`` an inference BN needs to compute the training forward
        on data with these statistics (module docstring); float64, the renorm averages exactly
        where nothing is clipped. The variance is floored at 0: with r clipped at ``rmax`` on a
        near-constant channel ``s**2 - eps`` can dip below it, where no stored variance would
        reproduce the forward anyway."""
        mean = np.asarray(mean, np.float64)
        sigma = np.sqrt(np.asarray(var, np.float64) + self.eps)
        r_raw, d_raw = self.corrections(mean, var)
        r, d = np.clip(r_raw, self.rmin, self.rmax), np.clip(d_raw, -self.dmax, self.dmax)
        scale = sigma / r
        free = (r == r_raw) & (d == d_raw)
        out_mean = np.where(free, self.mean, mean - d * scale)
        out_var = np.where(free, self.std ** 2, scale ** 2) - self.eps
        return out_mean, np.maximum(out_var, 0.0)

    def training_moments(self, moments: ChannelMoments) -> ChannelMoments:
        """:meth:`training_statistics` of population ``moments``, as moments of the same count."""
        mean, var = self.training_statistics(moments.mean, moments.variance)
        return ChannelMoments(moments.count, mean, var * moments.count)


def renorm_notes(layers, use: str) -> list[str]:
    """What the rule decided for ``layers`` (``[(name, RenormReference, population moments)]``),
    for a report's notes: one note for the layers whose r and d stay within their bounds on the
    population statistics, one per layer with clipped channels. ``use``: ``"recalibrate"`` or
    ``"check"``."""
    free, notes = [], []
    for name, reference, moments in layers:
        clipped = reference.clipped(moments.mean, moments.variance)
        if not clipped.any():
            free.append(name)
            continue
        notes.append(f"{name} is a batch renormalisation layer with r or d clipped on this data in "
                     f"{int(clipped.sum())} of {plural(clipped.size, 'channel')}: there its training forward depends "
                     "on the batch statistics; its reference statistics are that forward's on the population "
                     "statistics (the renorm averages where unclipped)")
    if free:
        action = {"recalibrate": "kept as their inference statistics (population statistics would change the "
                                 "function the network was trained to compute)",
                  "check": "the check judges them against those, not against the data's batch statistics"}[use]
        shown = ", ".join(free[:6]) + (f" and {len(free) - 6} more" if len(free) > 6 else "")
        notes.insert(0, f"batch renormalisation: r and d stay within their clipping bounds on this data in every "
                        f"channel of {shown}, so their training forward normalised with their renorm averages, "
                        f"{action}")
    return notes

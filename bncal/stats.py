"""The statistics core: exact per-channel population moments, shared by every path.

Both recalibration paths (PyTorch in :mod:`bncal.torch.recalibration`, ONNX in
:mod:`bncal.onnx.recalibration`) reduce what they see to per-batch, per-channel
``(count, mean, biased variance)`` triples and hand them to :class:`ChannelMoments`, which
merges them in float64 with Chan et al.'s pairwise update::

    n = n_a + n_b
    delta = mean_b - mean_a
    mean = mean_a + delta * n_b / n
    M2 = M2_a + M2_b + delta**2 * n_a * n_b / n          (M2 = sum of squared deviations)

This never forms E[x^2] - E[x]^2, so it does not lose precision when the mean is large
against the spread, and the result does not depend on how the data was split into batches
(up to float64 rounding): an unequal last batch counts exactly as many samples as it has.

Every element of a channel counts as one sample: a BatchNorm2d input of shape (N, C, H, W)
contributes N*H*W samples per channel, as BatchNorm itself computes its batch statistics.

The variance that bncal stores as a BN's moving variance is the *population* (biased)
variance, ``M2 / n``. That is the variance a train-mode BN normalises with, so a model in
eval mode with these statistics computes exactly what a train-mode forward of the whole
calibration set as one batch would (PyTorch's own running update uses the unbiased batch
variance; over calibration-set sizes the factor n/(n-1) is below 1e-6 anyway).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ChannelMoments", "StackedMoments", "batch_moments", "max_relative_change", "fixed_point_passes",
           "anchored_statistics", "mix_with_source"]


@dataclass
class ChannelMoments:
    """Running per-channel count, mean and sum of squared deviations, in float64.

    ``count`` is the number of samples per channel (the same for every channel).
    """

    count: int
    mean: np.ndarray
    m2: np.ndarray

    @classmethod
    def empty(cls, channels: int) -> "ChannelMoments":
        return cls(0, np.zeros(channels, np.float64), np.zeros(channels, np.float64))

    @property
    def channels(self) -> int:
        return int(self.mean.shape[0])

    @property
    def variance(self) -> np.ndarray:
        """Population (biased) variance ``M2 / n``: what BatchNorm normalises with."""
        if self.count == 0:
            raise ValueError("no samples accumulated")
        return self.m2 / self.count

    @property
    def unbiased_variance(self) -> np.ndarray:
        """Sample variance ``M2 / (n - 1)``."""
        if self.count < 2:
            raise ValueError("the unbiased variance needs at least 2 samples")
        return self.m2 / (self.count - 1)

    def add_batch(self, count: int, mean, biased_var) -> "ChannelMoments":
        """Merge one batch given by its per-channel mean and biased variance over ``count``."""
        mean = np.asarray(mean, np.float64).reshape(-1)
        m2 = np.asarray(biased_var, np.float64).reshape(-1) * count
        return self.merge(ChannelMoments(int(count), mean, m2))

    def add_array(self, x, channel_axis: int = 1) -> "ChannelMoments":
        """Merge every element of ``x`` (a numpy array), channels along ``channel_axis``."""
        count, mean, var = batch_moments(x, channel_axis)
        return self.add_batch(count, mean, var)

    def merge(self, other: "ChannelMoments") -> "ChannelMoments":
        """Merge ``other`` into ``self`` in place (Chan's update) and return ``self``.

        ``self.mean`` and ``self.m2`` are updated in place (they keep their identity and
        never alias ``other``'s), with arithmetic only, so the same update runs on torch
        tensors: the PyTorch path merges each BN call into float64 tensors on the model's
        device without allocating anything that outlives the call.
        """
        if other.channels != self.channels:
            raise ValueError(f"cannot merge {other.channels} channels into {self.channels}")
        if other.count == 0:
            return self
        if self.count == 0:
            self.count = other.count
            self.mean[...] = other.mean
            self.m2[...] = other.m2
            return self
        n = self.count + other.count
        delta = other.mean - self.mean
        self.mean += delta * (other.count / n)
        self.m2 += other.m2
        self.m2 += delta * delta * (self.count * other.count / n)
        self.count = n
        return self

    def copy(self) -> "ChannelMoments":
        return ChannelMoments(self.count, self.mean.copy(), self.m2.copy())

    @staticmethod
    def combine(parts) -> "ChannelMoments":
        """Merge an ordered sequence of moments into a new object (deterministic order)."""
        parts = list(parts)
        if not parts:
            raise ValueError("nothing to combine")
        out = ChannelMoments.empty(parts[0].channels)
        for part in parts:
            out.merge(part)
        return out

    def to_array(self) -> np.ndarray:
        """Pack as one float64 vector ``[count, mean..., m2...]`` (for collective ops)."""
        return np.concatenate([[float(self.count)], self.mean, self.m2])

    @classmethod
    def from_array(cls, packed) -> "ChannelMoments":
        packed = np.asarray(packed, np.float64)
        channels = (packed.shape[0] - 1) // 2
        return cls(int(round(packed[0])), packed[1 : 1 + channels].copy(), packed[1 + channels :].copy())


class StackedMoments:
    """The :class:`ChannelMoments` of several layers in one float64 buffer, merged all at once.

    ``layers`` maps each name to a ChannelMoments whose ``mean`` and ``m2`` are views into the
    shared buffer, so it reads like any other. :meth:`add_batches` merges one batch of every
    layer with the arithmetic of :meth:`ChannelMoments.add_batch` element for element (the
    count factors computed per layer from Python ints, as there), in a few array operations
    instead of a dozen per layer: the ONNX path merges every BN of a graph after each batch.
    """

    def __init__(self, channels: dict[str, int]):
        sizes = [int(c) for c in channels.values()]
        bounds = np.cumsum([0] + sizes)
        self.mean, self.m2 = np.zeros(bounds[-1], np.float64), np.zeros(bounds[-1], np.float64)
        self._sizes = sizes
        self.layers = {name: ChannelMoments(0, self.mean[a:b], self.m2[a:b])
                       for name, a, b in zip(channels, bounds[:-1], bounds[1:])}

    def add_batches(self, counts, means, biased_vars) -> "StackedMoments":
        """Merge one batch per layer, in ``layers`` order: its ``count`` values per channel, their
        per-channel means and biased variances."""
        counts = [int(c) for c in counts]
        layers = list(self.layers.values())
        mean = np.concatenate([np.asarray(m).reshape(-1) for m in means]).astype(np.float64)
        var = np.concatenate([np.asarray(v).reshape(-1) for v in biased_vars]).astype(np.float64)
        if len(counts) != len(layers) or mean.shape != self.mean.shape or var.shape != self.mean.shape:
            raise ValueError(f"expected {len(layers)} layers of {self._sizes} channels")
        m2 = var * np.repeat(np.asarray(counts, np.float64), self._sizes)
        if all(layer.count == 0 for layer in layers) and all(counts):  # the first batch: a copy, as in merge
            self.mean[...], self.m2[...] = mean, m2
        elif all(layer.count for layer in layers) and all(counts):
            totals = [layer.count + c for layer, c in zip(layers, counts)]
            delta = mean - self.mean
            self.mean += delta * np.repeat([c / n for c, n in zip(counts, totals)], self._sizes)
            self.m2 += m2
            self.m2 += delta * delta * np.repeat([layer.count * c / n for layer, c, n in zip(layers, counts, totals)],
                                                 self._sizes)
        else:  # some layer without samples so far or in this batch: merge's own special cases
            bounds = np.cumsum([0] + self._sizes)
            for layer, c, a, b in zip(layers, counts, bounds[:-1], bounds[1:]):
                layer.merge(ChannelMoments(c, mean[a:b], m2[a:b]))
            return self
        for layer, c in zip(layers, counts):
            layer.count += c
        return self



def batch_moments(x, channel_axis: int = 1):
    """Per-channel ``(count, mean, biased variance)`` of a numpy array, computed in float64.

    Two passes over the batch (mean, then squared deviations), so the result is as exact as
    float64 allows whatever the offset of the data.
    """
    x = np.asarray(x)
    if x.ndim < 2:
        raise ValueError(f"expected an array with a channel axis, got shape {x.shape}")
    x = np.moveaxis(x, channel_axis, 0).reshape(x.shape[channel_axis], -1).astype(np.float64)
    count = x.shape[1]
    mean = x.mean(axis=1)
    var = np.square(x - mean[:, None]).mean(axis=1)
    return count, mean, var


def max_relative_change(old: dict, new: dict, eps: float = 1e-12) -> float:
    """Largest relative change of mean or std between two ``{layer: ChannelMoments}`` maps.

    Mean changes are measured in units of the new standard deviation (a mean near zero has
    no meaningful relative change); variance changes relative to the new variance.
    """
    worst = 0.0
    for name, b in new.items():
        a = old.get(name)
        if a is None:
            return float("inf")
        sd = np.sqrt(b.variance + eps)
        worst = max(worst,
                    float(np.max(np.abs(b.mean - a.mean) / sd, initial=0.0)),
                    float(np.max(np.abs(b.variance - a.variance) / (b.variance + eps), initial=0.0)))
    return worst


def fixed_point_passes(train_pass, eval_pass, *, mode: str, tol: float, max_passes: int | None = None,
                       on_pass=None, mix=None):
    """Drive a recalibration: one train-mode pass, then (``eval`` mode) eval passes to a fixed point.

    ``train_pass()`` returns ``{layer: ChannelMoments}`` with every BN normalising with its
    batch statistics (the PreciseBN definition). ``eval_pass(stats)`` returns the moments of
    every BN's input when every BN normalises with ``stats`` (its moving statistics). In
    ``eval`` mode the map ``stats -> eval_pass(stats)`` is iterated from the train-mode result
    until the largest relative change (:func:`max_relative_change`) is at most ``tol``, or
    ``max_passes`` passes in all have run.

    The train-mode result is exact for every BN whose input no other BN affects, and off
    elsewhere by the second-order effect of batch-to-batch noise (about 1/values per channel
    per batch). Plain eval passes (Jacobi) make one more BN depth exact per pass but hand the
    error of the deeper layers down undamped, so they need about one pass per BN depth. Both
    paths therefore anchor their eval passes from the second one on
    (:func:`anchored_statistics`), which damps the error by the batch-to-batch spread of each
    layer's response (the passes measured: README, "Measured figures behind the defaults").
    ``max_passes=None`` means one pass per BN layer plus one, the bound at which plain passes
    are exact whatever the graph.

    ``on_pass(number, max_passes)``, where given, is called before each pass (for progress
    reports; ``max_passes`` is None before the first eval-mode pass when it is the default).

    ``mix(moments) -> moments``, where given (a prior: :class:`bncal.calibration.SourcePrior`),
    turns every pass's moments into the statistics kept: the train-mode result is mixed, and
    every eval pass normalises with the mixed statistics of the pass before and is mixed in
    turn, so the fixed point reached is ``s = mix(T(s))``, ``T(s)`` being the moments of every
    BN's input when every BN normalises with ``s``. The change is measured between mixed
    statistics.

    Returns ``(moments, passes, converged, last_change)``.
    """
    if mode not in ("train", "eval"):
        raise ValueError(f"mode must be 'train' or 'eval', not {mode!r}")
    if on_pass is not None:
        on_pass(1, 1 if mode == "train" else max_passes)
    mix = mix or (lambda moments: moments)
    moments = mix(train_pass())
    passes, change = 1, 0.0
    if mode == "train":
        return moments, passes, True, change
    if max_passes is None:
        max_passes = len(moments) + 1
    change = float("inf")
    while passes < max_passes:
        if on_pass is not None:
            on_pass(passes + 1, max_passes)
        new = mix(eval_pass(moments))
        passes += 1
        change = max_relative_change(moments, new)
        moments = new
        if change <= tol:
            return moments, passes, True, change
    return moments, passes, False, change


def anchored_statistics(base_mean, base_var, batch_mean, batch_var, previous_mean, previous_var, eps):
    """Statistics for one BN on one batch of an anchored eval pass: ``base`` moved by how much
    this same batch's input moved since the previous pass.

    Between two eval passes the statistics of every upstream BN change, and a BN's input
    moves with them; that move is nearly the same for every batch (it comes from per-channel
    affine changes upstream), so the batch's own move estimates the population's to second
    order. Normalising each batch with ``base`` shifted by it makes a whole pass consistent
    with the statistics every earlier BN is being given in this very pass (Gauss-Seidel),
    instead of with last pass's (Jacobi, which hands errors one BN deeper per pass)::

        mean       = base_mean + (batch_mean - previous_mean)
        var + eps  = (base_var + eps) * (batch_var + eps) / (previous_var + eps)

    (``eps``, the BN's own, keeps a channel with zero variance well defined.) Works on numpy
    arrays and torch tensors alike (arithmetic only); the ONNX path builds the same formula
    as graph nodes (:func:`bncal.onnx.graphs.make_stats_graph` with ``anchored=True``).
    """
    mean = base_mean + (batch_mean - previous_mean)
    var = (base_var + eps) * (batch_var + eps) / (previous_var + eps) - eps
    return mean, var


def mix_with_source(source_mean, source_var, target: ChannelMoments, source_weight: float) -> ChannelMoments:
    """The target moments mixed with source statistics, as Schneider et al. 2020 mix them::

        mean = w * source_mean + (1 - w) * target_mean
        var  = w * source_var  + (1 - w) * target_var          (population variances)

    ``w = source_weight`` in [0, 1]. The variances mix linearly, as in the paper ("Improving
    robustness against common corruptions by covariate shift adaptation", section 3), not as
    the variance of the two populations pooled, which would add ``w (1 - w) (mean_source -
    mean_target)**2``: a shifted mean would then inflate the variance the prior leaves, and the
    published N would not carry over. Returns new moments with the target's ``count`` (the
    samples seen) whose ``mean`` and ``variance`` are the mixed ones; ``w = 0`` gives the
    target's values, ``w = 1`` the source's.
    """
    w = float(source_weight)
    if not 0.0 <= w <= 1.0:
        raise ValueError(f"source_weight must lie in [0, 1], not {w}")
    mean = w * np.asarray(source_mean, np.float64) + (1.0 - w) * target.mean
    var = w * np.asarray(source_var, np.float64) + (1.0 - w) * target.variance
    return ChannelMoments(target.count, mean, var * target.count)

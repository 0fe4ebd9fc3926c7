"""The recalibration policy every path shares (no torch, onnxruntime or Keras here).

Every path reduces its passes to per-BN :class:`~bncal.stats.ChannelMoments`, and the one driver
(:mod:`bncal.driver`) drives them with :func:`bncal.stats.fixed_point_passes`. The rules it and
the backends apply, the same whatever runs the model, live here, once:

- :func:`check_mode` and :func:`data_source`: the mode, and data that can be read as often as
  the mode needs (``eval`` reads it several times, so a one-shot iterator is refused);
- :class:`DataOrder`: anchored eval passes pair each batch with the same batch of the previous
  pass, which is only valid while the data comes in the same order; when it does not, the rest
  of the pass runs plain and the report says so;
- :class:`BatchComposition`: whether the batches look like random draws from the data; batches
  that each hold one class make train-mode statistics (and ``check``'s train-mode reference)
  depend on how the data was batched, and the reports then warn;
- :func:`require_finite`: statistics with NaN/Inf are never written;
- :class:`SourcePrior`: ``prior=N`` mixes the model's current (source) statistics into the new
  ones with weight ``N / (N + n)``, ``n`` the number of calibration samples;
- :func:`build_report`: the :class:`~bncal.report.RecalibrationReport` from each layer's
  statistics before, its new moments and its eps;
- :func:`batch_fingerprint`, :func:`one_value_error`, :func:`require_layers` and
  :data:`NONFINITE_DATA`: how a batch is recognised, and the refusals every path words alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import NamedTuple

import numpy as np

from .errors import BncalError
from .report import LayerRecalibration, LayerStats, RecalibrationReport, SkippedLayer, channel_shift, summarize_shift
from .stats import ChannelMoments, mix_with_source

__all__ = ["MODES", "check_mode", "data_source", "batch_fingerprint", "DataOrder", "BatchComposition", "Exchangeability", "order_warning",
           "require_finite", "SourcePrior", "source_prior", "LayerResult", "build_report", "NEVER_REACHED",
           "one_value_error", "require_layers"]

MODES = ("train", "eval")

#: The skip reason of a BN the calibration data never reached.
NEVER_REACHED = "never reached by the data: its statistics were left as they were"

#: The refusal of calibration or check data holding NaN or Inf.
NONFINITE_DATA = "the calibration data contains NaN or Inf values; clean or filter it first"

ONE_SHOT_REFUSAL = ("mode 'eval' passes over the data several times; give a list, a DataLoader or a function "
                    "returning a fresh iterable, not a one-shot iterator")


def check_mode(mode: str) -> None:
    """Refuse a mode other than ``"train"`` or ``"eval"`` with a one-line BncalError."""
    if mode not in MODES:
        raise BncalError(f"mode must be 'train' or 'eval', not {mode!r}")


def data_source(data, *, reread: bool) -> Callable[[], Iterable]:
    """A zero-argument callable returning one fresh pass over ``data``.

    ``data`` is an iterable of batches, or a zero-argument callable returning one (called once
    per pass). ``reread=True`` (mode ``eval``) refuses a one-shot iterator (a generator), which
    would be empty on the second pass. A single array or dict is refused too: iterating it
    would yield its rows or keys, not batches.
    """
    if isinstance(data, dict) or (hasattr(data, "shape") and hasattr(data, "dtype")):
        raise BncalError("the data must be an iterable of batches, not a single batch; wrap it in a list: [batch]")
    if callable(data) and not hasattr(data, "__iter__"):
        return data
    if not hasattr(data, "__iter__"):
        raise BncalError(f"the data must be an iterable of batches, got {type(data).__name__}")
    if reread and iter(data) is data:
        raise BncalError(ONE_SHOT_REFUSAL)
    return lambda: data


def batch_fingerprint(x) -> float:
    """The float64 sum of a batch's first floating input (a numpy array or a tensor; else its
    first input; None gives 0): how :class:`DataOrder` recognises the batch in a later pass."""
    if x is None:
        return 0.0
    if isinstance(x, np.ndarray):
        return float(np.sum(x, dtype=np.float64))
    if hasattr(x, "double"):  # a torch tensor, wherever it lives
        return float(x.detach().double().sum())
    return float(np.sum(np.asarray(x), dtype=np.float64))


class DataOrder:
    """Whether an anchored eval pass may pair each batch with the same batch of the previous pass.

    Anchoring (:func:`bncal.stats.anchored_statistics`) moves a batch's statistics by how far
    *that batch's* input moved since the previous pass, so it needs each batch at the same
    position in every pass. Each path identifies a batch by a fingerprint (the float64 sum of
    its first floating input). An eval pass anchors batch after batch while the fingerprints
    match those of the previous eval pass at the same positions; from the first mismatch (a
    shuffling loader) the rest of that pass runs plain, which is still a valid fixed-point
    pass, only slower to converge, and :attr:`notes` says so once.

    Use: :meth:`start_pass` before an eval pass, :meth:`anchored` for each batch in order,
    :meth:`end_pass` after it. The first eval pass is never anchored (no previous pass), and
    none is with ``anchoring=False`` (a prior, see :class:`SourcePrior`).
    """

    NOTE = ("the data came in a different order in each pass (a shuffling loader?), so eval mode fell back to "
            "plain passes, which need more of them; give the batches in a fixed order")

    def __init__(self, anchoring: bool = True):
        self._previous: list[float] | None = None
        self._current: list[float] = []
        self._anchoring = False
        self._allowed = anchoring
        self.notes: list[str] = []

    @property
    def has_previous(self) -> bool:
        """True once an eval pass has ended (the next one may be anchored)."""
        return self._previous is not None

    @property
    def may_anchor(self) -> bool:
        """True when the pass just started may anchor some batch (after :meth:`start_pass`)."""
        return self._anchoring

    def start_pass(self) -> None:
        self._current = []
        self._anchoring = self._allowed and self._previous is not None

    def anchored(self, index: int, fingerprint: float) -> bool:
        """Record batch ``index``'s fingerprint; True when this batch may be anchored."""
        self._current.append(fingerprint)
        if self._anchoring:
            previous = self._previous
            if index >= len(previous) or not math.isclose(previous[index], fingerprint, rel_tol=1e-9, abs_tol=1e-9):
                self._anchoring = False
                if self.NOTE not in self.notes:
                    self.notes.append(self.NOTE)
        return self._anchoring

    def end_pass(self) -> None:
        self._previous, self._current = self._current, []


class Exchangeability(NamedTuple):
    """The outcome of :meth:`BatchComposition.result`: the between-batch ``statistic`` (mean F
    ratio over channels), the ``limit`` it was held to, and the number of ``batches``."""

    statistic: float
    limit: float
    batches: int

    @property
    def exchangeable(self) -> bool:
        return self.statistic <= self.limit

    def describe(self) -> str:
        return (f"between-batch F = {self.statistic:.3g} over {self.batches} batches, limit {self.limit:.3g}; "
                "batches of one class each?")


class BatchComposition:
    """Do the batches look like random draws from the data (exchangeable)? A test on the model input.

    In train mode every BN normalises with its batch's statistics, so what a BN downstream sees
    depends on what the batches hold: batches that each hold one class (an ImageFolder read in
    path order, a class-sorted array, an unshuffled loader) give train-mode statistics, and a
    train-mode reference, that random batches would not. :meth:`add` each batch's first floating
    input ``x`` (numpy or torch, samples on axis 0, channels on axis 1); per sample, the mean of
    each channel over the remaining axes, ``s_ic``, is what is compared. Per channel ``c``, with
    ``B`` batches of ``n_b`` samples, ``N`` in all, batch means ``m_bc`` and overall mean ``M_c``::

        F_c = [sum_b n_b (m_bc - M_c)^2 / (B - 1)] / [sum_b sum_(i in b) (s_ic - m_bc)^2 / (N - B)]

    the one-way analysis-of-variance ratio: the spread of the batch means against what the
    within-batch spread predicts for batches drawn at random, for which ``F_c`` is about 1 with
    a standard deviation of about ``sqrt(2 / (B - 1) + 2 / (N - B))`` (an F distribution's);
    batches of one class give ``F_c ~ 1 + n_b * (between-class / within-class variance)``. The
    statistic is the mean of ``F_c`` over channels, and the batches count as far from random
    when it exceeds ``1 + SPREAD * sqrt(2 / (B - 1) + 2 / (N - B))``. Fewer than
    :attr:`MIN_BATCHES` batches, or batches of one sample, are not tested.

    Why the input and per-sample means: the within-batch variance of a BN's input over all its
    values mixes the spatial variation inside each image, so it would not predict the spread of
    batch means; and the first BN's per-sample channel means are (up to padding) an affine
    function of the input's when a convolution or linear layer precedes it, as in the usual
    networks. The input is what both the PyTorch and the ONNX paths hold, so they test the
    same numbers.

    The limit is calibrated by ``python tools/data_order_study.py --calibrate`` (the figures:
    README, "Measured figures behind the defaults").
    """

    MIN_BATCHES = 8
    SPREAD = 8.0

    def __init__(self):
        self._between: ChannelMoments | None = None
        self._within: np.ndarray | None = None
        self._batches = 0
        self._usable = True

    def add(self, x, channel_axis: int = 1) -> None:
        """Record one batch's input (an array of shape (n, C, ...) or (n,), channels on
        ``channel_axis``: -1 for channels-last layouts; integer inputs are ignored)."""
        if not self._usable or getattr(x, "ndim", 0) == 0 or x.shape[0] == 0:
            return
        floating = x.is_floating_point() if hasattr(x, "is_floating_point") else np.issubdtype(x.dtype, np.floating)
        if not floating:
            return
        n = int(x.shape[0])
        if x.ndim > 2 and channel_axis % x.ndim == x.ndim - 1:  # channels last: no transposed copy
            channels = int(x.shape[-1])
            rows = x.reshape(n, -1, channels)
            if isinstance(rows, np.ndarray) and rows.dtype in (np.float32, np.float64):  # 12x numpy's strided mean
                means = np.matmul(np.full((1, rows.shape[1]), 1.0 / rows.shape[1], rows.dtype), rows)[:, 0]
            else:
                means = rows.mean(1)  # per sample and channel
        else:
            if x.ndim > 2 and channel_axis % x.ndim != 1:
                x = x.movedim(channel_axis, 1) if hasattr(x, "movedim") else np.moveaxis(x, channel_axis, 1)
            channels = int(x.shape[1]) if x.ndim > 1 else 1
            means = x.reshape(n, channels, -1).mean(-1)
        if hasattr(means, "detach"):
            means = means.detach().cpu().numpy()
        means = np.asarray(means, np.float64)
        if self._between is None:
            self._between = ChannelMoments.empty(channels)
            self._within = np.zeros(channels)
        elif self._between.channels != channels:
            self._usable = False  # batches of different layouts: no common channels to compare
            return
        batch_mean = means.mean(axis=0)
        self._within += np.square(means - batch_mean).sum(axis=0)
        self._between.add_batch(n, batch_mean, np.zeros(channels))  # weighted batch means: M2 = sum n_b (m_b - M)^2
        self._batches += 1

    def result(self) -> Exchangeability | None:
        """The statistic and its limit; None when the batches cannot be tested (see the class docstring)."""
        b = self._batches
        if not self._usable or b < self.MIN_BATCHES:
            return None
        n = self._between.count
        if n - b < 1:
            return None  # batches of one sample: no within-batch spread
        between = self._between.m2 / (b - 1)
        within = self._within / (n - b)
        spread = between + within
        valid = spread > 0
        if not valid.any():
            return None  # a constant input
        ratio = between[valid] / np.maximum(within[valid], 1e-12 * spread[valid])
        limit = 1.0 + self.SPREAD * math.sqrt(2.0 / (b - 1) + 2.0 / (n - b))
        return Exchangeability(float(np.mean(ratio)), limit, b)


_ORDER_ADVICE = {
    "recalibrate": ("so train-mode statistics depend on how the data was batched; shuffle it (bncal shuffles "
                    ".npy/.npz/image folders unless --no-shuffle; shuffle your own loader), or use --mode eval "
                    "(library: mode='eval'), whose statistics do not depend on the batching"),
    "check": ("so train mode on them differs from inference whatever the moving statistics; shuffle the data "
              "(bncal shuffles .npy/.npz/image folders unless --no-shuffle; shuffle your own loader) and check again"),
}


def order_warning(composition: BatchComposition | None, use: str) -> str | None:
    """The warning for batches far from random draws (None when they look random, or cannot be
    tested), with the fix for ``use``: ``"recalibrate"`` or ``"check"``."""
    result = composition.result() if composition is not None else None
    if result is None or result.exchangeable:
        return None
    which = "the calibration batches" if use == "recalibrate" else "the check's batches"
    return f"{which} are far from random draws of the data ({result.describe()}), {_ORDER_ADVICE[use]}"


def require_finite(name: str, moments: ChannelMoments) -> None:
    """Refuse to write statistics with NaN/Inf (an overflow in the model), naming the BN."""
    if not (np.isfinite(moments.mean).all() and np.isfinite(moments.m2).all()):
        raise BncalError(f"BatchNorm {name} got non-finite statistics from the data "
                         "(an overflow in the model?); check the data's scale and the weights")


class SourcePrior:
    """``prior=N``: the new statistics are the exact target statistics mixed with the model's
    current (source) ones, Schneider et al. 2020's prior::

        mean = N/(N+n) mean_source + n/(N+n) mean_target,   the same for the variance

    (:func:`bncal.stats.mix_with_source` says how the variances mix, and why). ``N = 0`` is no
    prior: :func:`source_prior` then returns None and nothing is mixed.

    What ``n`` is: the number of calibration samples (rows of the model input, over every
    rank), the same for every BN, not the number of values per channel that the moments count
    (``n * H * W`` for a BatchNorm2d). The positions of one image are not independent draws of
    the target domain (the error of the statistics shrinks with the images, not the pixels),
    and counting values would make ``n`` 784 times larger after a 28x28 layer than after a
    1x1 head, so one ``N`` would weigh the source differently at every layer and could neither
    be chosen for a network nor carried over from the paper, whose ``n`` is the number of
    target images too.

    How it enters the passes (:func:`bncal.stats.fixed_point_passes`, argument ``mix``): a
    train-mode pass gathers the target moments with every BN normalising with its batch
    statistics, as without a prior, and the result is mixed. In eval mode every pass
    normalises with the mixed statistics of the pass before, and the PyTorch sweep loads the
    mixed statistics into each depth before the next runs, so the fixed point is that of a
    network whose every BN normalises with its mixed statistics: what the paper's adapted
    network computes on the ``n`` target samples as one batch. Eval passes then run plain
    (:class:`DataOrder` with ``anchoring=False``): an anchored pass moves a BN's statistics by
    the full move of its input within the pass, the mixed ones move by ``n/(N+n)`` of it.
    Plain passes are exact after one pass per BN depth with or without a prior: each pass
    makes one more depth exact, given the exact ones upstream.
    """

    def __init__(self, strength: float, source: dict[str, LayerStats]):
        self.strength = float(strength)
        self.source = source

    def source_weight(self, samples: int) -> float:
        """``N / (N + n)``: the weight of the source statistics after ``samples`` samples."""
        return self.strength / (self.strength + samples)

    def mix(self, moments: dict[str, ChannelMoments], samples: int) -> dict[str, ChannelMoments]:
        """Every layer's moments mixed with its source statistics (layers without moments are left out)."""
        w = self.source_weight(samples)
        return {name: mix_with_source(self.source[name].mean, self.source[name].var, m, w) if m.count else m
                for name, m in moments.items()}

    def note(self, samples: int) -> str:
        w = self.source_weight(samples)
        return (f"prior {self.strength:g}: the model's statistics weigh N/(N+n) = {w:.3g} against the data's "
                f"{1 - w:.3g} (n = {samples} samples)")


def source_prior(prior: float | None, source: dict[str, LayerStats]) -> SourcePrior | None:
    """The :class:`SourcePrior` of ``prior`` over the layers' current statistics ``source``
    (``{name: LayerStats}``), or None for no prior (``None`` or 0).

    Raises BncalError for a negative or non-finite prior, or a layer whose current statistics
    cannot be mixed (not finite, or none yet: a lazy BN before its first call).
    """
    try:
        strength = float(0 if prior is None else prior)
    except (TypeError, ValueError):
        strength = math.nan
    if not (math.isfinite(strength) and strength >= 0):
        raise BncalError(f"prior must be a finite number >= 0 (0: no prior), not {prior!r}")
    if strength == 0:
        return None
    for name, stats in source.items():
        if stats.mean.size == 0 or not (np.isfinite(stats.mean).all() and np.isfinite(stats.var).all()):
            raise BncalError(f"a prior mixes in the model's current statistics, but BatchNorm {name} has "
                             f"{'none yet' if stats.mean.size == 0 else 'non-finite ones'}; use prior 0")
    return SourcePrior(strength, source)


def one_value_error(index: int, fix: str, name: str | None = None, count: int = 1) -> BncalError:
    """The error for a train-mode batch giving a BN (``name`` where known) ``count`` value per
    channel, where batch statistics are undefined; the message ends with the caller's ``fix``."""
    which = f"BatchNorm {name}" if name else "a BatchNorm"
    values = "one value" if count == 1 else f"{count} values"
    return BncalError(f"batch {index} gives {which} only {values} per channel, so its batch statistics "
                      f"(train mode) are undefined; {fix}")


def require_layers(layers: list, skipped: list[SkippedLayer], what: str, hint: str = "") -> None:
    """Refuse a model with no BN to ``what`` ("recalibrate", "check"), naming the skipped ones and ``hint``."""
    if layers:
        return
    detail = f" ({'; '.join(f'{s.name}: {s.reason}' for s in skipped)})" if skipped else ""
    raise BncalError(f"the model has no BatchNorm layer with moving statistics to {what}{detail}{hint}")


class LayerResult(NamedTuple):
    """One recalibrated BN: its moving statistics before, the new moments, its eps, and how
    many times one forward calls it (the moments pool every call)."""

    name: str
    before: LayerStats
    moments: ChannelMoments
    eps: float
    calls_per_forward: int = 1


def build_report(*, mode: str, layers: Iterable[LayerResult], skipped: list[SkippedLayer], batches: int,
                 samples: int, passes: int, converged: bool, max_rel_change: float, notes: list[str],
                 warnings: list[str] = (), world_size: int = 1) -> RecalibrationReport:
    """The :class:`~bncal.report.RecalibrationReport` of a recalibration, layers in the order given.

    Each layer's ``after`` statistics are its moments' mean and population variance (what is
    written), ``mean_shift``/``var_ratio`` compare them with ``before``
    (:func:`bncal.report.summarize_shift`). A layer called more than once per forward gets a
    note after ``notes``.
    """
    entries, notes = [], list(notes)
    for layer in layers:
        m = layer.moments
        shift, ratio = summarize_shift(layer.before.mean, layer.before.var, m.mean, m.variance, layer.eps)
        per_channel = channel_shift(layer.before.mean, layer.before.var, m.mean, m.variance, layer.eps) or (None, None)
        entries.append(LayerRecalibration(
            name=layer.name, channels=m.channels, values_per_channel=m.count, calls_per_forward=layer.calls_per_forward,
            before=layer.before, after=LayerStats(m.mean.copy(), m.variance.copy()), mean_shift=shift,
            var_ratio=ratio, channel_mean_shift=per_channel[0], channel_var_ratio=per_channel[1]))
        if layer.calls_per_forward > 1:
            notes.append(f"{layer.name} is called {layer.calls_per_forward} times per forward: its statistics pool "
                         "the inputs of every call")
    return RecalibrationReport(mode=mode, batches=batches, samples=samples, passes=passes, converged=converged,
                               max_rel_change=max_rel_change, layers=entries, skipped=list(skipped),
                               world_size=world_size, notes=notes, warnings=list(warnings))

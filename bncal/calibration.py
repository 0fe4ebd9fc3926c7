"""The recalibration policy shared by the PyTorch and ONNX paths (no torch, no onnxruntime here).

Both :func:`bncal.recalibration.recalibrate` and :func:`bncal.onnx_recalibrate.recalibrate_onnx`
reduce their passes to per-BN :class:`~bncal.stats.ChannelMoments` and drive them with
:func:`bncal.stats.fixed_point_passes`. Everything around that which is the same whatever runs
the model lives here, once:

- :func:`check_mode` and :func:`data_source`: the mode, and data that can be read as often as
  the mode needs (``eval`` reads it several times, so a one-shot iterator is refused);
- :class:`DataOrder`: anchored eval passes pair each batch with the same batch of the previous
  pass, which is only valid while the data comes in the same order; when it does not, the rest
  of the pass runs plain and the report says so;
- :func:`require_finite`: statistics with NaN/Inf are never written;
- :func:`build_report`: the :class:`~bncal.report.RecalibrationReport` from each layer's
  statistics before, its new moments and its eps.

The Keras path (:mod:`bncal.keras.recalibration`) uses the same policy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import NamedTuple

import numpy as np

from .errors import BncalError
from .report import LayerRecalibration, LayerStats, RecalibrationReport, SkippedLayer, summarize_shift
from .stats import ChannelMoments

__all__ = ["MODES", "check_mode", "data_source", "DataOrder", "require_finite", "LayerResult", "build_report",
           "NEVER_REACHED"]

MODES = ("train", "eval")

#: The skip reason of a BN the calibration data never reached.
NEVER_REACHED = "never reached by the data: its statistics were left as they were"

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
    :meth:`end_pass` after it. The first eval pass is never anchored (no previous pass).
    """

    NOTE = ("the data came in a different order in each pass (a shuffling loader?), so eval mode fell back to "
            "plain passes, which need more of them; give the batches in a fixed order")

    def __init__(self):
        self._previous: list[float] | None = None
        self._current: list[float] = []
        self._anchoring = False
        self.notes: list[str] = []

    @property
    def has_previous(self) -> bool:
        """True once an eval pass has ended (the next one may be anchored)."""
        return self._previous is not None

    def start_pass(self) -> None:
        self._current = []
        self._anchoring = self._previous is not None

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


def require_finite(name: str, moments: ChannelMoments) -> None:
    """Refuse to write statistics with NaN/Inf (an overflow in the model), naming the BN."""
    if not (np.isfinite(moments.mean).all() and np.isfinite(moments.m2).all()):
        raise BncalError(f"BatchNorm {name} got non-finite statistics from the data "
                         "(an overflow in the model?); check the data's scale and the weights")


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
                 world_size: int = 1) -> RecalibrationReport:
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
        entries.append(LayerRecalibration(
            name=layer.name, channels=m.channels, samples=m.count, calls_per_forward=layer.calls_per_forward,
            before=layer.before, after=LayerStats(m.mean.copy(), m.variance.copy()), mean_shift=shift,
            var_ratio=ratio))
        if layer.calls_per_forward > 1:
            notes.append(f"{layer.name} is called {layer.calls_per_forward} times per forward: its statistics pool "
                         "the inputs of every call")
    return RecalibrationReport(mode=mode, batches=batches, samples=samples, passes=passes, converged=converged,
                               max_rel_change=max_rel_change, layers=entries, skipped=list(skipped),
                               world_size=world_size, notes=notes)

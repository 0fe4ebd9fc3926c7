"""Exact recalibration of the moving statistics of a Keras model's BatchNormalization layers.

The same definitions and the same core as the PyTorch and ONNX paths (:mod:`bncal.stats`):
per batch and per BN call, the layer's input is reduced to float64 ``(count, mean, biased
variance)`` per channel and merged with :class:`~bncal.stats.ChannelMoments` (every axis but
the layer's ``axis`` counts as samples, batches weigh by their size, so the result does not
depend on the batch split); the passes are driven by :func:`~bncal.stats.fixed_point_passes`.
How each BN's input is seen: :class:`bncal.keras._passes.BatchNormTap` (works for Sequential,
functional and subclassed models alike).

Keras conventions met here:

- ``moving_variance`` receives the population (biased) variance, the one Keras's
  BatchNormalization normalises with in training (``ops.moments``), as bncal stores it
  everywhere; Keras's own moving update averages the same biased batch variances.
- Keras's momentum (0.99 default, ``moving = momentum * moving + (1 - momentum) * batch``) is
  not used: the statistics are computed, not averaged. Momenta, weights and ``trainable``
  flags are left as they were.
- ``renorm=True`` layers: ``moving_mean``/``moving_variance`` are their inference statistics;
  ``moving_stddev`` is set to ``sqrt(variance + epsilon)``, from which Keras derives the
  moving variance at the next renorm training step. ``renorm_mean``/``renorm_stddev`` (the
  training-time references of the renorm correction) are left alone.
- ``synchronized=True`` layers are recalibrated like the others: this process sees every
  calibration sample, so there is nothing to synchronise.
- A layer with ``trainable=False`` is skipped: Keras runs a frozen BatchNormalization in
  inference mode even in training, so the rest of the network was trained against its moving
  statistics, which are therefore the right ones to keep.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np

from ..errors import BncalError
from ..report import LayerRecalibration, LayerStats, RecalibrationReport, SkippedLayer, summarize_shift
from ..stats import anchored_statistics, fixed_point_passes
from ._backend import import_keras
from ._passes import BatchNormTap, batch_pass, calibration_data, default_forward, run_forward
from .layers import batchnorm_layers, moving_statistics, require_model

__all__ = ["recalibrate", "FROZEN_REASON"]

FROZEN_REASON = ("trainable=False: Keras ran it in inference mode during training, so the network was trained "
                 "against its moving statistics; left as they were")


def recalibrate(
    model,
    data: Iterable | np.ndarray,
    *,
    mode: str = "train",
    batch_size: int | None = 32,
    forward_fn: Callable | None = None,
    max_samples: int | None = None,
    tol: float = 1e-5,
    max_passes: int | None = None,
    progress: bool | Callable[[int], None] = False,
) -> RecalibrationReport:
    """Recompute the moving statistics of every BatchNormalization in a Keras ``model``, in place.

    Args:
        model: a built ``keras.Model`` (Sequential, functional or subclassed). Only the BN
            layers' ``moving_mean``/``moving_variance`` (and a renorm layer's ``moving_stddev``)
            change; if the pass raises, they are put back too.
        data: an array (or a dict of arrays, one per named model input), cut into batches of
            ``batch_size`` rows; or an iterable of batches, each an input array or structure,
            or a Keras-style ``(x, y)`` / ``(x, y, sample_weight)`` tuple (``x`` is used). For
            ``mode="eval"`` the data is read several times: not a one-shot iterator.
        mode: ``"train"``: each BN normalises with its batch statistics during the pass, as in
            training (PreciseBN); the right choice when training goes on with these batch
            sizes. ``"eval"``: the statistics each BN sees when every BN uses its new ones, i.e.
            those of one train-mode forward of all the data as one batch; the right choice
            before deployment and for small batches. Reached by repeated passes until the
            largest relative change is at most ``tol``, or ``max_passes`` (default: one per BN
            plus one), see :func:`bncal.stats.fixed_point_passes`.
        batch_size: rows per batch when ``data`` is an array (Keras's default 32; larger is
            faster, and in ``train`` mode it is the batch the statistics are gathered over).
        forward_fn: ``forward_fn(model, inputs)``; default ``model(inputs, training=False)``.
        max_samples: stop after this many samples per pass (the last batch is cut to fit).
        progress: True for a tqdm bar on stderr, or a callable given the batches done.

    Returns the :class:`~bncal.report.RecalibrationReport` of the PyTorch and ONNX paths.

    Raises:
        BncalError: not a built Keras model, no BN to recalibrate, empty or non-finite data, a
            train-mode batch with one value per channel, a forward that fails on the data, or
            non-finite statistics.
    """
    import_keras()
    if mode not in ("train", "eval"):
        raise BncalError(f"mode must be 'train' or 'eval', not {mode!r}")
    require_model(model)
    data = calibration_data(data, batch_size, reiterable=(mode == "eval"))
    skipped, layers = [], []
    for name, bn in batchnorm_layers(model):
        (skipped.append(SkippedLayer(name, FROZEN_REASON)) if not bn.trainable else layers.append((name, bn)))
    if not layers:
        detail = f" ({'; '.join(f'{s.name}: {s.reason}' for s in skipped)})" if skipped else ""
        raise BncalError(f"the model has no BatchNormalization layer to recalibrate{detail}")

    before = {name: moving_statistics(bn) for name, bn in layers}
    run = _Run(model, layers, data, forward_fn or default_forward, max_samples, progress, one_value_ok=(mode == "eval"))
    moments, passes, converged, change = fixed_point_passes(
        run.train_pass, run.eval_pass, mode=mode, tol=tol, max_passes=max_passes)
    for name, m in moments.items():
        if not (np.isfinite(m.mean).all() and np.isfinite(m.m2).all()):
            raise BncalError(f"BatchNormalization {name} got non-finite statistics from the data "
                             "(an overflow in the model?); check the data's scale and the weights")

    entries, notes = [], list(run.notes)
    for name, bn in layers:
        m = moments.get(name)
        if m is None or m.count == 0:
            skipped.append(SkippedLayer(name, "never reached by the data: its statistics were left as they were"))
            continue
        _write(bn, m.mean, m.variance)
        calls = run.calls_per_forward.get(name, 0)
        if calls > 1:
            notes.append(f"{name} is called {calls} times per forward: its statistics pool the inputs of every call")
        old = before[name]
        shift, ratio = summarize_shift(old.mean, old.var, m.mean, m.variance, bn.epsilon)
        entries.append(LayerRecalibration(
            name=name, channels=m.channels, samples=m.count, calls_per_forward=calls, before=old,
            after=LayerStats(m.mean.copy(), m.variance.copy()), mean_shift=shift, var_ratio=ratio))
    return RecalibrationReport(mode=mode, batches=run.batches, samples=run.samples, passes=passes,
                               converged=converged, max_rel_change=change, layers=entries, skipped=skipped,
                               notes=notes)


def _write(bn, mean, variance) -> None:
    keras = import_keras()
    bn.moving_mean.assign(keras.ops.cast(mean, bn.moving_mean.dtype))
    bn.moving_variance.assign(keras.ops.cast(variance, bn.moving_variance.dtype))
    if getattr(bn, "renorm", False):
        bn.moving_stddev.assign(keras.ops.cast(np.sqrt(variance + bn.epsilon), bn.moving_stddev.dtype))


class _Run:
    """The passes of one recalibration over ``data``."""

    def __init__(self, model, layers, data, forward_fn, max_samples, progress, one_value_ok):
        self.model, self.layers, self.data = model, layers, data
        self.one_value_ok = one_value_ok  # eval mode only starts from the train pass: any start will do
        self.forward_fn, self.max_samples, self.progress = forward_fn, max_samples, progress
        self.eps = {name: bn.epsilon for name, bn in layers}
        self.calls_per_forward: dict[str, int] = {}
        self.batches = self.samples = 0
        self.notes: list[str] = []
        # Anchored eval passes pair each BN call with the same call of the previous eval pass.
        self.previous: tuple[dict, list] | None = None

    def train_pass(self):
        def batch_statistics(name, call, count, mean, var):
            if count < 2 and not self.one_value_ok:
                raise BncalError(f"a batch gives BatchNormalization {name} only {count} value per channel, so its "
                                 "batch statistics are undefined in mode 'train'; use batches of 2 or more samples, "
                                 "or mode 'eval'")
            return mean, var
        return self._pass(batch_statistics)[0]

    def eval_pass(self, stats):
        """Moments of every BN input with every BN normalising with ``stats``; anchored
        (:func:`bncal.stats.anchored_statistics`) from the second eval pass on, while the
        batches come in the order of the previous pass."""
        base = {name: (m.mean, m.variance) for name, m in stats.items() if m.count}
        previous = self.previous
        state = {"anchored": previous is not None}

        def given(name, call, count, mean, var):
            if name not in base:
                return None
            base_mean, base_var = base[name]
            if state["anchored"]:
                calls = previous[0].get(name, [])
                if call < len(calls):
                    _, previous_mean, previous_var = calls[call]
                    return anchored_statistics(base_mean, base_var, mean, var, previous_mean, previous_var,
                                               self.eps[name])
            return base_mean, base_var

        def check_order(index, fingerprint):
            if state["anchored"] and (index >= len(previous[1]) or not _same(previous[1][index], fingerprint)):
                state["anchored"] = False
                note = ("the data came in a different order in each pass (a shuffling loader?), so eval mode fell "
                        "back to plain passes, which need more of them; give the batches in a fixed order")
                if note not in self.notes:
                    self.notes.append(note)

        moments, records, fingerprints = self._pass(given, check_order)
        self.previous = (records, fingerprints)
        return moments

    def _pass(self, statistics, before_batch=None):
        current = batch_pass(self.data, max_samples=self.max_samples, progress=self.progress)
        fingerprints = []
        with BatchNormTap(self.layers, statistics) as tap:
            for index, (inputs, fingerprint) in current:
                if before_batch is not None:
                    before_batch(index, fingerprint)
                fingerprints.append(fingerprint)
                counts = {name: len(calls) for name, calls in tap.records.items()}
                run_forward(self.forward_fn, self.model, inputs, index)
                for name, calls in tap.records.items():
                    n = len(calls) - counts[name]
                    self.calls_per_forward[name] = max(self.calls_per_forward.get(name, 0), n)
        self.batches, self.samples = current.batches, current.samples
        return tap.moments(), {name: list(calls) for name, calls in tap.records.items()}, fingerprints


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)

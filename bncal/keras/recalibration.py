"""Exact recalibration of the moving statistics of a Keras model's BatchNormalization layers.

The same definitions and the same core as the PyTorch and ONNX paths (:mod:`bncal.stats`):
per batch and per BN call, the layer's input is reduced to float64 ``(count, mean, biased
variance)`` per channel and merged with :class:`~bncal.stats.ChannelMoments` (every axis but
the layer's ``axis`` counts as samples, batches weigh by their size, so the result does not
depend on the batch split); the passes are driven by :func:`~bncal.stats.fixed_point_passes`.
How each BN's input is seen: one traced forward per batch with the moments as extra outputs
(:mod:`bncal.keras.compiled`), and for eval mode on functional and Sequential models the
depth-by-depth sweep (:mod:`bncal.keras.sweep`); where those do not apply (the report notes why
in eval mode), :class:`bncal.keras._passes.BatchNormTap`, which calls the model eagerly.

Keras conventions met here:

- ``moving_variance`` receives the population (biased) variance, the one Keras's
  BatchNormalization normalises with in training (``ops.moments``), as bncal stores it
  everywhere; Keras's own moving update averages the same biased batch variances.
- Keras's momentum (0.99 default, ``moving = momentum * moving + (1 - momentum) * batch``) is
  not used: the statistics are computed, not averaged. Momenta, weights and ``trainable``
  flags are left as they were.
- ``renorm=True`` layers: their training forward normalised with the renorm averages
  (``renorm_mean``/``renorm_stddev``) wherever r and d were not clipped (:mod:`bncal.renorm`), so
  every pass runs that forward, and ``moving_mean``/``moving_variance`` receive the statistics
  that reproduce it on the population (the renorm averages where unclipped); ``moving_stddev``
  is set to ``sqrt(variance + epsilon)``, from which Keras derives the moving variance at the
  next renorm training step. ``renorm_mean``/``renorm_stddev`` are left alone.
- ``synchronized=True`` layers are recalibrated like the others: this process sees every
  calibration sample, so there is nothing to synchronise.
- A layer with ``trainable=False`` is skipped: Keras runs a frozen BatchNormalization in
  inference mode even in training, so the rest of the network was trained against its moving
  statistics, which are therefore the right ones to keep.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from .._progress import PassClock
from ..calibration import (NEVER_REACHED, BatchComposition, DataOrder, LayerResult, build_report, check_mode,
                           order_warning, require_finite, source_prior)
from ..errors import BncalError
from ..report import RecalibrationReport, SkippedLayer
from ..stats import anchored_statistics, fixed_point_passes
from ._backend import import_keras
from ._passes import BatchNormTap, batch_pass, calibration_data, default_forward, run_forward
from .compiled import (CompiledRefused, compiled_forward, compiled_refusal, merge_calls, run_compiled_pass,
                       statistics_put_back)
from ..renorm import renorm_notes
from .layers import batchnorm_layers, moving_statistics, renorm_reference, require_model

__all__ = ["recalibrate", "FROZEN_REASON"]

FROZEN_REASON = ("trainable=False: Keras ran it in inference mode during training, so the network was trained "
                 "against its moving statistics; left as they were")


def recalibrate(
    model,
    data: Iterable | np.ndarray,
    *,
    mode: str = "train",
    prior: float = 0,
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
            or a Keras-style ``(x, y)`` / ``(x, y, sample_weight)`` tuple (``x`` is used); or a
            zero-argument function returning such an iterable (called once per pass). For
            ``mode="eval"`` the data is read several times: not a one-shot iterator.
        mode: ``"train"``: each BN normalises with its batch statistics during the pass, as in
            training (PreciseBN); the right choice when training goes on with these batch
            sizes. ``"eval"``: the statistics each BN sees when every BN uses its new ones, i.e.
            those of one train-mode forward of all the data as one batch; the right choice
            before deployment and for small batches. Solved depth by depth for functional and
            Sequential models (:mod:`bncal.keras.sweep`) and confirmed by one eval pass; else
            reached by repeated passes until the largest relative change is at most ``tol``, or
            ``max_passes`` (default: one per BN plus one), see
            :func:`bncal.stats.fixed_point_passes`.
        prior: ``N``: mix the layers' current moving statistics into the new ones with weight
            ``N / (N + n)``, ``n`` the number of calibration samples, as
            :func:`bncal.recalibrate` does (:class:`bncal.calibration.SourcePrior`); 0: no prior.
        batch_size: rows per batch when ``data`` is an array (Keras's default 32; larger is
            faster, and in ``train`` mode it is the batch the statistics are gathered over).
        forward_fn: ``forward_fn(model, inputs)``; default ``model(inputs, training=False)``.
        max_samples: stop after this many samples per pass (the last batch is cut to fit).
        progress: True for a tqdm bar on stderr, or a callable given the batches done.

    The mode, the re-readable data, the data order of anchored eval passes, the refusal of
    non-finite statistics and the report are the policy every path shares
    (:mod:`bncal.calibration`).

    Returns the :class:`~bncal.report.RecalibrationReport` of the PyTorch and ONNX paths.

    Raises:
        BncalError: not a built Keras model, no BN to recalibrate, empty or non-finite data, a
            train-mode batch with one value per channel, a forward that fails on the data, or
            non-finite statistics.
    """
    import_keras()
    check_mode(mode)
    require_model(model)
    source = calibration_data(data, batch_size, reiterable=(mode == "eval"))
    skipped, layers = [], []
    for name, bn in batchnorm_layers(model):
        (skipped.append(SkippedLayer(name, FROZEN_REASON)) if not bn.trainable else layers.append((name, bn)))
    if not layers:
        detail = f" ({'; '.join(f'{s.name}: {s.reason}' for s in skipped)})" if skipped else ""
        raise BncalError(f"the model has no BatchNormalization layer to recalibrate{detail}")

    before = {name: moving_statistics(bn) for name, bn in layers}
    references = {name: renorm_reference(bn) for name, bn in layers if renorm_reference(bn) is not None}
    mixing = source_prior(prior, before)
    run = _Run(model, layers, source, forward_fn or default_forward, max_samples, progress,
               one_value_ok=(mode == "eval"), references=references)
    run.eager_reason = compiled_refusal(layers, custom_forward=forward_fn is not None, renorm=bool(references))
    run.order = DataOrder(anchoring=mixing is None)
    run.composition = BatchComposition() if mode == "train" else None
    first_pass = run.train_pass if mode == "train" else _sweep_or_train_pass(run, mixing)
    moments, passes, converged, change = fixed_point_passes(
        first_pass, run.eval_pass, mode=mode, tol=tol, max_passes=max_passes, on_pass=run.announce,
        mix=mixing and (lambda found: mixing.mix(found, run.samples)))
    for name, m in moments.items():
        require_finite(name, m)

    results = []
    for name, bn in layers:
        m = moments.get(name)
        if m is None or m.count == 0:
            skipped.append(SkippedLayer(name, NEVER_REACHED))
            continue
        written = references[name].training_moments(m) if name in references else m
        _write(bn, written.mean, written.variance)
        results.append(LayerResult(name, before[name], written, bn.epsilon, run.calls_per_forward.get(name, 0)))
    notes = run.order.notes + renorm_notes([(name, reference, moments[name]) for name, reference in references.items()
                                            if name in moments], "recalibrate")
    warning = order_warning(run.composition, "recalibrate")
    return build_report(mode=mode, layers=results, skipped=skipped, batches=run.batches, samples=run.samples,
                        passes=passes, converged=converged, max_rel_change=change,
                        notes=notes + ([mixing.note(run.samples)] if mixing else []),
                        warnings=[warning] if warning else [])


def _sweep_or_train_pass(run, mixing):
    """The first pass of eval mode: the depth-by-depth sweep's statistics (:mod:`bncal.keras.sweep`)
    where it applies, else the train pass; the report's notes say which and why."""
    reason = run.eager_reason or ("batch renormalisation layers are not modelled by it" if run.references else None)
    if reason is None:
        from .sweep import solve_eval_statistics

        sweep = solve_eval_statistics(run.model, run.layers, run.source, max_samples=run.max_samples,
                                      progress=run.progress, mix=mixing and mixing.mix)
        if sweep.moments is not None:
            run.batches, run.samples = sweep.batches, sweep.samples
            run.eval_forward = sweep.forward  # the confirming pass runs the sweep's own traced steps
            run.order.notes.append(f"eval mode: exact depth-by-depth sweep ({sweep.forward_equivalents:.2f} "
                                   f"forward-equivalents, {sweep.cached_bytes_peak / 2**20:.0f} MiB cached), then "
                                   "one eval pass to confirm")
            return lambda: sweep.moments
        reason = sweep.refusal
    run.order.notes.append(f"eval mode ran repeated passes: the depth-by-depth sweep does not apply ({reason})")
    return run.train_pass


def _write(bn, mean, variance) -> None:
    keras = import_keras()
    dtype = lambda variable: keras.backend.standardize_dtype(variable.dtype)  # cast in numpy: one op less
    bn.moving_mean.assign(np.asarray(mean, dtype(bn.moving_mean)))
    bn.moving_variance.assign(np.asarray(variance, dtype(bn.moving_variance)))
    if getattr(bn, "renorm", False):
        bn.moving_stddev.assign(keras.ops.cast(np.sqrt(variance + bn.epsilon), bn.moving_stddev.dtype))


def _one_value_error(name, count) -> BncalError:
    return BncalError(f"a batch gives BatchNormalization {name} only {count} value per channel, so its batch "
                      "statistics are undefined in mode 'train'; use batches of 2 or more samples, or mode 'eval'")


class _Run:
    """The passes of one recalibration over ``source()``."""

    def __init__(self, model, layers, source, forward_fn, max_samples, progress, one_value_ok, references):
        self.model, self.layers, self.source = model, layers, source
        self.references = references  # renorm layers: every pass runs their training forward
        self.one_value_ok = one_value_ok  # eval mode only starts from the train pass: any start will do
        self.forward_fn, self.max_samples, self.progress = forward_fn, max_samples, progress
        self.eps = {name: bn.epsilon for name, bn in layers}
        self.calls_per_forward: dict[str, int] = {}
        self.batches = self.samples = 0
        self.order = DataOrder()
        # Anchored eval passes pair each BN call with the same call of the previous eval pass.
        self.previous: dict[str, list] = {}
        self.clock, self.label = PassClock(), None
        self.composition: BatchComposition | None = None  # train mode: are the batches random draws?
        self.eval_forward = None  # after a sweep: its steps chained, for the plain eval passes
        self.eager_reason: str | None = "not asked"  # why the passes run eagerly (None: compiled, bncal.keras.compiled)

    def announce(self, number: int, max_passes: int | None) -> None:
        self.label = self.clock.label(number, max_passes)

    def train_pass(self):
        def batch_statistics(name, call, count, mean, var):
            if count < 2 and not self.one_value_ok:
                raise _one_value_error(name, count)
            return self._training_forward(name, mean, var)
        return self._pass(batch_statistics, normalisation="batch")[0]

    def _training_forward(self, name, mean, var):
        """The statistics layer ``name`` normalises with on data of ``(mean, var)``: those, or a
        renorm layer's training statistics (:mod:`bncal.renorm`)."""
        reference = self.references.get(name)
        return (mean, var) if reference is None else reference.training_statistics(mean, var)

    def eval_pass(self, stats):
        """Moments of every BN input with every BN normalising with ``stats``; anchored
        (:func:`bncal.stats.anchored_statistics`) from the second eval pass on, batch by batch
        while :class:`~bncal.calibration.DataOrder` says the batches come in the previous order."""
        base = {name: (m.mean, m.variance) for name, m in stats.items() if m.count}
        previous, state = self.previous, {"anchored": False, "first": {}}

        def given(name, call, count, mean, var):
            if name not in base:
                return None
            base_mean, base_var = base[name]
            calls = previous.get(name, [])
            if state["anchored"] and call < len(calls):
                _, previous_mean, previous_var = calls[call]
                base_mean, base_var = anchored_statistics(base_mean, base_var, mean, var, previous_mean, previous_var,
                                                          self.eps[name])
            return self._training_forward(name, base_mean, base_var)

        def before_batch(index, fingerprint):
            state["anchored"] = self.order.anchored(index, fingerprint)

        self.order.start_pass()
        moments, records = self._pass(given, before_batch,  # a pass that anchors no batch may run compiled
                                      normalisation=None if self.order.may_anchor else "moving", written=base)
        self.order.end_pass()
        self.previous = records
        return moments

    def _pass(self, statistics, before_batch=None, normalisation=None, written=None):
        composition = self.composition if before_batch is None else None  # train passes: batches as drawn
        current = batch_pass(self.source, max_samples=self.max_samples, progress=self.progress,
                             total=self.batches or None, description=self.label,  # the previous pass's count
                             composition=composition)
        if normalisation is not None and self.eager_reason is None:
            try:
                return self._compiled_pass(current, normalisation, before_batch, written or {})
            except CompiledRefused as exc:  # found while tracing the first batch: no moments kept yet
                self.eager_reason = str(exc)
                current = batch_pass(self.source, max_samples=self.max_samples, progress=self.progress,
                                     total=self.batches or None, description=self.label, composition=composition)
        with BatchNormTap(self.layers, statistics) as tap:
            for index, (inputs, fingerprint) in current:
                if before_batch is not None:
                    before_batch(index, fingerprint)
                counts = {name: len(calls) for name, calls in tap.records.items()}
                run_forward(self.forward_fn, self.model, inputs, index)
                for name, calls in tap.records.items():
                    n = len(calls) - counts[name]
                    self.calls_per_forward[name] = max(self.calls_per_forward.get(name, 0), n)
        self.batches, self.samples = current.batches, current.samples
        return tap.moments(), {name: list(calls) for name, calls in tap.records.items()}

    def _compiled_pass(self, current, normalisation, before_batch, written):
        """:meth:`_pass` through one compiled forward per batch (:mod:`bncal.keras.compiled`); the
        BNs normalise with ``written`` (``{name: (mean, var)}``, put back afterwards), with their
        current moving statistics where it has none, or with their batch statistics."""
        def after_batch(found):
            for name, calls in found.items():
                self.calls_per_forward[name] = max(self.calls_per_forward.get(name, 0), len(calls))
                if normalisation == "batch" and not self.one_value_ok and any(count < 2 for count, _, _ in calls):
                    raise _one_value_error(name, min(count for count, _, _ in calls))

        forward = self.eval_forward if normalisation == "moving" and self.eval_forward else \
            compiled_forward(self.model, self.layers, normalisation)
        run_batch = lambda fn, inputs, index: run_forward(fn, self.model, inputs, index)
        with statistics_put_back([bn for name, bn in self.layers if name in written]):
            for name, bn in self.layers:
                if name in written:
                    _write(bn, *written[name])
            records = run_compiled_pass(forward, current, run_batch, before_batch, after_batch)
        self.batches, self.samples = current.batches, current.samples
        return merge_calls(records), records

"""Exact recalibration of the moving statistics of a Keras model's BatchNormalization layers.

The same definitions and the same core as the PyTorch and ONNX paths (:mod:`bncal.stats`):
per batch and per BN call, the layer's input is reduced to float64 ``(count, mean, biased
variance)`` per channel and merged with :class:`~bncal.stats.ChannelMoments` (every axis but
the layer's ``axis`` counts as samples, batches weigh by their size, so the result does not
depend on the batch split); the passes, their policy and the report are every path's
(:func:`bncal.driver.run_recalibration`), this module is the Keras backend.
How each BN's input is seen: one traced forward per batch with the moments as extra outputs
(:mod:`bncal.keras.compiled`), and for eval mode on functional and Sequential models the
depth-by-depth sweep (:mod:`bncal.keras.sweep`); where those do not apply (the report notes why
in eval mode), :class:`bncal.keras.passes.BatchNormTap`, which calls the model eagerly.

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

import contextlib
from collections.abc import Callable, Iterable

import numpy as np

from ..calibration import check_mode, one_value_error
from ..driver import EvalSolution, RecalibrationBackend, run_recalibration
from ..report import RecalibrationReport
from ..stats import anchored_statistics
from .backend import import_keras
from .compiled import CompiledRefused, compiled_forward, compiled_refusal
from .passes import BatchNormTap, calibration_data, default_forward, merge_calls, prepare_batch, run_forward
from .layers import assign_values, require_model, statistics_put_back, statistics_variables, trainable_batchnorms

__all__ = ["recalibrate", "EVAL_CHUNK_BYTES"]

# Eval-mode batches of array data: up to 16 MiB of input (341 images of 64x64x3 in float32, 27 of
# 224x224x3); why: README, "Measured figures behind the defaults".
EVAL_CHUNK_BYTES = 16 * 2**20


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
            faster, and in ``train`` mode it is the batch the statistics are gathered over). In
            ``eval`` mode, whose statistics do not depend on the batching, arrays are read in
            equal batches of up to :data:`EVAL_CHUNK_BYTES` of input where those hold more rows.
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
    eval_mode = mode == "eval"
    source = calibration_data(data, batch_size, reiterable=eval_mode,
                              chunk_bytes=EVAL_CHUNK_BYTES if eval_mode else None)
    return run_recalibration(KerasRecalibration(model, forward_fn, one_value_ok=eval_mode), source, mode=mode,
                             prior=prior, tol=tol, max_passes=max_passes, max_samples=max_samples, progress=progress)


def _write(statistics) -> None:
    """Each ``(bn, mean, variance)`` of ``statistics`` into the BN's variables, all in one go (a
    renorm layer's moving stddev too)."""
    variables, values = [], []
    for bn, mean, variance in statistics:
        targets = statistics_variables(bn)
        variables += targets
        values += [mean, variance, np.sqrt(variance + bn.epsilon)][:len(targets)]
    assign_values(variables, values)


class KerasRecalibration(RecalibrationBackend):
    """The Keras part of a recalibration (:func:`bncal.driver.run_recalibration`).

    A pass runs one compiled forward per batch (:mod:`bncal.keras.compiled`: the BN inputs'
    moments as extra outputs; the BNs normalising with their batch statistics in a train pass,
    with the given statistics in an eval pass that anchors no batch). Where that does not apply
    (a custom ``forward_fn``, renorm layers, tf_keras layers, anchored eval passes) each pass runs
    inside a :class:`~bncal.keras.passes.BatchNormTap`, which calls the model eagerly and feeds each
    BN call its statistics (the batch's own, or a renorm layer's training statistics, in train
    passes; the given ones, anchored where the driver says so, in eval passes). Eval mode starts
    from the depth-by-depth sweep (:mod:`bncal.keras.sweep`) where it applies.
    """

    channel_axis = -1  # Keras lays channels last
    solves_eval = True

    def __init__(self, model, forward_fn, *, one_value_ok: bool):
        self.model, self.forward_fn = model, forward_fn or default_forward
        self.modules, self.layers, self.skipped = trainable_batchnorms(model, "recalibrate")
        self.by_name = {layer.name: layer for layer in self.layers}
        self.one_value_ok = one_value_ok  # eval mode only starts from the train pass: any start will do
        self.notes: list[str] = []
        self.calls_per_forward: dict[str, int] = {}
        self.previous: dict[str, list] = {}  # each BN call of the previous eval pass, for anchoring
        # Why the passes run eagerly (None: through one compiled forward per batch).
        self.eager_reason = compiled_refusal(self.modules, custom_forward=forward_fn is not None,
                                             renorm=any(layer.reference is not None for layer in self.layers))
        self.eval_forward = None  # after a sweep: its steps chained, for the plain eval passes
        self.tap = self.compiled = self.base = None
        self.records: dict[str, list] = {}
        self.put_back = None
        self.index, self.anchored, self.eval_pass = 0, False, False

    def prepare(self, batch, index, remaining):
        return prepare_batch(batch, remaining)

    @contextlib.contextmanager
    def prepared(self):
        try:
            yield self
        finally:
            self._close_pass()  # a pass that raised: its statistics are put back

    def _close_pass(self):
        if self.tap is not None:
            self.tap.__exit__(None, None, None)
        if self.put_back is not None:
            self.put_back.__exit__(None, None, None)
        self.tap = self.put_back = self.compiled = None

    def _training_forward(self, name, mean, var):
        reference = self.by_name[name].reference
        return (mean, var) if reference is None else reference.training_statistics(mean, var)

    def _batch_statistics(self, name, call, count, mean, var):
        if count < 2 and not self.one_value_ok:
            raise one_value_error(self.index, "use batches of 2 or more samples, or mode 'eval'", name, count)
        return self._training_forward(name, mean, var)

    def _given_statistics(self, name, call, count, mean, var):
        if name not in self.base:
            return None
        base_mean, base_var = self.base[name]
        calls = self.previous.get(name, [])
        if self.anchored and call < len(calls):
            _, previous_mean, previous_var = calls[call]
            base_mean, base_var = anchored_statistics(base_mean, base_var, mean, var, previous_mean, previous_var,
                                                      self.by_name[name].eps)
        return self._training_forward(name, base_mean, base_var)

    def start_pass(self, statistics, may_anchor=False) -> None:
        self.eval_pass = statistics is not None
        self.base = {name: (m.mean, m.variance) for name, m in (statistics or {}).items() if m.count}
        self.records = {name: [] for name, _ in self.modules}
        if self.eager_reason is None and not may_anchor:
            self._start_compiled()
        else:
            self._start_eager()

    def _start_compiled(self):
        if self.eval_pass:  # the BNs normalise with the given statistics, put back after the pass
            self.compiled = self.eval_forward or compiled_forward(self.model, self.modules, "moving")
            self.put_back = statistics_put_back([bn for name, bn in self.modules if name in self.base])
            self.put_back.__enter__()
            _write((bn, *self.base[name]) for name, bn in self.modules if name in self.base)
        else:
            self.compiled = compiled_forward(self.model, self.modules, "batch")

    def _start_eager(self):
        self.tap = BatchNormTap(self.modules, self._given_statistics if self.eval_pass else self._batch_statistics)
        self.tap.__enter__()

    def run_batch(self, inputs, index, anchored) -> None:
        self.index, self.anchored = index, anchored
        if self.compiled is not None:
            try:
                found = run_forward(lambda model, batch: self.compiled(batch), self.model, inputs, index)
            except CompiledRefused as exc:  # found while tracing the first batch: nothing recorded yet
                if any(self.records.values()):
                    raise
                self.eager_reason = str(exc)
                self.eval_forward = None
                if self.put_back is not None:
                    self.put_back.__exit__(None, None, None)
                    self.put_back = None
                self.compiled = None
                self._start_eager()
                return self.run_batch(inputs, index, anchored)
            for name, calls in found.items():
                self.calls_per_forward[name] = max(self.calls_per_forward.get(name, 0), len(calls))
                too_few = [count for count, _, _ in calls if count < 2]
                if too_few and not self.eval_pass and not self.one_value_ok:
                    raise one_value_error(index, "use batches of 2 or more samples, or mode 'eval'", name,
                                          min(too_few))
                self.records[name].extend(calls)
            return
        counts = {name: len(calls) for name, calls in self.tap.records.items()}
        run_forward(self.forward_fn, self.model, inputs, index)
        for name, calls in self.tap.records.items():
            self.calls_per_forward[name] = max(self.calls_per_forward.get(name, 0), len(calls) - counts[name])

    def end_pass(self):
        if self.tap is not None:
            self.records = {name: list(calls) for name, calls in self.tap.records.items()}
        self._close_pass()
        if self.eval_pass:
            self.previous = self.records
        return merge_calls(self.records)

    def solve_eval(self, source, *, max_samples, progress, prior) -> EvalSolution:
        if self.eager_reason is not None:
            return EvalSolution(None, self.eager_reason)
        from .sweep import solve_eval_statistics

        sweep = solve_eval_statistics(self.model, self.modules, source, max_samples=max_samples, progress=progress,
                                      mix=prior and prior.mix)
        self.eval_forward = sweep.forward  # the confirming pass runs the sweep's own traced steps
        return sweep

    def write(self, statistics, batches) -> None:
        _write((bn, statistics[name].mean, statistics[name].variance)
               for name, bn in self.modules if name in statistics)

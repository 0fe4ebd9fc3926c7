"""One recalibration driver and one check driver for every framework (no torch, onnxruntime or Keras here).

A recalibration and a check do the same things whatever runs the model: read the data in
passes (progress, ``max_samples``, the batch fingerprint, the batch-composition test), drive
the passes to the statistics the mode asks for (:func:`bncal.stats.fixed_point_passes`), merge
across ranks, refuse non-finite statistics, treat batch renormalisation layers as their training
forward (:mod:`bncal.renorm`), and build the report with its notes and warnings. That policy is
written here once, in :func:`run_recalibration` and :func:`run_check`. What depends on the
framework (how a BN's input is seen and its statistics replaced, how batches are validated and
moved, how statistics are written) is a backend's:

- :class:`RecalibrationBackend`: :mod:`bncal.torch.recalibration` (PyTorch),
  :mod:`bncal.onnx.recalibration` (onnxruntime), :mod:`bncal.keras.recalibration` (Keras),
  :mod:`bncal.tf1` (TensorFlow 1 graphs);
- :class:`CheckBackend`: :mod:`bncal.torch.check`, :mod:`bncal.onnx.check`, :mod:`bncal.keras.checking`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable

import numpy as np

from .progress import DataPass, PassClock
from .calibration import (NEVER_REACHED, BatchComposition, DataOrder, LayerResult, batch_fingerprint, build_report,
                          check_mode, data_source, order_warning, require_finite, source_prior)
from .checking import (BatchSizeProbe, BatchSpread, CheckReport, CheckThresholds, PairedOutputs, assess_layer,
                       split_batch)
from .data import leading_size
from .errors import BncalError
from .guard import finish_step, guarded_step
from .renorm import renorm_notes
from .report import LayerStats, RecalibrationReport, SkippedLayer
from .stats import ChannelMoments, fixed_point_passes

__all__ = ["BNLayer", "EvalSolution", "RecalibrationBackend", "CheckBackend", "run_recalibration", "run_check"]

#: The skip reason of a BN the check's data never reached.
NOT_REACHED_BY_CHECK = "never reached by the data: nothing to compare with"


@dataclasses.dataclass
class BNLayer:
    """One BN a run handles: its name, eps, the moving statistics it holds now (float64; empty
    arrays where it has none yet), and its renorm reference (:mod:`bncal.renorm`) or None."""

    name: str
    eps: float
    moving: LayerStats
    reference: object = None

    @property
    def channels(self) -> int | None:
        return self.moving.mean.shape[0] or None

    def trained_with(self, moments: ChannelMoments) -> ChannelMoments:
        """The statistics this BN's training forward normalises with on data of ``moments``:
        those moments, or a renorm layer's training statistics on them."""
        return moments if self.reference is None else self.reference.training_moments(moments)


def require_sample_limit(max_samples: int | None) -> None:
    """Refuse a ``max_samples`` below 1 (None: no limit)."""
    if max_samples is not None and max_samples < 1:
        raise BncalError(f"max_samples must be at least 1, not {max_samples}")


@dataclasses.dataclass
class EvalSolution:
    """What a backend's direct eval-mode solver (a depth-by-depth sweep) found: the moments of
    every BN input (before any prior mixing), with the data's batches and samples, the work in
    forward-equivalents (units of one plain forward over the same data), the BN depths and the
    peak bytes it cached; or ``moments`` None and the ``refusal`` saying why it did not apply.
    Each framework's sweep returns a subclass with its own details."""

    moments: dict | None = None
    refusal: str | None = None
    batches: int = 0
    samples: int = 0
    forward_equivalents: float = 0.0
    depths: int = 0
    cached_bytes_peak: int = 0

    def note(self) -> str:
        """The report's note on how eval mode was solved."""
        if self.moments is None:
            return f"eval mode ran repeated passes: the depth-by-depth sweep does not apply ({self.refusal})"
        return (f"eval mode: exact depth-by-depth sweep ({self.forward_equivalents:.2f} forward-equivalents, "
                f"{self.cached_bytes_peak / 2**20:.0f} MiB cached), then one eval pass to confirm")


class RecalibrationBackend:
    """A framework's part of a recalibration; :func:`run_recalibration` drives it.

    Attributes set by the backend: ``layers`` (:class:`BNLayer`, in model order), ``skipped``,
    ``model`` (what the accuracy guard scores before), ``channel_axis`` of the inputs (for the
    batch-composition test), ``notes``, and ``calls_per_forward`` (per BN, the most calls one
    forward made, kept up to date by :meth:`run_batch`).
    """

    layers: list[BNLayer]
    skipped: list[SkippedLayer]
    model: object = None
    channel_axis: int = 1
    #: Whether :meth:`solve_eval` can solve eval mode directly.
    solves_eval: bool = False
    #: Whether eval passes may anchor a batch on the previous pass (:func:`bncal.stats.anchored_statistics`).
    anchors: bool = True

    def prepare(self, batch, index: int, remaining: int | None):
        """``((inputs, first input), samples)`` for one user batch: validated, cut to ``remaining``
        samples, placed where the model runs; the first floating input (else the first input) as
        given, for the fingerprint and the composition test."""
        raise NotImplementedError

    def prepared(self):
        """A context in which the model is ready for passes, put back as it was after (its
        statistics too when the block raises)."""
        return contextlib.nullcontext()

    def start_pass(self, statistics: dict[str, ChannelMoments] | None, may_anchor: bool = False) -> None:
        """Begin a pass: train mode (``statistics`` None: every BN on its batch statistics) or an
        eval pass (every BN normalising with ``statistics``; a BN not in it keeps its own).
        ``may_anchor``: whether :meth:`run_batch` may be asked to anchor a batch in this pass."""
        raise NotImplementedError

    def run_batch(self, inputs, index: int, anchored: bool) -> None:
        """One forward of the pass; ``anchored``: an eval pass may anchor this batch on the same
        batch of the previous eval pass (:func:`bncal.stats.anchored_statistics`)."""
        raise NotImplementedError

    def end_pass(self) -> dict[str, ChannelMoments]:
        """This process's moments of every BN input the pass reached."""
        raise NotImplementedError

    def solve_eval(self, source: Callable, *, max_samples, progress, prior) -> EvalSolution:
        """Eval mode solved directly (only where :attr:`solves_eval`); ``prior`` the
        :class:`~bncal.calibration.SourcePrior` each solved depth is mixed with, or None."""
        raise NotImplementedError

    def write(self, statistics: dict[str, ChannelMoments], batches: int) -> None:
        """Store ``statistics`` (those of the BNs the data reached); ``batches`` over all ranks."""
        raise NotImplementedError

    def result(self):
        """The recalibrated model (what the guard scores after)."""
        return self.model

    def restore(self) -> None:
        """Put back the statistics :meth:`write` replaced (a failed guard), where the model was changed in place."""


class _Passes:
    """The data passes of one recalibration: the loop every backend's passes share."""

    def __init__(self, backend: RecalibrationBackend, source, *, mode: str, max_samples, progress, group,
                 anchoring: bool):
        self.backend, self.source, self.max_samples, self.progress, self.group = (
            backend, source, max_samples, progress, group)
        self.order = DataOrder(anchoring=anchoring)
        self.composition = BatchComposition() if mode == "train" else None  # train mode: random draws?
        self.clock, self.label = PassClock(), None
        self.batches = self.samples = self.local_batches = 0

    def announce(self, number: int, max_passes: int | None) -> None:
        self.label = self.clock.label(number, max_passes)

    def train_pass(self) -> dict[str, ChannelMoments]:
        return self._pass(None)

    def eval_pass(self, statistics: dict[str, ChannelMoments]) -> dict[str, ChannelMoments]:
        self.order.start_pass()
        moments = self._pass(statistics)
        self.order.end_pass()
        return moments

    def _pass(self, statistics) -> dict[str, ChannelMoments]:
        backend, eval_pass = self.backend, statistics is not None
        backend.start_pass(statistics, may_anchor=eval_pass and self.order.may_anchor)
        current = DataPass(self.source(), backend.prepare, max_samples=self.max_samples, progress=self.progress,
                           description=self.label, total=self.local_batches or None)  # the previous pass's count
        for index, (inputs, first) in current:
            if eval_pass:
                anchored = self.order.anchored(index, batch_fingerprint(first))
            else:
                anchored = False
                if self.composition is not None:
                    self.composition.add(first, channel_axis=backend.channel_axis)
            backend.run_batch(inputs, index, anchored)
        self.local_batches = current.batches
        moments = backend.end_pass()
        self.batches, self.samples = current.batches, current.samples
        if self.group is not None:
            from .distributed import combine_across_ranks

            channels = {layer.name: layer.channels for layer in backend.layers if layer.channels}
            moments, self.batches, self.samples = combine_across_ranks(moments, channels, self.batches,
                                                                       self.samples, self.group)
        return moments

    def first_eval_pass(self, prior):
        """The first pass of eval mode: the backend's direct solution where it has one and it
        applies, else the train pass."""
        backend = self.backend
        if not backend.solves_eval:
            return self.train_pass
        if self.group is not None:
            self.order.notes.append("eval mode ran repeated passes: the depth-by-depth sweep does not combine "
                                    "ranks yet")
            return self.train_pass
        if any(layer.reference is not None for layer in backend.layers):
            self.order.notes.append("eval mode ran repeated passes: the depth-by-depth sweep does not model batch "
                                    "renormalisation layers")
            return self.train_pass
        solution = backend.solve_eval(self.source, max_samples=self.max_samples, progress=self.progress, prior=prior)
        self.order.notes.append(solution.note())
        if solution.moments is None:
            return self.train_pass
        self.batches, self.samples = solution.batches, solution.samples
        return lambda: solution.moments


def run_recalibration(backend: RecalibrationBackend, data, *, mode: str = "train", prior: float = 0,
                      tol: float = 1e-5, max_passes: int | None = None, max_samples: int | None = None,
                      progress=False, group=None, guard=None, metric=None, guard_tol: float | None = None,
                      notes: Iterable[str] = ()) -> RecalibrationReport:
    """Recalibrate the BNs of ``backend`` from ``data``; the contract is :func:`bncal.recalibrate`'s.

    ``data`` is an iterable of batches or a function returning one (read once per pass; a
    one-shot iterator is refused in eval mode). ``group``: an active process group (see
    :func:`bncal.distributed.active_process_group`) or None. ``notes`` go to the report first.
    """
    check_mode(mode)
    require_sample_limit(max_samples)
    source = data_source(data, reread=(mode == "eval"))
    layers = {layer.name: layer for layer in backend.layers}
    before = {name: layer.moving for name, layer in layers.items()}
    mixing = source_prior(prior, before)
    guard_report = guarded_step(backend.model, guard, metric, guard_tol)
    passes = _Passes(backend, source, mode=mode, max_samples=max_samples, progress=progress, group=group,
                     anchoring=mixing is None and backend.anchors)
    with backend.prepared():
        first_pass = passes.first_eval_pass(mixing) if mode == "eval" else passes.train_pass
        moments, count, converged, change = fixed_point_passes(
            first_pass, passes.eval_pass, mode=mode, tol=tol, max_passes=max_passes, on_pass=passes.announce,
            mix=mixing and (lambda found: mixing.mix(found, passes.samples)))
        reached = {name: m for name, m in moments.items() if name in layers and m.count}
        for name, m in reached.items():
            require_finite(name, m)
        written = {name: layers[name].trained_with(m) for name, m in reached.items()}
        backend.write(written, passes.batches)
    skipped = list(backend.skipped) + [SkippedLayer(name, NEVER_REACHED) for name in layers if name not in reached]
    results = [LayerResult(name, before[name], written[name], layer.eps, backend.calls_per_forward.get(name, 0))
               for name, layer in layers.items() if name in reached]
    renorm = renorm_notes([(name, layer.reference, reached[name]) for name, layer in layers.items()
                           if layer.reference is not None and name in reached], "recalibrate")
    warning = order_warning(passes.composition, "recalibrate")
    from .distributed import world_size

    report = build_report(mode=mode, layers=results, skipped=skipped, batches=passes.batches, samples=passes.samples,
                          passes=count, converged=converged, max_rel_change=change,
                          notes=[*notes, *passes.order.notes, *backend.notes, *renorm,
                                 *([mixing.note(passes.samples)] if mixing else [])],
                          warnings=[warning] if warning else [], world_size=world_size(group))
    finish_step(guard_report, backend.result(), report, restore=backend.restore)
    return report


class CheckBackend:
    """A framework's part of a check; :func:`run_check` drives it.

    Attributes set by the backend: ``layers`` (:class:`BNLayer` with the moving statistics
    judged), ``skipped``, ``unchecked`` (BNs that could not be checked, e.g. lowered ones),
    ``channel_axis``, ``notes``, and ``joinable`` (whether two batches may run joined as one,
    for :class:`bncal.checking.BatchSizeProbe`: not for a graph with a fixed batch size).
    """

    layers: list[BNLayer]
    skipped: list[SkippedLayer]
    unchecked: list[SkippedLayer] = ()
    channel_axis: int = 1
    joinable: bool = True

    def prepare(self, batch, index: int, remaining: int | None):
        """As :meth:`RecalibrationBackend.prepare`."""
        raise NotImplementedError

    def checking(self):
        """A context in which the model is ready (every non-BN module in inference mode), put back after."""
        return contextlib.nullcontext()

    def output_names(self, count: int) -> list[str]:
        """The names of the model's ``count`` outputs."""
        return ["output"] if count == 1 else [f"output_{i}" for i in range(count)]

    def arrays(self, inputs):
        """``inputs`` as numpy arrays (the same structure), for re-batching and joining."""
        return inputs

    def infer(self, inputs, index: int) -> list[np.ndarray]:
        """The model's outputs in inference mode (every BN on its moving statistics)."""
        raise NotImplementedError

    def train(self, inputs, index: int) -> tuple[list[np.ndarray], dict[str, ChannelMoments]]:
        """The outputs with every BN normalising as in training (batch statistics, or a renorm
        layer's training statistics), and each BN input's moments on this batch. ``inputs`` as
        :meth:`prepare` gives them or as :meth:`arrays` does. The moving statistics are left as they were."""
        raise NotImplementedError


def run_check(backend: CheckBackend, data, *, thresholds: CheckThresholds = CheckThresholds(),
              max_samples: int | None = None, progress=False) -> CheckReport:
    """Compare the backend's moving BN statistics and inference outputs with train mode on ``data``.

    One pass over ``data`` (a one-shot iterator is fine). Per batch: inference and train mode;
    each BN input's moments merged over all batches and judged against the moving statistics
    (:func:`bncal.checking.assess_layer`; a renorm layer against its training forward on the
    population); each output judged against train mode on a second batching of the same
    samples (:class:`bncal.checking.PairedOutputs`); and, where batches can be joined, train
    mode at twice the batch size (:class:`bncal.checking.BatchSizeProbe`), which tells a batch
    too small from wrong statistics. The standard errors of each layer's population statistics
    come from the spread of its batch statistics (:class:`bncal.checking.BatchSpread`); data of a
    single batch (4 samples or more, a graph that takes any batch size) is run once more as its
    two halves, which give both that spread and the outputs' second batching. Batches far from random draws are
    named in the warnings.
    """
    layers = backend.layers
    require_sample_limit(max_samples)
    source = data_source(data, reread=False)
    moments = {layer.name: ChannelMoments.empty(layer.channels) for layer in layers}
    spreads = {layer.name: BatchSpread() for layer in layers}
    composition = BatchComposition()
    fresh = lambda: {layer.name: ChannelMoments.empty(layer.channels) for layer in layers}

    def train_outputs(inputs, index):
        return backend.train(inputs, index)[0]

    def train_into(inputs, index, into):
        outputs, found = backend.train(inputs, index)
        for name, m in found.items():
            into[name].merge(m)
        return outputs

    paired = probe = only_batch = None
    current = DataPass(source(), backend.prepare, max_samples=max_samples, progress=progress)
    with backend.checking():
        for index, (inputs, first_input) in current:
            composition.add(first_input, channel_axis=backend.channel_axis)
            inferred = backend.infer(inputs, index)
            trained, found = backend.train(inputs, index)
            for name, m in found.items():
                moments[name].merge(m)
                spreads[name].add(m.mean, m.variance, m.count)
            if paired is None:
                names = backend.output_names(len(inferred))
                paired = PairedOutputs(names, train_outputs)
                probe = BatchSizeProbe(fresh, names, train_into) if backend.joinable else None
            batch = backend.arrays(inputs)
            only_batch = batch if index == 0 else None
            paired.add(index, batch, inferred, trained)
            if probe is not None:
                probe.add(index, batch, inferred, trained, found)
        if only_batch is not None and backend.joinable and (leading_size(only_batch) or 0) >= 4:
            # One batch shows neither a spread of its statistics nor a second batching of its outputs;
            # its two halves, each run once in train mode, give both.
            halves = [backend.train(half, 0) for half in split_batch(only_batch)]
            spreads = {layer.name: BatchSpread() for layer in layers}
            for _, found in halves:
                for name, m in found.items():
                    spreads[name].add(m.mean, m.variance, m.count)
            paired.add_halves([outputs for outputs, _ in halves])
    checks, skipped = [], list(backend.skipped)
    for layer in layers:
        m = moments[layer.name]
        if m.count == 0:
            skipped.append(SkippedLayer(layer.name, NOT_REACHED_BY_CHECK))
            continue
        check = assess_layer(layer.name, m.channels, layer.moving.mean, layer.moving.var, layer.trained_with(m),
                             layer.eps, thresholds, spreads[layer.name])
        if not check.passed and probe is not None and layer.reference is None:
            check.needed_batch = probe.needed_batch_for_layer(check, layer.moving.mean, layer.moving.var, layer.eps,
                                                              thresholds)
        checks.append(check)
    outputs = paired.checks(thresholds) if paired is not None else []
    for output in outputs:
        if not output.passed and probe is not None:
            output.needed_batch = probe.needed_batch_for_output(output, thresholds)
    report = CheckReport.from_checks(checks, outputs, skipped, thresholds, current.batches, current.samples,
                                     list(backend.unchecked), batching_warning=order_warning(composition, "check"))
    report.notes += renorm_notes([(layer.name, layer.reference, moments[layer.name]) for layer in layers
                                  if layer.reference is not None and moments[layer.name].count], "check")
    return report

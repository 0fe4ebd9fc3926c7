"""Recalibrate the BatchNorm statistics of an ONNX model with onnxruntime alone (no PyTorch).

The same definitions as :func:`bncal.recalibration.recalibrate`, on the same core
(:mod:`bncal.stats`): per batch, every BN contributes its input's ``(count, mean, biased
variance)`` to a :class:`~bncal.stats.ChannelMoments`, and the passes are driven by
:func:`~bncal.stats.fixed_point_passes`.

- ``train`` mode runs the train graph of :func:`bncal.onnx_graphs.make_train_graph`, where
  every BN normalises with its batch statistics (PreciseBN); on the CPU the statistics come
  out of the training-mode BN ops themselves, so the pass costs about one forward plus the
  BN work inference fuses away.
- ``eval`` mode starts from the train-mode result and runs the stats graph of
  :func:`bncal.onnx_graphs.make_stats_graph`, fed each pass with the statistics of the previous
  one (anchored from the second eval pass on while the data comes in the same order, see
  :class:`bncal.calibration.DataOrder`), until they stop changing: every BN then holds the
  statistics of its input when every BN uses its new statistics, i.e. those of one train-mode
  forward of all the data as one batch.

The policy around the passes (mode, data that can be re-read, data order, non-finite
statistics, the report) is :mod:`bncal.calibration`'s, shared with the PyTorch path; running
the graphs is :mod:`bncal.runtime`'s, which also picks how the derived graphs compute batch
statistics for the execution providers (:func:`bncal.runtime.statistics_form`).

Across processes (``process_group``, or a torchrun launch whose group is initialised), each
rank runs onnxruntime on its own shard and the moments are combined after every pass by
:func:`bncal.distributed.combine_across_ranks`, the merge the PyTorch path uses; torch is
imported only then. Eval passes anchor each rank's batches on that rank's previous pass.

Only the moving-statistics initializers of the output model differ from the input model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ._progress import PassClock
from .calibration import (BatchComposition, DataOrder, LayerResult, build_report, check_mode, order_warning,
                          require_finite, source_prior)
from .data import select_inputs
from .distributed import active_process_group, combine_across_ranks, world_size
from .errors import BncalError
from .guard import finish_step, guarded_step
from .fold_export import fixed_batch_size
from .onnx_graphs import write_statistics
from .onnx_view import find_batchnorms
from .onnx_lowered import find_lowered_normalisations, no_batchnorm_hint
from .report import LayerStats, RecalibrationReport, SkippedLayer
from .runtime import BatchStatistics, BatchStream, StatisticsSession, first_floating, input_specs
from .stats import ChannelMoments, fixed_point_passes

__all__ = ["recalibrate_onnx"]


def recalibrate_onnx(
    model: onnx.ModelProto,
    batches: Iterable | Callable[[], Iterable],
    *,
    mode: str = "train",
    prior: float = 0,
    tol: float = 1e-5,
    max_passes: int | None = None,
    max_samples: int | None = None,
    providers: list | None = None,
    progress: bool | Callable[[int], None] = False,
    inputs=None,
    process_group=None,
    guard=None,
    metric=None,
    guard_tol: float | None = None,
) -> tuple[onnx.ModelProto, RecalibrationReport]:
    """Recompute the moving mean and variance of every BatchNorm in ``model`` from ``batches``.

    Args:
        model: an inference ONNX model (not modified). Its statistics must be initializers
            loaded in memory (``onnx.load`` does that).
        batches: the calibration data, streamed one batch at a time. Each batch is a
            ``{input name: numpy array}`` dict naming every graph input (any order), a tuple
            or list of arrays in graph-input order, or a bare array for a single-input model;
            the first axis counts samples. For ``mode="eval"`` the data is
            read several times, so give a re-iterable (a list, :class:`bncal.data.ArrayBatches`)
            or a zero-argument callable returning a fresh iterable; a one-shot iterator
            (a generator) is refused.
        mode: ``"train"`` (each BN normalises with its batch statistics during the pass, the
            PreciseBN definition) or ``"eval"`` (the inference-consistent fixed point, reached
            within ``tol``, see :func:`bncal.stats.fixed_point_passes`, in at most
            ``max_passes`` passes). In ``eval`` mode a batch may give a BN one value per
            channel (batch size 1 before a BatchNorm1d); in ``train`` mode that is an error.
        prior: ``N``: mix the model's current statistics into the new ones with weight
            ``N / (N + n)``, ``n`` the number of calibration samples, as
            :func:`bncal.recalibrate` does (:class:`bncal.calibration.SourcePrior`); 0: no prior.
        max_samples: use at most this many samples per pass (the last batch is cut to fit).
        providers: onnxruntime execution providers in order of preference, as names or
            ``(name, options)`` pairs, CPU appended last (default: CPU only). With a non-CPU
            provider first the derived graphs compute batch statistics with plain arithmetic
            ops, which every provider implements (:func:`bncal.runtime.statistics_form`).
        progress: True for a tqdm bar, or a callable given the number of batches done in the
            current pass after each batch.
        inputs: the model inputs to pick out of each batch (:func:`bncal.data.select_inputs`),
            e.g. ``0`` for ``(inputs, labels)`` batches.
        process_group: a ``torch.distributed`` group. When the default group is initialised
            and has more than one rank (or a group is given), each rank passes its own shard
            of the data and the moments are combined across ranks after every pass, so every
            rank ends with the statistics one process would compute over the union of the
            shards (to float64 rounding), and the same report; let one rank write the model.
        guard, metric, guard_tol: the accuracy guard, as for :func:`bncal.recalibrate`: the new
            model scored in onnxruntime against ``model``; if it got worse,
            :class:`bncal.errors.DeploymentError` is raised (``exc.report`` the report).

    Returns:
        ``(new_model, report)``: a copy of ``model`` in which only the initializers holding
        BN moving statistics changed (same dtype and shape; the stored variance is the
        population, biased, variance), and a :class:`~bncal.report.RecalibrationReport`.
        Statistics tensors shared between nodes (the TorchScript exporter deduplicates equal
        initializers) are un-shared first, see :func:`bncal.onnx_graphs.write_statistics`;
        the report's notes list each such change. In train mode the report warns
        (``report.warnings``) when the batches are far from random draws of the data
        (:class:`bncal.calibration.BatchComposition`).

    Raises:
        BncalError: no BN to recalibrate, empty data, data not matching the graph inputs
            (names, dtypes, fixed dimensions), NaN/Inf in the data or the statistics, a
            train-mode batch with one value per channel, a one-shot iterator in eval mode.
    """
    check_mode(mode)
    if not isinstance(model, onnx.ModelProto):
        raise BncalError(f"expected an onnx.ModelProto, got {type(model).__name__}; load the file with onnx.load first")
    infos = find_batchnorms(model)
    handled = [info for info in infos if info.handled]
    skipped = [SkippedLayer(info.name, info.skip_reason) for info in infos if not info.handled]
    if not handled:
        detail = f" ({'; '.join(f'{s.name}: {s.reason}' for s in skipped)})" if skipped else ""
        raise BncalError(f"the model has no inference BatchNormalization whose statistics bncal can update{detail}"
                         f"{no_batchnorm_hint(model, 'recalibrated')}")
    skipped += [SkippedLayer(l.name, f"{l.describe()}: {l.reason}" if l.frozen else
                             f"{l.describe()}: {l.reason}, its statistics folded into constants (lowered "
                             "to arithmetic by the converter), left as they are; bncal inspect: BN060")
                for l in find_lowered_normalisations(model)]
    guard_report = guarded_step(model, guard, metric, guard_tol)
    initializers = {init.name: init for init in model.graph.initializer}
    before = {info.name: LayerStats(_values(initializers[info.mean_initializer]),
                                    _values(initializers[info.var_initializer])) for info in handled}
    mixing = source_prior(prior, before)
    stream = BatchStream(model, select_inputs(batches, inputs), reread=(mode == "eval"), max_samples=max_samples,
                         progress=progress)
    run = _Passes(model, stream, providers, mode, active_process_group(process_group), handled)
    run.order = DataOrder(anchoring=mixing is None)
    moments, passes, converged, change = fixed_point_passes(
        run.train_pass, run.eval_pass, mode=mode, tol=tol, max_passes=max_passes, on_pass=run.announce,
        mix=mixing and (lambda found: mixing.mix(found, run.samples)))
    for info in handled:
        require_finite(info.name, moments[info.name])
    new_model, write_notes = write_statistics(model, {info.name: (moments[info.name].mean, moments[info.name].variance)
                                                      for info in handled})
    layers = [LayerResult(info.name, before[info.name], moments[info.name], info.epsilon) for info in handled]
    warning = order_warning(run.composition, "recalibrate")
    report = build_report(mode=mode, layers=layers, skipped=skipped, batches=run.batches, samples=run.samples,
                          passes=passes, converged=converged, max_rel_change=change,
                          notes=run.order.notes + write_notes + ([mixing.note(run.samples)] if mixing else []),
                          warnings=[warning] if warning else [],
                          world_size=world_size(run.group))
    finish_step(guard_report, new_model, report)
    return new_model, report


class _Passes:
    """The passes of one recalibration over ``stream``, each on its derived graph's session.

    The train pass runs :func:`~bncal.onnx_graphs.make_train_graph`'s graph. An eval pass runs
    :func:`~bncal.onnx_graphs.make_stats_graph`'s, fed the current statistics; batch by batch
    while :class:`~bncal.calibration.DataOrder` allows, its anchored form, fed as well each
    BN's statistics of the same batch in the previous eval pass (Gauss-Seidel, see
    :func:`bncal.stats.anchored_statistics`). Sessions are built on first use. With a process
    ``group`` every pass ends with :func:`~bncal.distributed.combine_across_ranks`; ``batches``
    and ``samples`` then count every rank's.
    """

    def __init__(self, model: onnx.ModelProto, stream: BatchStream, providers, mode: str, group, handled):
        self.model, self.stream, self.providers, self.group = model, stream, providers, group
        self.channels = {info.name: info.channels for info in handled}
        self.single_value_fix = None
        if mode == "train":
            fixed_at_one = fixed_batch_size(input_specs(model)) == 1
            self.single_value_fix = ("the model's batch size is fixed at 1: use mode 'eval' (exact at any batch size)"
                                     if fixed_at_one else "use batches of 2 or more samples, or mode 'eval'")
        self.order = DataOrder()
        self.previous: list[dict[str, BatchStatistics]] = []  # per batch of this rank's last eval pass
        self.sessions: dict[str, StatisticsSession] = {}
        self.batches = self.samples = 0
        self.composition = BatchComposition() if mode == "train" else None
        self.clock = PassClock()

    def announce(self, number: int, max_passes: int | None) -> None:
        self.stream.description = self.clock.label(number, max_passes)

    def session(self, kind: str) -> StatisticsSession:
        """``kind``: ``"train"``, ``"plain"`` or ``"anchored"``."""
        if kind not in self.sessions:
            if kind == "train":
                session = StatisticsSession.train_graph(self.model, providers=self.providers)
            else:
                session = StatisticsSession.stats_graph(self.model, anchored=(kind == "anchored"),
                                                        providers=self.providers)
            self.sessions[kind] = session
        return self.sessions[kind]

    def _combined(self, moments: dict[str, ChannelMoments]) -> dict[str, ChannelMoments]:
        self.batches, self.samples = self.stream.batches, self.stream.samples
        if self.group is None:
            return moments
        moments, self.batches, self.samples = combine_across_ranks(moments, self.channels, self.batches,
                                                                   self.samples, self.group)
        return moments

    def train_pass(self) -> dict[str, ChannelMoments]:
        session = self.session("train")
        moments = session.new_moments()
        for index, feeds in self.stream:
            session.collect(feeds, index, moments, single_value_fix=self.single_value_fix)
            if self.composition is not None:
                self.composition.add(first_floating(feeds))
        return self._combined(moments.layers)

    def eval_pass(self, current: dict[str, ChannelMoments]) -> dict[str, ChannelMoments]:
        moments, records, fed = None, [], {}
        self.order.start_pass()
        for index, feeds in self.stream:
            kind = "anchored" if self.order.anchored(index, float(np.sum(first_floating(feeds), dtype=np.float64))) \
                else "plain"
            session = self.session(kind)
            if moments is None:  # the plain and anchored graphs list the same BNs, in the same order
                moments = session.new_moments()
            if kind not in fed:  # the current statistics, as the stats graph's inputs
                fed[kind] = {name: value for info in session.infos for name, value in (
                    (info.mean_feed, current[info.name].mean.astype(_stats_dtype(self.model, info))),
                    (info.var_feed, current[info.name].variance.astype(_stats_dtype(self.model, info))))}
            extra = dict(fed[kind])
            if kind == "anchored":
                for info in session.infos:
                    previous = self.previous[index][info.name]
                    extra[info.previous_mean_feed], extra[info.previous_var_feed] = previous.mean, previous.var
            _, found = session.collect({**feeds, **extra}, index, moments)
            records.append(found)
        self.order.end_pass()
        self.previous = records
        return self._combined(moments.layers if moments is not None else {})




def _stats_dtype(model, info) -> np.dtype:
    for init in model.graph.initializer:
        if init.name == info.mean_initializer:
            return np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type))
    raise KeyError(info.mean_initializer)


def _values(initializer: onnx.TensorProto) -> np.ndarray:
    return numpy_helper.to_array(initializer).astype(np.float64).reshape(-1)


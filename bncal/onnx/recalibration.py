"""Recalibrate the BatchNorm statistics of an ONNX model with onnxruntime alone (no PyTorch).

The same definitions as :func:`bncal.torch.recalibration.recalibrate`, on the same core
(:mod:`bncal.stats`): per batch, every BN contributes its input's ``(count, mean, biased
variance)`` to a :class:`~bncal.stats.ChannelMoments`, and the passes are driven by
:func:`~bncal.stats.fixed_point_passes`.

- ``train`` mode runs the train graph of :func:`bncal.onnx.graphs.make_train_graph`, where
  every BN normalises with its batch statistics (PreciseBN); on the CPU the statistics come
  out of the training-mode BN ops themselves, so the pass costs about one forward plus the
  BN work inference fuses away.
- ``eval`` mode starts from the train-mode result and runs the stats graph of
  :func:`bncal.onnx.graphs.make_stats_graph`, fed each pass with the statistics of the previous
  one (anchored from the second eval pass on while the data comes in the same order, see
  :class:`bncal.calibration.DataOrder`), until they stop changing: every BN then holds the
  statistics of its input when every BN uses its new statistics, i.e. those of one train-mode
  forward of all the data as one batch.

The policy around the passes (mode, data that can be re-read, data order, non-finite
statistics, the report) is :mod:`bncal.calibration`'s, shared with the PyTorch path; running
the graphs is :mod:`bncal.onnx.runtime`'s, which also picks how the derived graphs compute batch
statistics for the execution providers (:func:`bncal.onnx.runtime.statistics_form`).

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

from ..calibration import check_mode
from ..data import select_inputs
from ..distributed import active_process_group
from ..driver import BNLayer, RecalibrationBackend, run_recalibration
from ..errors import BncalError
from .graphs import write_statistics
from .view import find_batchnorms
from .lowered import find_lowered_normalisations, no_batchnorm_hint
from ..report import LayerStats, RecalibrationReport, SkippedLayer
from .runtime import (BatchStatistics, StatisticsSession, first_floating, fixed_batch_size, input_specs,
                      validated_feeds)

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
            ops, which every provider implements (:func:`bncal.onnx.runtime.statistics_form`).
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
        initializers) are un-shared first, see :func:`bncal.onnx.graphs.write_statistics`;
        the report's notes list each such change. In train mode the report warns
        (``report.warnings``) when the batches are far from random draws of the data
        (:class:`bncal.calibration.BatchComposition`).

    Raises:
        BncalError: no BN to recalibrate, empty data, data not matching the graph inputs
            (names, dtypes, fixed dimensions), NaN/Inf in the data or the statistics, a
            train-mode batch with one value per channel, a one-shot iterator in eval mode.
    """
    check_mode(mode)
    backend = OnnxRecalibration(model, mode, providers)
    report = run_recalibration(backend, select_inputs(batches, inputs), mode=mode, prior=prior, tol=tol,
                               max_passes=max_passes, max_samples=max_samples, progress=progress,
                               group=active_process_group(process_group), guard=guard, metric=metric,
                               guard_tol=guard_tol)
    return backend.result(), report


class OnnxRecalibration(RecalibrationBackend):
    """The onnxruntime part of a recalibration (:func:`bncal.driver.run_recalibration`).

    The train pass runs :func:`~bncal.onnx.graphs.make_train_graph`'s graph. An eval pass runs
    :func:`~bncal.onnx.graphs.make_stats_graph`'s, fed the current statistics; for a batch the
    driver anchors, its anchored form, fed as well each BN's statistics of the same batch in the
    previous eval pass (Gauss-Seidel, see :func:`bncal.stats.anchored_statistics`). Sessions are
    built on first use. :meth:`write` makes the new model; only the statistics initializers change.
    """

    def __init__(self, model, mode: str, providers):
        if not isinstance(model, onnx.ModelProto):
            raise BncalError(f"expected an onnx.ModelProto, got {type(model).__name__}; load the file with onnx.load "
                             "first")
        infos = find_batchnorms(model)
        self.handled = [info for info in infos if info.handled]
        self.skipped = [SkippedLayer(info.name, info.skip_reason) for info in infos if not info.handled]
        if not self.handled:
            detail = f" ({'; '.join(f'{s.name}: {s.reason}' for s in self.skipped)})" if self.skipped else ""
            raise BncalError(f"the model has no inference BatchNormalization whose statistics bncal can update{detail}"
                             f"{no_batchnorm_hint(model, 'recalibrated')}")
        self.skipped += [SkippedLayer(l.name, f"{l.describe()}: {l.reason}" if l.frozen else
                                      f"{l.describe()}: {l.reason}, its statistics folded into constants (lowered "
                                      "to arithmetic by the converter), left as they are; bncal inspect: BN060")
                         for l in find_lowered_normalisations(model)]
        initializers = {init.name: init for init in model.graph.initializer}
        self.layers = [BNLayer(info.name, info.epsilon, LayerStats(_values(initializers[info.mean_initializer]),
                                                                    _values(initializers[info.var_initializer])))
                       for info in self.handled]
        self.dtypes = {info.name: np.dtype(helper.tensor_dtype_to_np_dtype(initializers[info.mean_initializer].data_type))
                       for info in self.handled}
        self.model, self.providers, self.specs = model, providers, input_specs(model)
        self.new_model = None
        self.notes: list[str] = []
        self.calls_per_forward: dict[str, int] = {}
        self.single_value_fix = None
        if mode == "train":
            fixed_at_one = fixed_batch_size(self.specs) == 1
            self.single_value_fix = ("the model's batch size is fixed at 1: use mode 'eval' (exact at any batch size)"
                                     if fixed_at_one else "use batches of 2 or more samples, or mode 'eval'")
        self.sessions: dict[str, StatisticsSession] = {}
        self.previous: list[dict[str, BatchStatistics]] = []  # per batch of the last eval pass
        self.records: list[dict[str, BatchStatistics]] = []
        self.moments = self.current = None
        self.fed: dict[str, dict] = {}

    def prepare(self, batch, index, remaining):
        feeds, size = validated_feeds(batch, self.specs, index, remaining)
        return (feeds, first_floating(feeds)), size

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

    def start_pass(self, statistics, may_anchor=False) -> None:
        self.current, self.fed, self.records = statistics, {}, []
        self.moments = self.session("train" if statistics is None else "plain").new_moments()

    def run_batch(self, feeds, index, anchored) -> None:
        if self.current is None:
            self.session("train").collect(feeds, index, self.moments, single_value_fix=self.single_value_fix)
            return
        kind = "anchored" if anchored else "plain"
        session = self.session(kind)
        if kind not in self.fed:  # the current statistics, as the stats graph's inputs
            self.fed[kind] = {name: value for info in session.infos for name, value in (
                (info.mean_feed, self.current[info.name].mean.astype(self.dtypes[info.name])),
                (info.var_feed, self.current[info.name].variance.astype(self.dtypes[info.name])))}
        extra = dict(self.fed[kind])
        if anchored:
            for info in session.infos:
                previous = self.previous[index][info.name]
                extra[info.previous_mean_feed], extra[info.previous_var_feed] = previous.mean, previous.var
        _, found = session.collect({**feeds, **extra}, index, self.moments)
        self.records.append(found)

    def end_pass(self):
        if self.current is not None:
            self.previous = self.records
        return dict(self.moments.layers)

    def write(self, statistics, batches) -> None:
        self.new_model, notes = write_statistics(self.model, {name: (m.mean, m.variance)
                                                              for name, m in statistics.items()})
        self.notes += notes

    def result(self):
        return self.new_model


def _values(initializer: onnx.TensorProto) -> np.ndarray:
    return numpy_helper.to_array(initializer).astype(np.float64).reshape(-1)

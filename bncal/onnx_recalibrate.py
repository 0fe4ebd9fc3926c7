"""Recalibrate the BatchNorm statistics of an ONNX model with onnxruntime alone (no PyTorch).

The same definitions as :func:`bncal.recalibration.recalibrate`, on the same core
(:mod:`bncal.stats`): per batch, every BN contributes its input's ``(count, mean, biased
variance)`` to a :class:`~bncal.stats.ChannelMoments`, and the passes are driven by
:func:`~bncal.stats.fixed_point_passes`.

- ``train`` mode runs the train graph of :func:`bncal.onnx_graphs.make_train_graph`, where
  every BN normalises with its batch statistics (PreciseBN); the statistics come out of the
  training-mode BN ops themselves, so the pass costs about one forward.
- ``eval`` mode starts from the train-mode result and runs the stats graph of
  :func:`bncal.onnx_graphs.make_stats_graph`, fed each pass with the statistics of the previous
  one, until they stop changing: every BN then holds the statistics of its input when every
  BN uses its new statistics, i.e. those of one train-mode forward of all the data as one batch.

Only the moving-statistics initializers of the output model differ from the input model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import BncalError
from ._progress import DataPass
from .onnx_graphs import BNInfo, find_batchnorms, make_stats_graph, make_train_graph, write_statistics
from .report import LayerRecalibration, LayerStats, RecalibrationReport, SkippedLayer, summarize_shift
from .stats import ChannelMoments, fixed_point_passes
from .verify import input_specs

__all__ = ["recalibrate_onnx", "BatchStream", "quiet_session", "run_session"]


def recalibrate_onnx(
    model: onnx.ModelProto,
    batches: Iterable | Callable[[], Iterable],
    *,
    mode: str = "train",
    tol: float = 1e-5,
    max_passes: int | None = None,
    max_samples: int | None = None,
    providers: list[str] | None = None,
    progress: bool | Callable[[int], None] = False,
) -> tuple[onnx.ModelProto, RecalibrationReport]:
    """Recompute the moving mean and variance of every BatchNorm in ``model`` from ``batches``.

    Args:
        model: an inference ONNX model (not modified). Its statistics must be initializers
            loaded in memory (``onnx.load`` does that).
        batches: the calibration data, streamed one batch at a time. Each batch is a
            ``{input name: numpy array}`` dict naming every graph input, or a bare array for a
            single-input model; the first axis counts samples. For ``mode="eval"`` the data is
            read several times, so give a re-iterable (a list, :class:`bncal.data.ArrayBatches`)
            or a zero-argument callable returning a fresh iterable; a one-shot iterator
            (a generator) is refused.
        mode: ``"train"`` (each BN normalises with its batch statistics during the pass, the
            PreciseBN definition) or ``"eval"`` (the inference-consistent fixed point, reached
            within ``tol``, see :func:`bncal.stats.fixed_point_passes`, in at most
            ``max_passes`` passes). In ``eval`` mode a batch may give a BN one value per
            channel (batch size 1 before a BatchNorm1d); in ``train`` mode that is an error.
        max_samples: use at most this many samples per pass (the last batch is cut to fit).
        providers: onnxruntime execution providers (default: CPU).
        progress: True for a tqdm bar, or a callable given the number of batches done in the
            current pass after each batch.

    Returns:
        ``(new_model, report)``: a copy of ``model`` in which only the initializers holding
        BN moving statistics changed (same dtype and shape; the stored variance is the
        population, biased, variance), and a :class:`~bncal.report.RecalibrationReport`.
        Statistics tensors shared between nodes (the TorchScript exporter deduplicates equal
        initializers) are un-shared first, see :func:`bncal.onnx_graphs.write_statistics`;
        the report's notes list each such change.

    Raises:
        BncalError: no BN to recalibrate, empty data, data not matching the graph inputs
            (names, dtypes, fixed dimensions), NaN/Inf in the data or the statistics, a
            train-mode batch with one value per channel, a one-shot iterator in eval mode.
    """
    if mode not in ("train", "eval"):
        raise BncalError(f"mode must be 'train' or 'eval', not {mode!r}")
    if not isinstance(model, onnx.ModelProto):
        raise BncalError(f"expected an onnx.ModelProto, got {type(model).__name__}; load the file with onnx.load first")
    infos = find_batchnorms(model)
    handled = [info for info in infos if info.handled]
    skipped = [SkippedLayer(info.name, info.skip_reason) for info in infos if not info.handled]
    if not handled:
        detail = f" ({'; '.join(f'{s.name}: {s.reason}' for s in skipped)})" if skipped else ""
        raise BncalError(f"the model has no inference BatchNormalization whose statistics bncal can update{detail}")
    stream = BatchStream(model, batches, max_samples=max_samples, reiterable=(mode == "eval"), progress=progress)

    train_model, train_infos = make_train_graph(model, expose_stats=True, keep_model_outputs=False)
    train_session = quiet_session(train_model, providers)
    train_infos = [info for info in train_infos if info.handled]

    def train_pass():
        return _collect(train_session, train_infos, stream, lambda index, feeds: {}, one_value_ok=(mode == "eval"))[0]

    sessions = {}
    previous = {"records": None, "fingerprints": None}
    notes = []

    def eval_pass(current):
        # From the second eval pass on, anchored: each batch is normalised with the current
        # statistics moved by how far its own input moved since the last pass (Gauss-Seidel).
        anchored = previous["records"] is not None
        if anchored not in sessions:
            stats_model, infos_ = make_stats_graph(model, keep_model_outputs=False, anchored=anchored)
            sessions[anchored] = (quiet_session(stats_model, providers), [i for i in infos_ if i.handled])
        session, infos_ = sessions[anchored]
        base = {}
        for info in infos_:
            dtype = _stats_dtype(model, info)
            base[info.mean_feed] = current[info.name].mean.astype(dtype)
            base[info.var_feed] = current[info.name].variance.astype(dtype)
        if not anchored:
            feeds_for = lambda index, feeds: base  # noqa: E731
        else:
            records, fingerprints = previous["records"], previous["fingerprints"]

            def feeds_for(index, feeds):
                if index >= len(fingerprints) or not _same(fingerprints[index], _fingerprint(feeds)):
                    raise _OrderChanged
                extra = dict(base)
                for info in infos_:
                    extra[info.previous_mean_feed], extra[info.previous_var_feed] = records[info.name][index]
                return extra
        try:
            moments, records, fingerprints = _collect(session, infos_, stream, feeds_for, one_value_ok=True)
        except _OrderChanged:
            notes.append("the data came in a different order in each pass, so eval mode fell back to plain "
                         "passes, which need more of them; give the batches in a fixed order")
            previous["records"] = None
            return eval_pass(current)
        if not any("different order" in n for n in notes):
            previous["records"], previous["fingerprints"] = records, fingerprints
        return moments

    moments, passes, converged, change = fixed_point_passes(
        train_pass, eval_pass, mode=mode, tol=tol, max_passes=max_passes)
    for info in handled:
        m = moments[info.name]
        if not (np.isfinite(m.mean).all() and np.isfinite(m.m2).all()):
            raise BncalError(f"BatchNorm {info.name} got non-finite statistics from the data "
                             "(an overflow in the model?); check the data's scale and the weights")

    new_model, write_notes = write_statistics(model, {info.name: (moments[info.name].mean, moments[info.name].variance)
                                                for info in handled})
    layers = []
    for info in handled:
        m = moments[info.name]
        before = LayerStats(_initializer_values(model, info.mean_initializer),
                            _initializer_values(model, info.var_initializer))
        shift, ratio = summarize_shift(before.mean, before.var, m.mean, m.variance, info.epsilon)
        layers.append(LayerRecalibration(
            name=info.name, channels=info.channels, samples=m.count, calls_per_forward=1, before=before,
            after=LayerStats(m.mean.copy(), m.variance.copy()), mean_shift=shift, var_ratio=ratio))
    report = RecalibrationReport(mode=mode, batches=stream.batches, samples=stream.samples, passes=passes,
                                 converged=converged, max_rel_change=change, layers=layers, skipped=skipped,
                                 notes=notes + write_notes)
    return new_model, report


class _OrderChanged(Exception):
    """The data came in another order than in the previous pass (anchoring is then invalid)."""


def _fingerprint(feeds) -> float:
    first = next(iter(feeds.values()))
    return float(np.sum(first, dtype=np.float64))


def _same(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(1.0, abs(a), abs(b))


def _collect(session, infos: list[BNInfo], stream: "BatchStream", feeds_for, *, one_value_ok: bool):
    """One pass over the data: merge every BN's per-batch moments into a ChannelMoments.

    ``feeds_for(index, feeds)`` gives the extra feeds for each batch. Returns the moments,
    every BN's per-batch ``(mean, var)`` and the per-batch fingerprints (for anchoring).
    """
    names = [name for info in infos for name in (info.mean_output, info.var_output, info.count_output)]
    moments = {info.name: ChannelMoments.empty(info.channels) for info in infos}
    records = {info.name: [] for info in infos}
    fingerprints = []
    for index, feeds in stream:
        values = run_session(session, names, {**feeds, **feeds_for(index, feeds)}, index)
        fingerprints.append(_fingerprint(feeds))
        for k, info in enumerate(infos):
            mean, var, size = values[3 * k: 3 * k + 3]
            count = int(size) // info.channels
            if count < 2 and not one_value_ok:
                raise BncalError(
                    f"batch {index} gives BatchNorm {info.name} only {count} value per channel, so its batch "
                    "statistics are undefined in mode 'train'; use batches of 2 or more samples, or mode 'eval'")
            moments[info.name].add_batch(count, mean, var)
            records[info.name].append((mean, var))
    return moments, records, fingerprints


def quiet_session(model: onnx.ModelProto, providers=None):
    """An onnxruntime session at full graph optimisation that logs nothing (errors are raised).

    The derived graphs deliberately list initializers as overridable inputs, which
    onnxruntime would warn about on stderr at its default log level.
    """
    from .verify import ort_session

    return ort_session(model, optimization_level="all", providers=providers, log_severity=4)


def run_session(session, names, feeds, index):
    """``session.run`` with onnxruntime's errors as a one-line BncalError naming the batch."""
    try:
        return session.run(names, feeds)
    except Exception as error:  # onnxruntime raises its own exception types
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise BncalError(f"onnxruntime failed on batch {index}: {first}") from error


def _stats_dtype(model, info: BNInfo) -> np.dtype:
    for init in model.graph.initializer:
        if init.name == info.mean_initializer:
            return np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type))
    raise KeyError(info.mean_initializer)


def _initializer_values(model, name) -> np.ndarray:
    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init).astype(np.float64).reshape(-1)
    raise KeyError(name)


class BatchStream:
    """Validated feeds for onnxruntime from user batches, one pass per iteration.

    Iterating yields ``(batch index, {input name: array})``. Each batch is checked against the
    graph inputs (names, dtype, fixed dimensions) and for NaN/Inf, and cut to ``max_samples``.
    After a pass, ``batches`` and ``samples`` hold its counts. ``reiterable=True`` refuses a
    one-shot iterator (it would be empty on the second pass).
    """

    def __init__(self, model, batches, *, max_samples=None, reiterable: bool, progress=False):
        if isinstance(batches, (np.ndarray, dict)):
            raise BncalError("batches must be an iterable of batches, not a single batch; wrap it in a list: [batch]")
        if callable(batches) and not hasattr(batches, "__iter__"):
            self._fresh = batches
        elif hasattr(batches, "__iter__"):
            if reiterable and iter(batches) is batches:
                raise BncalError("mode 'eval' reads the data several times; give a list or a re-iterable loader "
                                 "(or a function returning a fresh iterator), not a one-shot iterator")
            self._fresh = lambda: batches
        else:
            raise BncalError(f"batches must be an iterable of batches, got {type(batches).__name__}")
        if max_samples is not None and max_samples < 1:
            raise BncalError(f"max_samples must be at least 1, not {max_samples}")
        self.specs = input_specs(model)
        self.max_samples = max_samples
        self.progress = progress
        self.batches = self.samples = 0

    def __iter__(self):
        current = DataPass(self._fresh(), self._validate, max_samples=self.max_samples, progress=self.progress)
        yield from current
        self.batches, self.samples = current.batches, current.samples

    def _validate(self, batch, index, remaining):
        names = [name for name, _, _ in self.specs]
        if isinstance(batch, (tuple, list)):  # positional inputs, e.g. an (inputs, labels) pair by mistake
            if len(batch) != len(names):
                raise BncalError(f"batch {index} is a {type(batch).__name__} of {len(batch)} items but the model has "
                                 f"{len(names)} input(s) {names}; give one array per input (for (inputs, labels) "
                                 "data, give the inputs only)")
            batch = dict(zip(names, batch))
        if isinstance(batch, np.ndarray) or not isinstance(batch, dict):
            if len(names) != 1:
                raise BncalError(f"batch {index} is a {type(batch).__name__}; the model has inputs {names}, "
                                 "so give each batch as a dict {input name: array}")
            batch = {names[0]: batch}
        missing = [n for n in names if n not in batch]
        unknown = [n for n in batch if n not in names]
        if missing or unknown:
            raise BncalError(f"batch {index} does not match the model's inputs {names}: "
                             f"missing {missing}, unknown {unknown}")
        feeds, size = {}, None
        for name, dtype, shape in self.specs:
            value = batch[name]
            if not isinstance(value, np.ndarray):
                value = np.asarray(value)
            if value.dtype != dtype:
                raise BncalError(f"input {name!r}: expected dtype {dtype}, got {value.dtype} in batch {index}; "
                                 f"convert the data with .astype(np.{dtype.name})")
            if shape is not None and (value.ndim != len(shape) or any(
                    isinstance(d, int) and d > 0 and d != got for d, got in zip(shape, value.shape))):
                raise BncalError(f"input {name!r}: expected shape {_format_shape(shape)}, got {tuple(value.shape)} "
                                 f"in batch {index}")
            if value.ndim == 0 or value.shape[0] == 0:
                raise BncalError(f"input {name!r} of batch {index} holds no samples (shape {tuple(value.shape)})")
            if remaining is not None and value.shape[0] > remaining:
                value = value[:remaining]
            if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
                raise BncalError(f"input {name!r} of batch {index} contains NaN or Inf values; "
                                 "clean or filter the data first")
            feeds[name] = value
            size = value.shape[0] if size is None else size
        return feeds, size


def _format_shape(shape) -> str:
    dims = [str(d) if isinstance(d, int) and d > 0 else (d or "?") for d in shape]
    return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"

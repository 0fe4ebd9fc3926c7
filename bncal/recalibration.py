"""Exact recalibration of BatchNorm moving statistics in PyTorch models.

Why: the moving statistics a BN uses at inference are an exponential average of batch
statistics computed while the weights were still changing, or were never updated at all
(frozen BN, a forgotten update op, pruning or quantisation afterwards). Recomputing them from
calibration data with the final weights fixes the model (Wu & Johnson 2021, "Rethinking
'Batch' in BatchNorm", section on PreciseBN).

What is exact here: every element of every calibration sample counts once, the moments are
merged in float64 (:mod:`bncal.stats`), so the statistics do not depend on the batch split.
Unlike ``torch.optim.swa_utils.update_bn``, every non-BN module runs in eval mode (dropout
off), and batches are weighted by their sample count.

The policy shared with the ONNX path (mode, re-readable data, data order for anchored eval
passes, non-finite statistics, the report) is :mod:`bncal.calibration`'s; this module runs the
passes in PyTorch.
"""

from __future__ import annotations

import contextlib
import math
import types
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ._progress import DataPass, pass_label
from .calibration import (NEVER_REACHED, BatchComposition, DataOrder, LayerResult, build_report, check_mode,
                          data_source, order_warning, require_finite)
from .data import input_hint, select_inputs
from .distributed import active_process_group, combine_across_ranks, world_size
from .errors import BncalError, first_line
from .guard import finish_step, guarded_step
from .report import LayerStats, RecalibrationReport, SkippedLayer
from .stats import ChannelMoments, anchored_statistics, fixed_point_passes

__all__ = ["recalibrate", "batchnorm_layers", "default_forward"]


def batchnorm_layers(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """Every BatchNorm module of ``model`` (BatchNorm1d/2d/3d, SyncBatchNorm, lazy BN, subclasses)."""
    return [(name or "<root>", m) for name, m in model.named_modules() if isinstance(m, _BatchNorm)]


def default_call(batch) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of the default call convention: a tensor is one input, a tuple/list
    holds positional inputs, a dict keyword inputs."""
    if isinstance(batch, dict):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)):
        return tuple(batch), {}
    return (batch,), {}


def default_forward(model: nn.Module, batch):
    """Call ``model`` on one batch by :func:`default_call`. For ``(inputs, labels)`` loaders pass
    ``inputs=0`` to :func:`recalibrate` (or a ``forward_fn``)."""
    args, kwargs = default_call(batch)
    return model(*args, **kwargs)


def recalibrate(
    model: nn.Module,
    data: Iterable,
    *,
    mode: str = "train",
    forward_fn: Callable | None = None,
    inputs=None,
    max_samples: int | None = None,
    device: torch.device | str | None = None,
    tol: float = 1e-5,
    max_passes: int | None = None,
    progress: bool | Callable = False,
    process_group=None,
    cache_mb: float = 1024,
    spill_dir=None,
    guard=None,
    metric=None,
    guard_tol: float | None = None,
) -> RecalibrationReport:
    """Recompute the moving statistics of every BatchNorm in ``model`` from ``data``, in place.

    Args:
        model: the model; its BN buffers ``running_mean``, ``running_var`` and
            ``num_batches_tracked`` are overwritten. Weights, train/eval modes, momenta and
            hooks are left as they were, also when the pass raises (then the buffers too).
        data: an iterable of batches, or a zero-argument function returning one (called once
            per pass). ``mode="eval"`` reads the data several times, so a one-shot iterator
            (a generator) is refused there: give a list, a DataLoader or such a function.
            Each batch is passed to ``forward_fn(model, batch)``, by default
            :func:`default_forward`. Tensors in the batch are moved to ``device``.
        inputs: the model inputs to pick out of each batch before ``forward_fn`` sees it
            (:func:`bncal.data.select_inputs`): ``0`` for ``(inputs, labels)`` loaders, a key
            such as ``"image"`` for dict batches, several for several inputs.
        mode: ``"train"``: each BN normalises with its batch statistics during the pass, as
            in training (PreciseBN); the right choice when the model will be fine-tuned
            further or was trained with these batch sizes. ``"eval"``: inference-consistent
            statistics, each BN's being those of its input when every earlier BN already
            uses its new statistics, i.e. what one train-mode forward over the whole
            calibration set as one batch would use; the right choice before deployment,
            and for small calibration batches. Reached by repeated passes (``passes`` in the
            report) until the largest relative change is at most ``tol``, or ``max_passes``
            (default: one per BN layer plus one, where the result is exact; see
            :func:`bncal.stats.fixed_point_passes`).
        max_samples: stop after this many samples (the last batch is cut to fit).
        device: where batches go; default: the device of the model's first parameter.
        progress: True for a tqdm bar on stderr, or a callable ``progress(batches_done)``.
        process_group: a ``torch.distributed`` group. When the default group is initialised
            and has more than one rank, each rank passes its own shard of the data and the
            moments are combined across ranks after every pass, so every rank ends with the
            statistics one process would compute over the union of the shards.
        cache_mb, spill_dir: eval mode first tries the depth-by-depth sweep
            (:func:`bncal.eval_sweep.solve_eval_statistics`), exact in about one forward over the
            data: it caches the activations still needed at the frontier of fixed BNs, at most
            ``cache_mb`` MiB on the model's device, spilling the rest to files in ``spill_dir``
            (removed afterwards) when given, else recomputing from older checkpoints. One eval
            pass then confirms the result. Where the sweep does not apply (a custom
            ``forward_fn``, a model torch.fx cannot trace, a BN called twice, several ranks; the
            report's notes say why) the anchored passes run instead.

    In train mode the report warns (``report.warnings``) when the batches are far from random
    draws of the data (:class:`bncal.calibration.BatchComposition`), e.g. one class per batch:
    train-mode statistics then depend on the batching; shuffle the data or use eval mode.

    A ``keras.Model`` (on Keras's torch backend an ``nn.Module`` too) is handed over to
    :func:`bncal.keras.recalibrate` with ``mode``, ``forward_fn``, ``max_samples``, ``tol``,
    ``max_passes`` and ``progress`` (arrays in ``data`` are cut into batches of 32 rows there);
    ``device`` and ``process_group`` do not apply to it and are refused; ``cache_mb``,
    ``spill_dir`` (the torch eval sweep's) are not used there, ``inputs`` is refused.

    Memory beyond the forward itself: per BN, two float64 vectors of its channels (its
    moments, merged call by call on the model's device). The eval sweep adds its cache, at
    most ``cache_mb``. Eval passes (the confirming one, and the anchored passes where the
    sweep does not apply) keep each BN call's batch mean and variance in the previous and the
    current pass: 4 values per channel per BN call per batch, in the BN's dtype (ResNet-18,
    4,800 BN channels: 77 KB per batch, 2.5 MB for 32 batches).

    ``guard`` (held-out ``(inputs, labels)`` batches or a labelled data spec, :mod:`bncal.guard`):
    the model is scored with ``metric`` (default top-1) before and after; worse than before (or
    than the model with the guard batches' own statistics, if better) by more than
    ``guard_tol`` points (default 0.5), the statistics are put back as they were and
    :class:`bncal.errors.DeploymentError` is raised, ``exc.report`` the report with its
    ``guard`` (also set when the guard passed).

    The stored ``running_var`` is the population (biased) variance, see :mod:`bncal.stats`.
    ``num_batches_tracked`` grows by the number of batches seen (over all ranks), as one
    training epoch over the data would make it.

    Raises:
        BncalError: an unknown mode, no BN layer to recalibrate, no data, a single batch or a
            one-shot iterator in eval mode instead of the data, non-finite data or statistics,
            a train-mode batch with one value per channel, or a forward that fails on the data.
    """
    from .keras import is_keras_model

    if is_keras_model(model):
        if device is not None or process_group is not None:
            raise BncalError("a keras.Model is recalibrated by bncal.keras.recalibrate, on the devices Keras places "
                             "it on and in one process: leave device and process_group unset")
        if inputs is not None:
            raise BncalError("a keras.Model reads Keras's own batches ((x, y) tuples keep x): leave inputs unset")
        if guard is not None:
            raise BncalError("the accuracy guard scores PyTorch and ONNX models; score a Keras model on your held-out "
                             "data yourself")
        from .keras import recalibrate as recalibrate_keras

        return recalibrate_keras(model, data, mode=mode, forward_fn=forward_fn, max_samples=max_samples, tol=tol,
                                 max_passes=max_passes, progress=progress)
    check_mode(mode)
    source = data_source(select_inputs(data, inputs), reread=(mode == "eval"))
    custom_forward, forward_fn = forward_fn, forward_fn or default_forward
    layers, skipped = [], []
    for name, bn in batchnorm_layers(model):
        if not bn.track_running_stats or bn.running_mean is None:
            skipped.append(SkippedLayer(name, "created with track_running_stats=False: it has no moving statistics"))
        else:
            layers.append((name, bn))
    if not layers:
        raise BncalError("the model has no BatchNorm layer with moving statistics; nothing to recalibrate")
    if device is None:
        device = next(iter(model.parameters()), next(iter(model.buffers()), torch.empty(0))).device
    group = active_process_group(process_group)

    before = {name: _layer_stats(bn) for name, bn in layers}
    guard_report = guarded_step(model, guard, metric, guard_tol)
    buffers = {name: [b.detach().clone() for b in bn.buffers()] for name, bn in layers} if guard is not None else {}
    run = _Run(model, layers, source, forward_fn, max_samples, torch.device(device), progress, group)
    run.composition = BatchComposition() if mode == "train" else None
    with run.prepared():
        first_pass = run.train_pass
        if mode == "eval":
            first_pass = _sweep_or_train_pass(run, model, layers, source, custom_forward, max_samples, device,
                                              cache_mb, spill_dir, progress, group)
        moments, passes, converged, change = fixed_point_passes(
            first_pass, run.eval_pass, mode=mode, tol=tol, max_passes=max_passes, on_pass=run.announce)
        updated = run.write(moments)
    for name, _ in layers:
        if name not in updated:
            skipped.append(SkippedLayer(name, NEVER_REACHED))
    results = [LayerResult(name, before[name], moments[name], bn.eps, run.calls_per_forward.get(name, 0))
               for name, bn in layers if name in updated]
    warning = order_warning(run.composition, "recalibrate")
    report = build_report(mode=mode, layers=results, skipped=skipped, batches=run.batches, samples=run.samples,
                          passes=passes, converged=converged, max_rel_change=change, notes=run.order.notes,
                          warnings=[warning] if warning else [], world_size=world_size(group))

    def restore():
        with torch.no_grad():
            for name, bn in layers:
                for buffer, saved in zip(bn.buffers(), buffers[name]):
                    buffer.copy_(saved)

    finish_step(guard_report, model, report, restore=restore)
    return report


class _FreshPasses:
    """An iterable whose every iteration is a fresh pass from a :func:`bncal.calibration.data_source`."""

    def __init__(self, fresh):
        self.fresh = fresh

    def __iter__(self):
        return iter(self.fresh())


def _sweep_or_train_pass(run, model, layers, data, forward_fn, max_samples, device, cache_mb, spill_dir, progress,
                         group):
    """The first pass of eval mode: the exact sweep's statistics when it applies, else the train pass."""
    if group is not None:
        run.order.notes.append("eval mode ran repeated passes: the depth-by-depth sweep does not combine ranks yet")
        return run.train_pass
    from .eval_sweep import solve_eval_statistics

    sweep = solve_eval_statistics(model, layers, _FreshPasses(data), device=torch.device(device), forward_fn=forward_fn,
                                  max_samples=max_samples, cache_mb=cache_mb, spill_dir=spill_dir,
                                  progress=progress)
    if sweep.moments is None:
        run.order.notes.append(f"eval mode fell back to repeated passes: {sweep.refusal}")
        return run.train_pass
    run.batches, run.samples = sweep.batches, sweep.samples
    run.order.notes.append(f"eval mode: exact depth-by-depth sweep ({sweep.forward_equivalents:.2f} forward-equivalents, "
                     f"{sweep.cached_bytes_peak / 2**20:.0f} MiB cached), then one eval pass to confirm")
    return lambda: sweep.moments


def _layer_stats(bn: _BatchNorm) -> LayerStats:
    if isinstance(bn.running_mean, nn.parameter.UninitializedBuffer):
        return LayerStats(np.full(0, np.nan), np.full(0, np.nan))
    return LayerStats(bn.running_mean.detach().double().cpu().numpy().copy(),
                      bn.running_var.detach().double().cpu().numpy().copy())


class _LayerMoments:
    """One BN's moments during a pass, merged call by call (:meth:`ChannelMoments.merge`, in
    place) into float64 accumulators on the BN's device; in eval passes also each call's
    ``(mean, variance)``, which the next pass anchors on (:meth:`previous`).

    Nothing recorded outlives a call except into tensors allocated once per recalibration:
    the accumulators, and two record buffers of ``(calls, 2, channels)`` (this pass's and the
    previous one's, swapped per pass, grown only when a pass has more calls than any before).
    Small tensors kept across a forward would sit between its large activations in the C
    allocator's heap and keep it from reusing their space: measured on ResNet-18, keeping each
    call's statistics as its own tensors grew the peak memory of a pass by 100 MB to 550 MB.
    The pass syncs with the device once, at its end (:meth:`result`).
    """

    def __init__(self, channels: int, device):
        zeros = torch.zeros(channels, dtype=torch.float64, device=device)
        self.moments = ChannelMoments(0, zeros, zeros.clone())
        self.records = self.previous_records = None
        self.calls = self.previous_calls = 0
        self.recording = False

    def start_pass(self, *, record: bool, expected_calls: int) -> None:
        """Reset the moments; with ``record``, keep this pass's calls (room for ``expected_calls``)."""
        self.moments.count = 0
        self.records, self.previous_records = self.previous_records, self.records
        self.calls, self.previous_calls = 0, (self.calls if self.recording else 0)
        self.recording = record
        if record and self.previous_records is not None and self.records is None:
            self.records = torch.empty_like(self.previous_records)
        if record and self.records is not None and self.records.shape[0] < expected_calls:
            self.records = self.records.new_empty((expected_calls, *self.records.shape[1:]))
        self._expected = expected_calls

    def add(self, count: int, mean, biased_var) -> None:
        if self.recording:
            if self.records is None or self.records.dtype != mean.dtype or self.calls == self.records.shape[0]:
                self._grow(mean)
            self.records[self.calls, 0].copy_(mean)
            self.records[self.calls, 1].copy_(biased_var)
            self.calls += 1
        mean = mean.to(torch.float64)
        self.moments.merge(ChannelMoments(count, mean, biased_var.to(torch.float64) * count))

    def _grow(self, like) -> None:
        """Room for more calls, or for calls in another dtype (autocast); keeps the calls so far."""
        old = self.records
        rows = max(self._expected, 2 * (0 if old is None else old.shape[0]), 1)
        self.records = like.new_empty((rows, 2, like.shape[0]))
        if old is not None:
            self.records[:self.calls].copy_(old[:self.calls])

    def previous(self, call: int):
        """Call ``call``'s ``(mean, variance)`` in the previous eval pass, or None."""
        if call >= self.previous_calls:
            return None
        return self.previous_records[call, 0], self.previous_records[call, 1]

    def result(self) -> ChannelMoments:
        m = self.moments
        return ChannelMoments(m.count, m.mean.cpu().numpy().copy(), m.m2.cpu().numpy().copy())


class _Run:
    """The state of one recalibration: the model prepared for it, and its passes."""

    def __init__(self, model, layers, source, forward_fn, max_samples, device, progress, group):
        self.model, self.layers, self.source = model, layers, source
        self.forward_fn, self.max_samples, self.device = forward_fn, max_samples, device
        self.progress, self.group = progress, group
        self.pending: dict[str, _LayerMoments] = {}  # this pass's, by BN name (kept across passes, reset)
        self.calls: dict[str, int] = {}
        self.calls_per_forward: dict[str, int] = {}
        self.batches = self.samples = 0
        self.train_mode_pass = True
        self.local_batches = 0  # this rank's batches in the last pass
        # Anchored eval passes: whether this batch is anchored; each BN's statistics to normalise with.
        self.order = DataOrder()
        self.anchored = False
        self.base: dict[str, tuple] = {}  # allocated once, refilled per pass
        self.composition: BatchComposition | None = None  # train mode: are the batches random draws?
        self.label: str | None = None

    def announce(self, number: int, max_passes: int | None) -> None:
        self.label = pass_label(number, max_passes)

    @contextlib.contextmanager
    def prepared(self):
        """Every module in eval mode (dropout off), BN layers set up per pass; all restored after."""
        modes = {m: m.training for m in self.model.modules()}
        self.saved = saved = {name: (bn.momentum, bn.running_mean.detach().clone(), bn.running_var.detach().clone(),
                        None if bn.num_batches_tracked is None else bn.num_batches_tracked.detach().clone())
                 for name, bn in self.layers if not isinstance(bn.running_mean, nn.parameter.UninitializedBuffer)}
        handles = [bn.register_forward_hook(self._hook(name)) for name, bn in self.layers]
        handles += [bn.register_forward_pre_hook(self._pre_hook(name)) for name, bn in self.layers]
        patched = []
        for _, bn in self.layers:
            if isinstance(bn, nn.SyncBatchNorm):
                # The pass needs per-rank batch statistics (moments are combined exactly after
                # the pass), and SyncBatchNorm refuses CPU tensors: run it as a plain BN.
                bn.forward = types.MethodType(_BatchNorm.forward, bn)
                patched.append(bn)
        self.model.eval()
        ok = False
        try:
            yield self
            ok = True
        finally:
            for h in handles:
                h.remove()
            for bn in patched:
                del bn.forward
            for m, training in modes.items():
                m.training = training
            for name, bn in self.layers:
                if name not in saved:
                    continue
                momentum, mean, var, tracked = saved[name]
                bn.momentum = momentum
                if not ok:
                    with torch.no_grad():
                        bn.running_mean.copy_(mean)
                        bn.running_var.copy_(var)
                        if tracked is not None:
                            bn.num_batches_tracked.copy_(tracked)

    def _hook(self, name):
        def hook(module, args, output):
            if self.train_mode_pass:
                # With momentum 1 the BN's own update leaves exactly this batch's mean and
                # unbiased variance in its buffers: reuse them instead of reducing again.
                self.calls[name] = self.calls.get(name, 0) + 1
                x = args[0]
                count = x.numel() // x.shape[1]
                var = module.running_var.detach().to(torch.float64) * ((count - 1) / count)  # undo Bessel
                self._layer(name, module).add(count, module.running_mean.detach(), var)
        return hook

    def _pre_hook(self, name):
        def hook(module, args):
            if self.train_mode_pass:
                return
            self.calls[name] = self.calls.get(name, 0) + 1
            x = args[0].detach()
            var, mean = torch.var_mean(x, dim=[0, *range(2, x.dim())], correction=0)
            layer = self._layer(name, module)
            previous = layer.previous(layer.calls) if self.anchored else None
            layer.add(x.numel() // x.shape[1], mean, var)
            if name not in self.base or not self.base[name][2]:
                return
            base_mean, base_var, _ = self.base[name]
            if previous is not None:
                base_mean, base_var = anchored_statistics(base_mean, base_var, mean, var, *previous, module.eps)
            module.running_mean.copy_(base_mean)
            module.running_var.copy_(base_var)
        return hook

    def _layer(self, name, module) -> _LayerMoments:
        """This pass's moments of BN ``name`` (accumulators allocated on its first call ever)."""
        layer = self.pending.get(name)
        if layer is None:
            layer = self.pending[name] = _LayerMoments(module.running_mean.shape[0], module.running_mean.device)
            layer.start_pass(record=not self.train_mode_pass, expected_calls=self._expected_calls(name))
        return layer

    def _expected_calls(self, name) -> int:
        return self.local_batches * self.calls_per_forward.get(name, 1)

    def train_pass(self):
        self.train_mode_pass = True
        for _, bn in self.layers:
            bn.train()
            bn.momentum = 1.0
            if not isinstance(bn.running_mean, nn.parameter.UninitializedBuffer):
                with torch.no_grad():  # stale NaN/Inf would survive 0 * old in the update
                    bn.running_mean.zero_()
                    bn.running_var.fill_(1.0)
        return self._pass()

    def eval_pass(self, stats):
        """Moments of every BN input with every BN normalising with ``stats``, anchored
        (:func:`bncal.stats.anchored_statistics`) from the second eval pass on, when the data
        comes in the same order as in the previous pass."""
        self.train_mode_pass = False
        for name, bn in self.layers:
            bn.eval()
            if isinstance(bn.running_mean, nn.parameter.UninitializedBuffer):
                continue
            if name not in self.base:
                self.base[name] = [torch.empty_like(bn.running_mean), torch.empty_like(bn.running_var), False]
            base = self.base[name]
            base[2] = name in stats and stats[name].count > 0  # a BN no batch reached keeps its statistics
            if base[2]:
                base[0].copy_(torch.from_numpy(stats[name].mean))
                base[1].copy_(torch.from_numpy(stats[name].variance))
        self.order.start_pass()
        moments = self._pass()
        self.order.end_pass()
        return moments

    def _pass(self):
        for name, layer in self.pending.items():
            layer.start_pass(record=not self.train_mode_pass, expected_calls=self._expected_calls(name))
        self.anchored = False
        eval_pass = not self.train_mode_pass
        composition = None if eval_pass else self.composition
        current = DataPass(self.source(), lambda batch, index, remaining: _prepare(
            batch, self.device, remaining, fingerprint=eval_pass, composition=composition),
            max_samples=self.max_samples, progress=self.progress, description=self.label)
        with torch.no_grad():
            for index, (batch, fingerprint) in current:
                if eval_pass:
                    self.anchored = self.order.anchored(index, fingerprint)
                self.calls.clear()
                self._forward(batch, index)
                for name, n in self.calls.items():
                    self.calls_per_forward[name] = max(self.calls_per_forward.get(name, 0), n)
        batches, samples = self.batches, self.samples = current.batches, current.samples
        self.local_batches = batches
        moments = {name: self.pending[name].result() for name, _ in self.layers
                   if name in self.pending and self.pending[name].moments.count}
        if self.group is not None:
            channels = {name: bn.running_mean.shape[0] for name, bn in self.layers
                        if not isinstance(bn.running_mean, nn.parameter.UninitializedBuffer)}
            moments, self.batches, self.samples = combine_across_ranks(moments, channels, batches, samples,
                                                                       self.group)
        return moments

    def _forward(self, batch, index):
        try:
            self.forward_fn(self.model, batch)
        except BncalError:
            raise
        except (RuntimeError, ValueError, TypeError, IndexError) as exc:
            msg = first_line(exc)
            if "Expected more than 1 value per channel when training" in msg:
                raise BncalError(f"batch {index} gives a BatchNorm only one value per channel, so its batch "
                                 "statistics (train mode) are undefined; use batches of 2 or more samples, "
                                 "or mode 'eval'") from exc
            raise BncalError(f"the model failed on calibration batch {index} (input {_describe(batch)}): "
                             f"{msg}{input_hint(batch, msg)}") from exc

    def _load(self, bn, moments: ChannelMoments):
        with torch.no_grad():
            bn.running_mean.copy_(torch.from_numpy(moments.mean))
            bn.running_var.copy_(torch.from_numpy(moments.variance))

    def write(self, moments) -> set[str]:
        """Store the final statistics; returns the names of the layers updated."""
        updated = set()
        for name, bn in self.layers:
            m = moments.get(name)
            if m is None or m.count == 0:
                if name in self.saved:  # never reached: put back what the pass reset
                    with torch.no_grad():
                        bn.running_mean.copy_(self.saved[name][1])
                        bn.running_var.copy_(self.saved[name][2])
                continue
            require_finite(name, m)
            self._load(bn, m)
            if bn.num_batches_tracked is not None:
                # The train pass counted its own batches; count each batch once in all.
                start = self.saved[name][3] if name in self.saved and self.saved[name][3] is not None else 0
                bn.num_batches_tracked.fill_(int(start) + self.batches)
            updated.add(name)
        return updated


def _prepare(batch, device, limit, *, fingerprint: bool, composition=None):
    """Move tensors to ``device``, check they are finite, cut to ``limit`` samples.

    Returns ``((batch, fingerprint), size)``. With ``fingerprint`` (eval passes) it is the
    float64 sum of the first floating tensor, which tells whether a later pass sees the same
    batch in the same place; else None. Finiteness costs one sum in the tensor's own dtype
    (no copy); only a sum that is not finite is looked at element by element. The first
    floating tensor also goes to ``composition`` (where given), before it moves.
    """
    sizes, sums = [], []

    def visit(x):
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(x)
        if isinstance(x, torch.Tensor):
            if x.dim() > 0 and limit is not None and x.shape[0] > limit:
                x = x[:limit]
            if x.dim() > 0:
                sizes.append(x.shape[0])
            if x.is_floating_point():
                total = float(x.sum(dtype=torch.float64) if fingerprint else x.sum())
                if not math.isfinite(total) and not bool(torch.isfinite(x).all()):
                    raise BncalError("the calibration data contains NaN or Inf values; clean or filter it first")
                if composition is not None and not sums:
                    composition.add(x)
                sums.append(total)
            return x.to(device, non_blocking=True)
        if isinstance(x, dict):
            return {k: visit(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(visit(v) for v in x)
        return x

    batch = visit(batch)
    mark = (sums[0] if sums else float(len(sizes))) if fingerprint else None
    return (batch, mark), (sizes[0] if sizes else 1)


def _describe(batch) -> str:
    if isinstance(batch, torch.Tensor):
        return f"shape {tuple(batch.shape)}"
    if isinstance(batch, dict):
        return ", ".join(f"{k}: {_describe(v)}" for k, v in batch.items())
    if isinstance(batch, (list, tuple)):
        return ", ".join(_describe(v) for v in batch)
    return type(batch).__name__

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

The passes, their policy and the report are every path's (:func:`bncal.driver.run_recalibration`);
this module is the PyTorch backend (:class:`TorchRecalibration`). ``bncal.recalibrate``
(:func:`bncal.api.recalibrate`) hands PyTorch models here and Keras models to :mod:`bncal.keras`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import numpy as np

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..calibration import check_mode, one_value_error, require_layers
from ..data import input_hint, select_inputs
from ..distributed import active_process_group
from ..driver import BNLayer, EvalSolution, RecalibrationBackend, run_recalibration
from ..errors import BncalError, first_line
from ..progress import batch_count
from ..report import LayerStats, RecalibrationReport, SkippedLayer
from ..stats import ChannelMoments, anchored_statistics
from .bn_modules import FROZEN_NOTE, describe_frozen, frozen_batchnorm_layers, per_rank_class
from .passes import LayerMoments, channel_moments, default_forward, describe_batch, prepare_batch

__all__ = ["recalibrate", "batchnorm_layers", "default_forward"]


def batchnorm_layers(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """Every BatchNorm module of ``model`` (BatchNorm1d/2d/3d, SyncBatchNorm, lazy BN, subclasses)."""
    return [(name or "<root>", m) for name, m in model.named_modules() if isinstance(m, _BatchNorm)]


def recalibrate(
    model: nn.Module,
    data: Iterable,
    *,
    mode: str = "train",
    prior: float = 0,
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
        prior: ``N``: mix the model's current statistics into the new ones with weight
            ``N / (N + n)``, ``n`` the number of calibration samples (Schneider et al. 2020's
            prior, for adapting to a new domain from few samples; 0: no prior, the new
            statistics are the data's alone). In eval mode every pass normalises with the
            mixed statistics, see :class:`bncal.calibration.SourcePrior`.
        max_samples: stop after this many samples (the last batch is cut to fit).
        device: where batches go; default: the device of the model's first parameter.
        progress: True for a tqdm bar on stderr, or a callable ``progress(batches_done)``.
        process_group: a ``torch.distributed`` group. When the default group is initialised
            and has more than one rank, each rank passes its own shard of the data and the
            moments are combined across ranks after every pass, so every rank ends with the
            statistics one process would compute over the union of the shards.
        cache_mb, spill_dir: eval mode first tries the depth-by-depth sweep
            (:func:`bncal.torch.eval_sweep.solve_eval_statistics`), exact in about one forward over the
            data: it caches the activations still needed at the frontier of fixed BNs, at most
            ``cache_mb`` MiB on the model's device, spilling the rest to files in ``spill_dir``
            (removed afterwards) when given, else recomputing from older checkpoints. One eval
            pass then confirms the result. Where the sweep does not apply (a custom
            ``forward_fn``, a model torch.fx cannot trace, a BN called twice, several ranks; the
            report's notes say why) the anchored passes run instead.

    In train mode the report warns (``report.warnings``) when the batches are far from random
    draws of the data (:class:`bncal.calibration.BatchComposition`), e.g. one class per batch:
    train-mode statistics then depend on the batching; shuffle the data or use eval mode.

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
    check_mode(mode)
    backend = TorchRecalibration(model, forward_fn, device, cache_mb=cache_mb, spill_dir=spill_dir,
                                 batches=batch_count(data) if progress and not callable(data) else None)
    return run_recalibration(backend, select_inputs(data, inputs), mode=mode, prior=prior, tol=tol,
                             max_passes=max_passes, max_samples=max_samples, progress=progress,
                             group=active_process_group(process_group), guard=guard, metric=metric,
                             guard_tol=guard_tol)


class _FreshPasses:
    """An iterable whose every iteration is a fresh pass from a :func:`bncal.calibration.data_source`;
    its ``len()`` is ``count`` (the data's batches, for progress totals) when known."""

    def __init__(self, fresh, count: int | None = None):
        self.fresh, self.count = fresh, count

    def __len__(self) -> int:
        if self.count is None:
            raise TypeError("the number of batches is not known")
        return self.count

    def __iter__(self):
        return iter(self.fresh())


def renorm_references(layers) -> dict:
    """``{name: RenormReference}`` of the batch renormalisation layers among ``[(name, bn)]``
    (:mod:`bncal.renorm`), read before any pass touches their statistics."""
    from .nn import is_batch_renorm

    return {name: bn.training_reference() for name, bn in layers if is_batch_renorm(bn)}


def moving_statistics(bn: _BatchNorm) -> LayerStats:
    """A BN's moving statistics in float64 (empty arrays for a lazy BN not yet initialised)."""
    if isinstance(bn.running_mean, nn.parameter.UninitializedBuffer):
        return LayerStats(np.full(0, np.nan), np.full(0, np.nan))
    return LayerStats(bn.running_mean.detach().double().cpu().numpy().copy(),
                      bn.running_var.detach().double().cpu().numpy().copy())


def tracked_batchnorms(model: nn.Module, what: str) -> tuple[list[tuple[str, _BatchNorm]], list[BNLayer],
                                                             list[SkippedLayer]]:
    """The model's BNs with moving statistics as ``(modules, BNLayers, skipped)``; refuses a model
    without any (``what``: "recalibrate" or "check")."""
    modules, skipped = [], []
    for name, bn in batchnorm_layers(model):
        if not bn.track_running_stats or bn.running_mean is None:
            skipped.append(SkippedLayer(name, "created with track_running_stats=False: it has no moving statistics"))
        else:
            modules.append((name, bn))
    frozen = frozen_batchnorm_layers(model)
    skipped += [SkippedLayer(name, FROZEN_NOTE) for name, _ in frozen]
    hint = (f"; its {describe_frozen(frozen)} hold fixed statistics, which cannot be recalibrated: convert "
            "them with bncal.unfreeze_batchnorm first" if frozen else "")
    require_layers(modules, skipped, what, hint)
    references = renorm_references(modules)
    layers = [BNLayer(name, bn.eps, moving_statistics(bn), references.get(name)) for name, bn in modules]
    return modules, layers, skipped


def model_device(model: nn.Module):
    """The device of the model's first parameter (else buffer; else the CPU)."""
    return next(iter(model.parameters()), next(iter(model.buffers()), torch.empty(0))).device


class TorchRecalibration(RecalibrationBackend):
    """The PyTorch part of a recalibration (:func:`bncal.driver.run_recalibration`).

    Forward hooks see each BN's input. Train passes put each BN (and only its BN computation:
    a subclass's own modules, such as timm's ``drop``, stay in eval mode) in training mode with
    momentum 1, so its own update leaves the batch's statistics in its buffers; eval passes
    load, per call, the statistics to normalise with (anchored where the driver says so) in a
    pre-hook. A renorm layer stays in eval mode and is fed its training forward's statistics in
    every pass. Every other module is in eval mode (dropout off).
    """

    solves_eval = True

    def __init__(self, model, forward_fn, device, *, cache_mb=1024, spill_dir=None, batches=None):
        self.model = model
        self.modules, self.layers, self.skipped = tracked_batchnorms(model, "recalibrate")
        self.references = {layer.name: layer.reference for layer in self.layers if layer.reference is not None}
        self.custom_forward, self.forward_fn = forward_fn, forward_fn or default_forward
        self.device = torch.device(device) if device is not None else model_device(model)
        self.cache_mb, self.spill_dir, self.data_batches = cache_mb, spill_dir, batches
        self.notes: list[str] = []
        self.pending: dict[str, LayerMoments] = {}  # this pass's, by BN name (kept across passes, reset)
        self.calls: dict[str, int] = {}
        self.calls_per_forward: dict[str, int] = {}
        self.train_mode_pass = True
        self.local_batches = 0  # this rank's batches in the last pass
        self.anchored = False
        self.base: dict[str, list] = {}  # each BN's statistics to normalise with in eval passes, refilled per pass
        self.saved: dict[str, tuple] = {}

    def prepare(self, batch, index, remaining):
        return prepare_batch(batch, self.device, remaining)

    @contextlib.contextmanager
    def prepared(self):
        """Every module in eval mode (dropout off), BN layers set up per pass; all restored after."""
        modes = {m: m.training for m in self.model.modules()}
        self.saved = saved = {
            name: (bn.momentum, bn.running_mean.detach().clone(), bn.running_var.detach().clone(),
                   None if bn.num_batches_tracked is None else bn.num_batches_tracked.detach().clone())
            for name, bn in self.modules if not isinstance(bn.running_mean, nn.parameter.UninitializedBuffer)}
        handles = [bn.register_forward_hook(self._hook(name)) for name, bn in self.modules]
        handles += [bn.register_forward_pre_hook(self._pre_hook(name)) for name, bn in self.modules]
        # The pass needs per-rank batch statistics (moments are combined exactly after the pass),
        # and a synchronising SyncBatchNorm refuses CPU tensors: its BN part runs as a plain BN,
        # its class's own forward (a subclass's activation and drop) still runs.
        patched = [(bn, type(bn)) for _, bn in self.modules if isinstance(bn, nn.SyncBatchNorm)]
        for bn, cls in patched:
            bn.__class__ = per_rank_class(cls)
        self.model.eval()
        ok = False
        try:
            yield self
            ok = True
        finally:
            for h in handles:
                h.remove()
            for bn, cls in patched:
                bn.__class__ = cls
            for m, training in modes.items():
                m.training = training
            for name, bn in self.modules:
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
            if self.train_mode_pass and name not in self.references:
                # With momentum 1 the BN's own update leaves exactly this batch's mean and
                # unbiased variance in its buffers: reuse them instead of reducing again.
                self.calls[name] = self.calls.get(name, 0) + 1
                x = args[0]
                count = x.numel() // x.shape[1]
                var = module.running_var.detach().to(torch.float64) * ((count - 1) / count)  # undo Bessel
                self._layer(name, module).add(count, module.running_mean.detach(), var)
        return hook

    def _pre_hook(self, name):
        reference = self.references.get(name)

        def hook(module, args):
            if self.train_mode_pass and reference is None:
                return
            self.calls[name] = self.calls.get(name, 0) + 1
            x = args[0].detach()
            mean, var = channel_moments(x)
            layer = self._layer(name, module)
            previous = layer.previous(layer.calls) if self.anchored else None
            layer.add(x.numel() // x.shape[1], mean, var)
            if self.train_mode_pass:  # a renorm layer: its training forward on this batch
                base_mean, base_var = mean, var
            elif name not in self.base or not self.base[name][2]:
                return
            else:
                base_mean, base_var, _ = self.base[name]
                if previous is not None:
                    base_mean, base_var = anchored_statistics(base_mean, base_var, mean, var, *previous, module.eps)
            if reference is not None:
                base_mean, base_var = (torch.from_numpy(v) for v in reference.training_statistics(
                    base_mean.double().cpu().numpy(), base_var.double().cpu().numpy()))
            module.running_mean.copy_(base_mean)
            module.running_var.copy_(base_var)
        return hook

    def _layer(self, name, module) -> LayerMoments:
        """This pass's moments of BN ``name`` (accumulators allocated on its first call ever)."""
        layer = self.pending.get(name)
        if layer is None:
            layer = self.pending[name] = LayerMoments(module.running_mean.shape[0], module.running_mean.device)
            layer.start_pass(record=not self.train_mode_pass, expected_calls=self._expected_calls(name))
        return layer

    def _expected_calls(self, name) -> int:
        return self.local_batches * self.calls_per_forward.get(name, 1)

    def start_pass(self, statistics, may_anchor=False) -> None:
        self.train_mode_pass = statistics is None
        for name, bn in self.modules:
            if self.train_mode_pass and name not in self.references:
                # The BN computation only: train() would recurse into a subclass's own modules (timm's
                # BatchNormAct2d holds a DropBlock as ``drop``), which must stay in eval mode.
                bn.training = True
                bn.momentum = 1.0
                if not isinstance(bn.running_mean, nn.parameter.UninitializedBuffer):
                    with torch.no_grad():  # stale NaN/Inf would survive 0 * old in the update
                        bn.running_mean.zero_()
                        bn.running_var.fill_(1.0)
                continue
            bn.training = False  # a renorm layer always: it is normalised by its pre-hook
            if self.train_mode_pass or isinstance(bn.running_mean, nn.parameter.UninitializedBuffer):
                continue
            if name not in self.base:
                self.base[name] = [torch.empty_like(bn.running_mean), torch.empty_like(bn.running_var), False]
            base = self.base[name]
            base[2] = name in statistics and statistics[name].count > 0  # a BN no batch reached keeps its statistics
            if base[2]:
                base[0].copy_(torch.from_numpy(statistics[name].mean))
                base[1].copy_(torch.from_numpy(statistics[name].variance))
        for name, layer in self.pending.items():
            layer.start_pass(record=not self.train_mode_pass, expected_calls=self._expected_calls(name))
        self.local_batches = 0

    def run_batch(self, inputs, index, anchored) -> None:
        self.anchored = anchored
        self.calls.clear()
        with torch.no_grad():
            self._forward(inputs, index)
        for name, n in self.calls.items():
            self.calls_per_forward[name] = max(self.calls_per_forward.get(name, 0), n)
        self.local_batches += 1

    def end_pass(self) -> dict[str, ChannelMoments]:
        return {name: self.pending[name].result() for name, _ in self.modules
                if name in self.pending and self.pending[name].moments.count}

    def _forward(self, batch, index):
        try:
            self.forward_fn(self.model, batch)
        except BncalError:
            raise
        except (RuntimeError, ValueError, TypeError, IndexError) as exc:
            msg = first_line(exc)
            if "Expected more than 1 value per channel when training" in msg:
                raise one_value_error(index, "use batches of 2 or more samples, or mode 'eval'") from exc
            raise BncalError(f"the model failed on calibration batch {index} (input {describe_batch(batch)}): "
                             f"{msg}{input_hint(batch, msg)}") from exc

    def solve_eval(self, source, *, max_samples, progress, prior) -> EvalSolution:
        from .eval_sweep import solve_eval_statistics

        sweep = solve_eval_statistics(self.model, self.modules, _FreshPasses(source, self.data_batches),
                                      device=self.device, forward_fn=self.custom_forward, max_samples=max_samples,
                                      cache_mb=self.cache_mb, spill_dir=self.spill_dir, progress=progress,
                                      prior=prior)
        return sweep

    def write(self, statistics, batches) -> None:
        for name, bn in self.modules:
            m = statistics.get(name)
            if m is None:
                if name in self.saved:  # never reached: put back what the pass reset
                    with torch.no_grad():
                        bn.running_mean.copy_(self.saved[name][1])
                        bn.running_var.copy_(self.saved[name][2])
                continue
            with torch.no_grad():
                bn.running_mean.copy_(torch.from_numpy(m.mean))
                bn.running_var.copy_(torch.from_numpy(m.variance))
            # A renorm layer's counter is its warm-up schedule's step: recalibrating is no training.
            if bn.num_batches_tracked is not None and name not in self.references:
                # The train pass counted its own batches; count each batch once in all.
                start = self.saved[name][3] if name in self.saved and self.saved[name][3] is not None else 0
                bn.num_batches_tracked.fill_(int(start) + batches)

    def restore(self) -> None:
        with torch.no_grad():
            for name, bn in self.modules:
                if name in self.saved:
                    _, mean, var, tracked = self.saved[name]
                    bn.running_mean.copy_(mean)
                    bn.running_var.copy_(var)
                    if tracked is not None:
                        bn.num_batches_tracked.copy_(tracked)

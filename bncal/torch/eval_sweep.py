"""Eval-mode BatchNorm statistics in one topological sweep: the exact fixed point for about the
compute of one forward pass (PyTorch path).

The eval-mode fixed point (see :func:`bncal.recalibrate`, ``mode="eval"``): every BN holds the
population (biased) statistics of its own input over all calibration data when every BN
normalises with its new moving statistics, i.e. what one train-mode forward of the whole
calibration set as one batch uses. In a graph without cycles a BN's input depends only on the
BNs upstream of it, so the fixed point can be solved in order rather than iterated:

1. trace the model with torch.fx (BN modules kept as calls) and give every node its BN depth
   (:mod:`bncal.torch.sweep_plan`);
2. for depth ``k = 1, 2, ...``: run, over all data, the nodes between depth ``k - 1`` and
   ``k`` with every shallower BN already holding its final statistics, merge the moments of
   the inputs of the depth-``k`` BNs (:class:`bncal.stats.ChannelMoments`, float64, batches
   weighted by their sample count), and load them into those BNs;
3. between depths, keep for every batch the values deeper nodes still need (the frontier, skip
   connections included), so no node runs twice (:mod:`bncal.torch.sweep_cache`).

Each node that some BN input depends on runs once per sample, the head after the last BN not
at all: the sweep costs about one forward (``forward_equivalents`` counts the compute it
executed, in units of one plain forward over the same data), where repeated eval passes cost
one per BN depth or, anchored, 10 to 30 on MobileNet/EfficientNet-style nets.

Memory: the frontiers are held on the model's device within ``cache_mb`` MiB (default
:data:`DEFAULT_CACHE_MB`, 1 GiB), which holds the frontiers of torchvision's families for 128
inputs of 3x224x224 (``tools/bench_eval_mode.py --torchvision`` prints the peaks). A batch whose frontier does not fit is written to a
temporary directory under ``spill_dir`` when one is named (removed afterwards, also on error),
else it is recomputed from its last checkpoint (or from the data). Before committing to
recomputation the sweep projects its cost and refuses beyond ``max_forward_equivalents``
(resnet50, 128 inputs of 3x128x128: half the memory it needs costs 1.85 forward-equivalents, a
quarter 3.1; spilling 1.02 and disk traffic).

Refusals: :func:`solve_eval_statistics` returns a :class:`SweepResult` whose ``moments`` is None
and whose ``refusal`` says why, and the caller falls back to repeated passes: a custom
``forward_fn``, a forward torch.fx cannot trace (control flow on tensor values, ``*args``), a BN
called more than once per forward (its statistics pool several depths), an in-place op whose
input is read afterwards, data that comes in another order when it has to be read again, data
that cannot be read again when it does not fit, a cost projected beyond the limit, a traced
graph that fails on the data.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from ..progress import DataPass, batch_count, progress_reporter
from .sweep_cache import Checkpoints
from .sweep_plan import SweepPlan, SweepRefused, build_plan, node_cost, tensor_bytes
from ..calibration import batch_fingerprint
from ..driver import EvalSolution
from ..errors import BncalError, first_line
from .passes import LayerMoments, channel_moments, default_forward, prepare_batch
from ..stats import ChannelMoments

__all__ = ["solve_eval_statistics", "SweepResult", "DEFAULT_CACHE_MB", "DEFAULT_MAX_FORWARD_EQUIVALENTS"]

DEFAULT_CACHE_MB = 1024
DEFAULT_MAX_FORWARD_EQUIVALENTS = 5.0
_MIB = 1 << 20
_RUN_ERRORS = (RuntimeError, ValueError, TypeError, IndexError, KeyError, AttributeError, NotImplementedError)


@dataclass
class SweepResult(EvalSolution):
    """What the sweep found, or why it did not run (:class:`bncal.driver.EvalSolution`).

    ``moments``: ``{layer name: ChannelMoments}`` of every BN the data reaches.
    ``forward_equivalents`` counts node-level compute executed (a probe of two samples, every
    segment, the moment reductions). ``data_passes``: times the data was read.
    ``spilled_bytes_peak``: the most frontier bytes held on disk between batches.
    """

    data_passes: int = 0
    spilled_bytes_peak: int = 0
    recomputed_batch_steps: int = 0
    notes: list[str] = field(default_factory=list)


def solve_eval_statistics(
    model: nn.Module,
    layers: list[tuple[str, nn.Module]],
    data: Iterable,
    *,
    device: torch.device | str,
    forward_fn=None,
    max_samples: int | None = None,
    cache_mb: float = DEFAULT_CACHE_MB,
    spill_dir: str | os.PathLike | None = None,
    progress=None,
    max_forward_equivalents: float = DEFAULT_MAX_FORWARD_EQUIVALENTS,
    prior=None,
) -> SweepResult:
    """Solve the eval-mode fixed point of ``layers`` (recalibrate's ``(name, bn)`` list) exactly.

    Nothing of ``model`` changes: modes, BN buffers, ``inplace`` flags are restored, no hook is
    added, the caller stores the returned moments. Batches go through the default call
    convention (a tensor, a tuple as positional inputs, a dict as keyword inputs), moved to
    ``device``; ``forward_fn`` other than None or :func:`bncal.torch.recalibration.default_forward`
    is refused, since the sweep cannot see inside it. ``max_samples`` and ``progress`` (True for
    a bar, or ``progress(batch steps done)``) are as in :func:`bncal.recalibrate`. With a
    ``prior`` (:class:`bncal.calibration.SourcePrior`) each depth is loaded with its moments
    mixed with the source statistics before the next depth runs, so the deeper BNs see what
    the mixed network computes; the moments returned are the unmixed ones, which the caller
    mixes as it mixes every pass.

    Raises BncalError for bad input the repeated passes would reject too (non-finite data, an
    empty data set, a missing ``spill_dir``); every other obstacle is a refusal.
    """
    if forward_fn not in (None, default_forward):
        return SweepResult(None, "a custom forward_fn hides the call the sweep must trace")
    if any(isinstance(bn.running_mean, nn.parameter.UninitializedBuffer) for _, bn in layers):
        return SweepResult(None, "a lazy BatchNorm has not been initialised yet")
    if spill_dir is not None and not os.path.isdir(spill_dir):
        raise BncalError(f"the spill directory {spill_dir} does not exist; create it or pass another one")
    sweep = _Sweep(model, layers, data, torch.device(device), max_samples, progress,
                   Checkpoints(int(cache_mb * _MIB), spill_dir, torch.device(device)), max_forward_equivalents, prior)
    try:
        with _sweep_mode(model, layers):
            return sweep.run()
    except SweepRefused as exc:
        return SweepResult(None, str(exc), forward_equivalents=sweep.forward_equivalents())
    finally:
        sweep.close()


@contextlib.contextmanager
def _sweep_mode(model, layers):
    """Every module in eval mode, ``inplace`` flags off, no grad; modes, flags, BN buffers restored."""
    modes = {m: m.training for m in model.modules()}
    buffers = [(bn, bn.running_mean.detach().clone(), bn.running_var.detach().clone()) for _, bn in layers]
    inplace = [m for m in model.modules() if getattr(m, "inplace", None) is True]
    model.eval()
    for m in inplace:
        m.inplace = False
    try:
        with torch.no_grad():
            yield
    finally:
        for m in inplace:
            m.inplace = True
        for m, training in modes.items():
            m.training = training
        with torch.no_grad():
            for bn, mean, var in buffers:
                bn.running_mean.copy_(mean)
                bn.running_var.copy_(var)


class _Sweep:
    """One sweep: depth by depth over all batches, moments merged, BNs fixed as they are solved."""

    def __init__(self, model, layers, data, device, max_samples, progress, cache, max_forward_equivalents, prior):
        self.model, self.data, self.device, self.max_samples = model, data, device, max_samples
        self.layers = dict(layers)
        self.names = {id(bn): name for name, bn in layers}
        self.cache, self.limit = cache, max_forward_equivalents
        self.plan: SweepPlan | None = None
        # Counts batch steps, depths x batches in all: the bar starts once the first batch has been traced.
        self.progress, self.report = progress, None
        self.moments: dict[str, ChannelMoments] = {}
        self.executed = self.per_sample = 0.0
        self.steps_done = self.data_passes = self.recomputed = 0
        self.prior = prior

    def run(self) -> SweepResult:
        self._step(0)
        if self.report is not None:  # exact from here on: every depth takes each batch one step
            self.report.set_total(self.plan.depths * len(self.cache))
        self._check_projected_cost()
        for s in range(1, self.plan.depths):
            self._step(s)
        return SweepResult(
            dict(self.moments), forward_equivalents=self.forward_equivalents(), data_passes=self.data_passes,
            depths=self.plan.depths, batches=len(self.cache), samples=sum(self.cache.sizes),
            cached_bytes_peak=self.cache.cached_peak, spilled_bytes_peak=self.cache.spilled_peak,
            recomputed_batch_steps=self.recomputed, notes=self._notes())

    def close(self) -> None:
        self.cache.close()
        if self.report is not None:
            self.report(None)

    def forward_equivalents(self) -> float:
        samples = sum(self.cache.sizes)
        return self.executed / (self.per_sample * samples) if self.per_sample and samples else 0.0

    def _step(self, s: int) -> None:
        """Take every batch to frontier ``s``, merge the moments of the depth-``s + 1`` BNs, fix them."""
        pending: dict[str, LayerMoments] = {}
        for b, batch in self._batches(s):
            env = self._advance(b, batch, s)
            for name, node in self.plan.bn_nodes[s]:
                x = env[node.args[0]]
                mean, var = channel_moments(x)
                if name not in pending:
                    pending[name] = LayerMoments(x.shape[1], x.device)
                pending[name].add(x.numel() // x.shape[1], mean, var)
                self.executed += x.numel()
            self.cache.store(b, s, [env[n] for n in self.plan.frontiers[s]])
            self.steps_done += 1
            if self.report is not None:
                self.report(self.steps_done)
        for name, node in self.plan.bn_nodes[s]:
            bn = self.layers[name]
            self.moments[name] = moments = pending[name].result()
            if self.prior is not None:
                moments = self.prior.mix({name: moments}, sum(self.cache.sizes))[name]
            bn.running_mean.copy_(torch.from_numpy(moments.mean))
            bn.running_var.copy_(torch.from_numpy(moments.variance))

    def _batches(self, s: int):
        """``(index, batch)``: from the data when some batch has no checkpoint (always at step 0),
        else ``(index, None)`` for every batch."""
        if s > 0 and not self.cache.needs_data():
            yield from ((b, None) for b in range(len(self.cache)))
            return
        self.data_passes += 1
        seen = 0
        for index, (batch, fingerprint, size) in DataPass(self.data, self._prepare, max_samples=self.max_samples):
            if s == 0 and index == 0:
                self._first_batch(batch)
                self.report = progress_reporter(self.progress, total=self._expected_steps(size),
                                                description="pass 1: depth-by-depth sweep", unit="step")
            if s == 0:
                self.cache.add(size, fingerprint)
            elif index >= len(self.cache) or not _same(self.cache.fingerprints[index], fingerprint):
                raise SweepRefused("the data came in another order (or length) when read again; give the batches "
                                   "in a fixed order, or raise cache_mb so it is read once")
            seen += 1
            yield index, batch
        if seen != len(self.cache):
            raise SweepRefused("the data had fewer batches when read again")

    def _expected_steps(self, first_size: int) -> int | None:
        """Depths x batches, before the first step has counted the batches: the data's length, or
        the batches ``max_samples`` allows judging by the first (None when neither is known)."""
        known = batch_count(self.data)
        if self.max_samples is not None:
            allowed = math.ceil(self.max_samples / first_size)
            known = allowed if known is None else min(known, allowed)
        return None if known is None else self.plan.depths * known

    def _prepare(self, batch, index, remaining):
        (batch, first), size = prepare_batch(batch, self.device, remaining)
        return (batch, batch_fingerprint(first), size), size

    def _first_batch(self, batch) -> None:
        """Trace for the first batch's call, then probe two of its samples for node costs and sizes."""
        self.plan = plan = build_plan(self.model, self.names, batch)
        if plan.depths == 0:
            raise SweepRefused("no BatchNorm to recalibrate is called in the traced forward")
        (small, _), samples = prepare_batch(batch, self.device, 2)
        env = {**plan.constants, **plan.bind(small)}
        for node in plan.nodes:
            if node in plan.calls:
                self._execute([node], [[]], env, 0)
                plan.cost[node] = node_cost(plan.calls[node], env, env[node]) / samples
                plan.bytes[node] = tensor_bytes(env[node]) / samples
        self.per_sample = sum(plan.cost.values())
        self.executed += self.per_sample * samples

    def _advance(self, b: int, batch, s: int) -> dict:
        """Batch ``b``'s values at frontier ``s``, from its checkpoint (or the data) onwards."""
        start, values = self.cache.load(b)
        env = dict(self.plan.constants)
        env.update(self.plan.bind(batch) if values is None else zip(self.plan.frontiers[start], values))
        nodes, release, cost = self.plan.run_list(start, s)
        self._execute(nodes, release, env, b)
        self.executed += cost * self.cache.sizes[b]
        self.recomputed += start < s - 1
        return env

    def _execute(self, nodes, release, env, b) -> None:
        try:
            self.plan.execute(nodes, release, env)
        except _RUN_ERRORS as exc:
            raise SweepRefused(f"the traced graph failed on batch {b} ({first_line(exc)})") from exc

    def _check_projected_cost(self) -> None:
        """Refuse before the sequential steps when recomputation would cost more than the limit."""
        segment_cost, frontier_bytes = self.plan.frontier_cost()
        if isinstance(self.data, Iterator) and self.cache.needs_data():
            raise SweepRefused("the first frontier of every batch does not fit in cache_mb and the data cannot be "
                               "read again; raise cache_mb, name a spill_dir, or give a list or a DataLoader")
        remaining = self.cache.projected_cost(segment_cost, frontier_bytes, 1, self.plan.depths)
        projected = (self.executed + remaining) / (self.per_sample * sum(self.cache.sizes))
        if projected > self.limit:
            needed = max(frontier_bytes) * sum(self.cache.sizes) / _MIB
            raise SweepRefused(f"within cache_mb={self.cache.budget / _MIB:g} the sweep would recompute its way to "
                               f"about {projected:.1f} forward passes (the limit is {self.limit:g}); about "
                               f"{needed:.0f} MiB holds every frontier, or name a spill_dir")

    def _notes(self) -> list[str]:
        notes = []
        if self.cache.spilled_peak:
            notes.append(f"the frontier did not fit in cache_mb={self.cache.budget / _MIB:g}: up to "
                         f"{self.cache.spilled_peak / _MIB:.1f} MiB went to a temporary directory")
        if self.recomputed:
            notes.append(f"{self.recomputed} batch steps were recomputed from older checkpoints "
                         f"(cache_mb={self.cache.budget / _MIB:g})")
        return notes


def _same(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)

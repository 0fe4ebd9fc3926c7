"""Eval-mode statistics of a functional or Sequential Keras model in one depth-by-depth sweep,
the Keras counterpart of :mod:`bncal.eval_sweep` (PyTorch path).

The eval-mode fixed point is each BN holding the population statistics of its own input when
every BN normalises with its new ones. A BN's input depends only on the BNs before it, so the
fixed point is solved in order instead of iterated:

1. every BN gets its depth, the largest number of BNs on any path from the model's inputs to it
   (inclusive); every other node the depth of its deepest input;
2. step ``k = 1, 2, ...``: over all data, the nodes of depth ``k - 1`` that some BN input needs
   run (the depth-``k - 1`` BNs in inference mode with the statistics just found), from each
   batch's frontier, the values deeper steps still read (skip connections included); the
   float64 moments of the depth-``k`` BN inputs merge over batches
   (:class:`~bncal.stats.ChannelMoments`, as :mod:`bncal.keras.compiled` reduces them) and
   are written into those BNs (mixed with the source prior first, where one is given);
3. each step is one traced function (``tf.function`` on TensorFlow, eager elsewhere); the new
   frontiers of a step are kept per batch within ``cache_mb`` MiB (each replacing the batch's
   previous one); a batch whose frontier does not fit is recomputed from the data at the next
   step (counted in ``forward_equivalents``), not from an earlier checkpoint as the PyTorch
   sweep can.

Nodes no BN input needs (the head after the last BN) never run. ``forward_equivalents`` is the
work done in units of one forward over the same data, work counted per node as multiply-adds
for convolutions and Dense layers and output values for everything else.

Refusals (:attr:`SweepResult.refusal`; the caller falls back to repeated passes): a subclassed
model, a BN inside a nested model or layer, a BN called more than once, masks, data that comes
back in another order when a batch has to be recomputed.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..stats import ChannelMoments
from ..calibration import batch_fingerprint
from ..driver import EvalSolution
from ..progress import DataPass
from .backend import import_keras, inference_context
from .passes import prepare_batch, run_forward
from .compiled import channel_moments, normalise, pack_moments, unpack_moments
from .layers import assign_values, is_batchnorm, statistics_put_back, sublayers

__all__ = ["DEFAULT_CACHE_MB", "SweepResult", "solve_eval_statistics"]

DEFAULT_CACHE_MB = 1024


@dataclass
class SweepResult(EvalSolution):
    """What the sweep found, or why it did not run (:class:`bncal.driver.EvalSolution`);
    ``forward``: its steps chained, for the confirming eval pass."""

    forward: "SweepForward | None" = None


class _Refused(Exception):
    pass


def _graph(model):
    """The Functional graph of a functional or (built) Sequential model."""
    keras = import_keras()
    from keras.src.models.functional import Functional

    if isinstance(model, keras.Sequential):
        model = getattr(model, "_functional", None)
    if not isinstance(model, Functional) or not hasattr(model, "_nodes_by_depth"):
        raise _Refused("not a functional or Sequential model (a subclassed one is run as a whole)")
    return model


def _node_cost(node) -> float:
    """Work per sample: multiply-adds of a convolution or Dense layer, else its output values."""
    outputs = sum(math.prod(d for d in t.shape[1:] if d is not None) for t in node.outputs)
    kernel = getattr(node.operation, "kernel", None)
    if kernel is not None and hasattr(kernel, "shape") and len(kernel.shape) >= 2:
        shape = tuple(kernel.shape)
        per_output = math.prod(shape[:-1])  # (..., in/groups, out): the reduction of one output value
        if type(node.operation).__name__.startswith("DepthwiseConv"):
            per_output = math.prod(shape[:-2])
        return float(outputs * max(per_output, 1))
    return float(max(outputs, 1))


class _Plan:
    """The nodes of each step and what each step reads and leaves for later."""

    def __init__(self, model, layers):
        graph = _graph(model)
        names = {id(bn): name for name, bn in layers}
        nodes = [node for depth in sorted(graph._nodes_by_depth, reverse=True)
                 for node in graph._nodes_by_depth[depth] if node.operation is not None and not node.is_input]
        self._graph, self.inputs = weakref.ref(graph), list(graph.inputs)  # kept with the model: no cycle
        depth = {id(t): 0 for t in self.inputs}
        self.bn_nodes: dict[str, object] = {}
        level: dict[int, int] = {}  # node -> depth of its outputs
        for node in nodes:
            op = node.operation
            if getattr(op, "mask_zero", False) or type(op).__name__ == "Masking":
                raise _Refused(f"{op.name} makes a mask")
            if not is_batchnorm(op) and any(is_batchnorm(sub) for sub in _all_sublayers(op)):
                raise _Refused(f"a BatchNormalization inside {op.name} (a nested model or layer)")
            inner = max((depth.get(id(t), 0) for t in node.input_tensors), default=0)
            if is_batchnorm(op):
                if id(op) not in names:
                    out = inner  # frozen: runs as in inference, like any other layer
                elif names[id(op)] in self.bn_nodes:
                    raise _Refused(f"{names[id(op)]} is called more than once")
                else:
                    self.bn_nodes[names[id(op)]] = node
                    out = inner + 1
            else:
                out = inner
            level[id(node)] = out
            for t in node.outputs:
                depth[id(t)] = out
        # Only what some recalibrated BN's input needs runs.
        needed, wanted = set(), [t for n in self.bn_nodes.values() for t in n.input_tensors]
        producer = {id(t): node for node in nodes for t in node.outputs}
        while wanted:
            t = wanted.pop()
            node = producer.get(id(t))
            if node is not None and id(node) not in needed:
                needed.add(id(node))
                wanted.extend(node.input_tensors)
        self.nodes = [n for n in nodes if id(n) in needed]
        own_call = import_keras().layers.BatchNormalization.call
        self.bn_node_ids = {id(n) for n in self.bn_nodes.values() if type(n.operation).call is own_call}
        self.depths = max((level[id(n)] for n in self.bn_nodes.values()), default=0)
        # A node whose outputs have depth k - 1 runs in step k: a recalibrated BN of depth k (its
        # statistics found in step k) in step k + 1, in inference mode.
        self.step_of = {id(n): level[id(n)] + 1 for n in self.nodes}
        self.targets = {k: [name for name, n in self.bn_nodes.items() if level[id(n)] == k]
                        for k in range(1, self.depths + 1)}
        self.full_cost = sum(_node_cost(n) for n in nodes)
        self.step_cost = {k: sum(_node_cost(n) for n in self.nodes if self.step_of[id(n)] == k)
                          for k in range(1, self.depths + 1)}
        # frontier[k]: the tensors held after step k (read by a later step, or a target of step k+1's BNs).
        made = {id(t): 0 for t in self.inputs}
        for n in self.nodes:
            for t in n.outputs:
                made[id(t)] = self.step_of[id(n)]
        last_read: dict[int, int] = {}
        for n in self.nodes:
            for t in n.input_tensors:
                last_read[id(t)] = max(last_read.get(id(t), 0), self.step_of[id(n)])
        for name, n in self.bn_nodes.items():  # a BN input is reduced in the step that makes it
            for t in n.input_tensors:
                last_read[id(t)] = max(last_read.get(id(t), 0), level[id(n)])
        tensors = {id(t): t for n in self.nodes for t in [*n.input_tensors, *n.outputs]}
        tensors.update({id(t): t for t in self.inputs})
        self.frontier = {k: [tensors[i] for i in tensors if made.get(i, -1) <= k < last_read.get(i, -1)]
                         for k in range(1, self.depths + 1)}
        self.frontier[0] = self.inputs  # step 1 takes every model input

    @property
    def graph(self):
        return self._graph()

    def step_nodes(self, k):
        return [n for n in self.nodes if self.step_of[id(n)] == k]


def _all_sublayers(layer):
    found, todo = [], list(sublayers(layer))
    while todo:
        sub = todo.pop()
        found.append(sub)
        todo.extend(sublayers(sub))
    return found


class _Step:
    """Step ``k`` as one function of the frontier after step ``k - 1``: ``(frontier after k,
    the moments of each target BN's input packed by :func:`bncal.keras.compiled.pack_moments`)``;
    :meth:`moments` unpacks them."""

    def __init__(self, plan: _Plan, k: int):
        keras = import_keras()
        self.plan, self.k = plan, k
        self.nodes, self.before, self.after = plan.step_nodes(k), plan.frontier[k - 1], plan.frontier[k]
        self.targets = [plan.bn_nodes[name] for name in plan.targets[k]]
        self.layout: list[tuple] = []  # the packing's layout, set when traced
        self.function = self._run
        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            self.function = tf.function(self._run, reduce_retracing=True)

    def _run(self, values):
        values_of = {id(t): v for t, v in zip(self.before, values)}
        for node in self.nodes:
            if id(node) in self.plan.bn_node_ids:  # the inference forward, in one kernel where it can
                bn = node.operation
                outputs = normalise(bn, values_of[id(node.input_tensors[0])], bn.moving_mean, bn.moving_variance)
                values_of[id(node.outputs[0])] = outputs
                continue
            args, kwargs = node.arguments.fill_in(values_of)
            if "training" in getattr(node.operation, "_call_context_args", {}):
                kwargs["training"] = False
            outputs = node.operation(*args, **kwargs)
            for t, v in zip(node.outputs, import_keras().tree.flatten(outputs)):
                values_of[id(t)] = v
        packed, self.layout = pack_moments([
            (name, channel_moments(bn_node.operation, values_of[id(bn_node.input_tensors[0])]))
            for name, bn_node in zip(self.plan.targets[self.k], self.targets)])
        return [values_of[id(t)] for t in self.after], packed

    def moments(self, packed) -> dict[str, tuple]:
        """The packed moments a call returned, as ``{name: (count, mean, var)}`` in numpy."""
        found = unpack_moments(import_keras().ops.convert_to_numpy(packed), self.layout)
        return {name: calls[0] for name, calls in found.items()}

    def __call__(self, values):
        with inference_context():
            return self.function(list(values))


class SweepForward:
    """The sweep's steps chained: ``forward(inputs) -> {name: [(count, mean, var)]}``, the
    interface of :class:`bncal.keras.compiled.CompiledForward` with every BN normalising with its
    moving statistics. An eval pass through the very functions the sweep ran confirms its fixed
    point bit for bit (another partition of the same float32 graph rounds differently, which on
    deep nets can exceed ``tol`` without saying anything about the statistics)."""

    def __init__(self, plan: "_Plan", steps: dict):
        self.plan, self.steps = plan, steps
        self.layers = [(name, node.operation) for name, node in plan.bn_nodes.items()]

    def __call__(self, inputs) -> dict[str, list]:
        keras = import_keras()
        values = keras.tree.flatten(self.plan.graph._standardize_inputs(inputs))
        found = {}
        for k in range(1, self.plan.depths + 1):
            values, packed = self.steps[k](values)
            found.update({name: [moments] for name, moments in self.steps[k].moments(packed).items()})
        return found


_PLANS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _plan_and_steps(model, layers):
    """The plan and traced steps of ``model`` for these layers, kept with the model (weakly) so the
    next recalibration reuses the traces."""
    key = tuple((name, id(bn)) for name, bn in layers)
    kept = _PLANS.setdefault(model, {})
    if key not in kept or kept[key][0].graph is not _graph(model):  # a Sequential rebuilds its graph when changed
        plan = _Plan(model, layers)
        kept[key] = plan, {k: _Step(plan, k) for k in range(1, plan.depths + 1)}
    return kept[key]


def solve_eval_statistics(model, layers, source, *, max_samples=None, progress=False,
                          cache_mb: float = DEFAULT_CACHE_MB, mix: Callable | None = None) -> SweepResult:
    """The eval-mode statistics of ``layers`` (``[(name, bn)]``, the BNs to recalibrate) of
    ``model`` over ``source()`` (a zero-argument callable giving one pass of batches, read again
    only for batches whose frontier did not fit in ``cache_mb`` MiB). ``mix(moments, samples)``,
    where given, turns each depth's moments into the statistics its BNs normalise with (a source
    prior); the result holds the unmixed moments. The BNs' statistics are put back afterwards.
    """
    try:
        plan, steps = _plan_and_steps(model, layers)
    except _Refused as exc:
        return SweepResult(refusal=str(exc))
    if not plan.bn_nodes:
        return SweepResult(refusal="no BatchNormalization in the model's graph")
    keras = import_keras()
    bns = dict(layers)
    budget = cache_mb * 2**20
    result = SweepResult(depths=plan.depths)
    cached: list = []  # per batch: its frontier after the last step, or None (recompute from the data)
    fingerprints: list = []
    sizes: list = []
    work = 0.0
    found: dict[str, ChannelMoments] = {}

    def run_from(values, start, k, index):
        nonlocal work
        moments = None
        for step in range(start, k + 1):  # the model's own input checks and error wording at step 1
            values, moments = run_forward(lambda _, batch: steps[step](batch), model if step == 1 else None,
                                          values, index)
            work += plan.step_cost[step] * sizes[index]
        return values, moments

    try:
        with statistics_put_back(list(bns.values())):
            for k in range(1, plan.depths + 1):
                level = {name: None for name in plan.targets[k]}
                held = 0
                if k == 1:
                    current = _data_pass(source, max_samples, progress, "depth 1")
                    batches = ((index, inputs, batch_fingerprint(first)) for index, (inputs, first) in current)
                else:
                    batches = _reread(source, max_samples, cached, fingerprints)
                for index, inputs, fingerprint in batches:
                    if k == 1:
                        flat = keras.tree.flatten(plan.graph._standardize_inputs(inputs))
                        fingerprints.append(fingerprint)
                        sizes.append(len(flat[0]))
                        values, moments = run_from(flat, 1, 1, index)
                    elif cached[index] is not None:
                        values, moments = run_from(cached[index], k, k, index)
                    else:
                        flat = keras.tree.flatten(plan.graph._standardize_inputs(inputs))
                        values, moments = run_from(flat, 1, k, index)
                    for name, (count, mean, var) in steps[k].moments(moments).items():
                        if level[name] is None:
                            level[name] = ChannelMoments.empty(int(mean.shape[0]))
                        level[name].add_batch(count, mean, var)
                    size = sum(int(np.prod(v.shape)) * np.dtype(keras.backend.standardize_dtype(v.dtype)).itemsize
                               for v in values)
                    keep = k < plan.depths and held + size <= budget
                    held += size if keep else 0
                    if k == 1:
                        cached.append(values if keep else None)
                    else:
                        cached[index] = values if keep else None
                result.cached_bytes_peak = max(result.cached_bytes_peak, held)
                if k == 1:
                    result.batches, result.samples = current.batches, current.samples
                level = {name: m for name, m in level.items() if m is not None}
                found.update(level)
                use = mix(level, result.samples) if mix is not None else level
                assign_values([v for name in use for v in (bns[name].moving_mean, bns[name].moving_variance)],
                              [v for m in use.values() for v in (m.mean, m.variance)])
    except _OrderChanged:
        return SweepResult(refusal="the data came back in another order when a batch had to be read again")
    result.moments, result.forward = found, SweepForward(plan, steps)
    result.forward_equivalents = work / (plan.full_cost * max(sum(sizes), 1))
    return result


def _reread(source, max_samples, cached, fingerprints):
    """The batches of a later step: cached ones as they are, the others read again from the data
    (in the first step's order, or refused)."""
    if all(values is not None for values in cached):
        for index in range(len(cached)):
            yield index, None, fingerprints[index]
        return
    for index, (inputs, first) in _data_pass(source, max_samples):
        fingerprint = batch_fingerprint(first)
        if index >= len(fingerprints) or not math.isclose(fingerprint, fingerprints[index], rel_tol=1e-9, abs_tol=1e-9):
            raise _OrderChanged()
        yield index, inputs, fingerprint


def _data_pass(source, max_samples, progress=False, description=None) -> DataPass:
    """One pass over ``source()``, each batch prepared as the recalibration's passes prepare it."""
    return DataPass(source(), lambda batch, index, remaining: prepare_batch(batch, remaining), max_samples=max_samples,
                    progress=progress, description=description)


class _OrderChanged(Exception):
    pass

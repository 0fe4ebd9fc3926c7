"""The graph side of the eval-mode sweep (:mod:`bncal.torch.eval_sweep`): a torch.fx trace of the
model, cut into segments by BatchNorm depth.

Depth: a node's depth is the largest number of recalibrated BN calls on any path from the
inputs to it (a BN call counts itself). A BN at depth ``k`` normalises an input that depends
only on BNs of depth below ``k``, so once those hold their final statistics its input, over
all data, is final too. Segment ``s`` holds the nodes of depth ``s``; it needs only values of
depth ``<= s``. After segment ``s`` has run on a batch, the values still needed by deeper nodes
(skip connections included) form the frontier ``frontiers[s]``, and the inputs of every BN of
depth ``s + 1`` are among them.

Only the nodes some BN input depends on run; the head after the last BN never does.
In-place ops run as their out-of-place twins (segments reorder nodes across branches, and a
stored frontier must not change under a later op); a graph that reads a value after an
in-place op changed it is refused.
"""

from __future__ import annotations

import inspect
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.node import Node, map_arg
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import first_line
from .passes import default_call

__all__ = ["SweepRefused", "SweepPlan", "build_plan"]


class SweepRefused(Exception):
    """The sweep cannot solve this model or data; the message says why (the caller falls back)."""


class _BatchNormLeafTracer(fx.Tracer):
    """torch.fx's tracer with every BatchNorm (subclasses included) kept as one call."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, _BatchNorm) or super().is_leaf_module(m, module_qualified_name)


_INPLACE_OPERATORS = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
                      operator.itruediv: operator.truediv, operator.ifloordiv: operator.floordiv,
                      operator.imod: operator.mod, operator.ipow: operator.pow, operator.imatmul: operator.matmul,
                      operator.iand: operator.and_, operator.ior: operator.or_, operator.ixor: operator.xor}
# Ops whose result may share memory with their first input (an in-place op on one changes both).
_VIEW_METHODS = {"view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "squeeze", "unsqueeze",
                 "transpose", "permute", "t", "expand", "expand_as", "narrow", "select", "unbind", "split",
                 "chunk", "contiguous", "detach", "movedim", "unfold", "diagonal", "as_strided"}
_VIEW_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.transpose, torch.permute,
                   torch.t, torch.narrow, torch.select, torch.split, torch.chunk, torch.unbind, torch.movedim,
                   torch.detach, operator.getitem}
_VIEW_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten, nn.modules.dropout._DropoutNd)


@dataclass(frozen=True)
class NodeCall:
    """One graph node made executable: ``call(env)`` computes its value from ``env`` (node -> value)."""

    kind: str  # call_module, call_function or call_method
    target: object  # the module, the function, or the method name
    args: tuple
    kwargs: dict

    def inputs(self, env):
        return map_arg(self.args, env.__getitem__), map_arg(self.kwargs, env.__getitem__)

    def __call__(self, env):
        args, kwargs = self.inputs(env)
        if self.kind == "call_method":
            return getattr(args[0], self.target)(*args[1:], **kwargs)
        return self.target(*args, **kwargs)


class SweepPlan:
    """A traced model cut into depth segments; see the module docstring.

    ``bn_nodes[s]``: ``(layer name, node)`` of every recalibrated BN of depth ``s + 1``, whose
    moments are taken after segment ``s``. ``cost[node]`` and ``bytes[node]`` (per sample) are
    filled in by the driver's probe.
    """

    def __init__(self, root, signature, binding_key, graph, layer_names):
        self.root, self.signature, self.binding_key = root, signature, binding_key
        self.nodes = [n for n in graph.nodes if n.op != "output"]
        self.order = {n: i for i, n in enumerate(self.nodes)}
        self.placeholders = [n for n in self.nodes if n.op == "placeholder"]
        self.constants = {n: _fetch_attr(root, n.target) for n in self.nodes if n.op == "get_attr"}
        self.bn_of = _batchnorm_calls(root, self.nodes, layer_names)
        self.calls = {n: _node_call(root, n) for n in self.nodes if n.op.startswith("call_")}
        _refuse_reads_after_mutation(root, self.nodes, self.order)
        self.depth = _depths(self.nodes, self.bn_of)
        self.depths = max((self.depth[n] for n in self.bn_of), default=0)
        self.needed = _ancestors([a for b in self.bn_of for a in b.all_input_nodes])
        self.segments = [[n for n in self.nodes if n in self.needed and n in self.calls and self.depth[n] == s]
                         for s in range(self.depths)]
        self.frontiers = _frontiers(self.nodes, self.needed, self.bn_of, self.depth, self.depths)
        self.bn_nodes = [[(self.bn_of[n], n) for n in self.nodes if n in self.bn_of and self.depth[n] == s + 1]
                         for s in range(self.depths)]
        self.cost: dict[Node, float] = {}
        self.bytes: dict[Node, float] = {}
        self._runs: dict[tuple[int, int], tuple] = {}

    def bind(self, batch) -> dict[Node, object]:
        """Placeholder values for one batch under the default call convention."""
        arguments = _bind(self.signature, batch)
        if _binding_key(arguments) != self.binding_key:
            raise SweepRefused("the batches do not all pass the same inputs to the model (the trace was made for "
                               "the first batch's)")
        return dict(zip(self.placeholders, arguments.values()))

    def run_list(self, start: int, stop: int):
        """Nodes that take a batch from frontier ``start`` (-1: the inputs) to frontier ``stop``,
        the values to drop after each, and their cost per sample."""
        key = (start, stop)
        if key not in self._runs:
            nodes = [n for segment in self.segments[start + 1:stop + 1] for n in segment]
            keep = set(self.frontiers[stop])
            last = {a: i for i, n in enumerate(nodes) for a in n.all_input_nodes}
            release = [[] for _ in nodes]
            for value, i in last.items():
                if value not in keep and value not in self.constants:
                    release[i].append(value)
            self._runs[key] = nodes, release, sum(self.cost.get(n, 0.0) for n in nodes)
        return self._runs[key]

    def execute(self, nodes, release, env) -> None:
        for node, drop in zip(nodes, release):
            env[node] = self.calls[node](env)
            for value in drop:
                env.pop(value, None)

    def frontier_cost(self) -> tuple[list[float], list[float]]:
        """Per sample: each segment's cost, each frontier's bytes (from the probe)."""
        segment_cost = [sum(self.cost.get(n, 0.0) for n in seg) for seg in self.segments]
        frontier_bytes = [sum(self.bytes.get(n, 0.0) for n in f) for f in self.frontiers]
        return segment_cost, frontier_bytes


def build_plan(model: nn.Module, layer_names: dict[int, str], batch) -> SweepPlan:
    """Trace ``model`` (every module already in eval mode) for ``batch``'s call; ``layer_names``
    maps ``id(bn)`` to its name for the BNs to solve. Raises :class:`SweepRefused`."""
    root = nn.Sequential(model) if isinstance(model, _BatchNorm) else model
    signature = inspect.signature(root.forward)
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in signature.parameters.values()):
        raise SweepRefused("the model's forward takes *args or **kwargs, which torch.fx cannot trace")
    arguments = _bind(signature, batch)
    concrete = {k: v for k, v in arguments.items() if not isinstance(v, torch.Tensor)}
    if any(_holds_tensor(v) for v in concrete.values()):
        raise SweepRefused("an input is a container of tensors, which the sweep does not trace")
    tracer = _BatchNormLeafTracer()
    _refuse_hidden_hooks(root, tracer)
    try:
        graph = tracer.trace(root, concrete_args=concrete or None)
    except Exception as exc:  # any failure to trace means: use the repeated passes instead
        raise SweepRefused(f"torch.fx cannot trace the model ({first_line(exc)})") from exc
    placeholders = sum(n.op == "placeholder" for n in graph.nodes)
    if placeholders != len(arguments):
        raise SweepRefused(f"the trace has {placeholders} inputs, the forward {len(arguments)}")
    return SweepPlan(root, signature, _binding_key(arguments), graph, layer_names)


def _refuse_hidden_hooks(root, tracer) -> None:
    """The trace runs the forward of every module it enters, not its hooks: refuse hooks it would lose."""
    from torch.nn.modules import module as torch_module

    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        raise SweepRefused("global module forward hooks are registered, which the trace would not run")
    for qualname, m in root.named_modules():
        if (m._forward_hooks or m._forward_pre_hooks) and (m is root or not tracer.is_leaf_module(m, qualname)):
            raise SweepRefused(f"module {qualname or '<root>'} has forward hooks, which the trace would not run")


def node_cost(call: NodeCall, env, out) -> float:
    """A cheap compute estimate of one executed node: multiply-adds for convolutions, linear
    layers and matrix products, one unit per output element for everything else."""
    numel = _numel(out)
    target = call.target
    if isinstance(target, nn.modules.conv._ConvTransposeNd):
        args, _ = call.inputs(env)
        return _numel(args[0]) * target.out_channels // target.groups * math.prod(target.kernel_size)
    if isinstance(target, nn.modules.conv._ConvNd):
        return numel * target.in_channels // target.groups * math.prod(target.kernel_size)
    if isinstance(target, nn.Linear):
        return numel * target.in_features
    if target in (F.conv1d, F.conv2d, F.conv3d, F.linear, torch.matmul, torch.mm, torch.bmm, operator.matmul):
        args, kwargs = call.inputs(env)
        weight = args[1] if len(args) > 1 else kwargs.get("weight", kwargs.get("other"))
        if isinstance(weight, torch.Tensor) and weight.dim() >= 1:
            if target in (F.conv1d, F.conv2d, F.conv3d):
                return numel * weight[0].numel()
            return numel * weight.shape[-1 if target is F.linear else 0 if weight.dim() == 1 else -2]
    return float(numel)


def tensor_bytes(value) -> int:
    """Bytes of the distinct storages behind every tensor in ``value`` (nested tuples, lists, dicts)."""
    seen = {}
    for t in _tensors(value):
        storage = t.untyped_storage()
        seen[(t.device, storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


def _numel(value) -> int:
    return sum(t.numel() for t in _tensors(value))


def _holds_tensor(value) -> bool:
    return next(_tensors(value), None) is not None


def _bind(signature, batch):
    args, kwargs = default_call(batch)
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise SweepRefused(f"a batch does not fit the model's forward ({first_line(exc)})") from exc
    bound.apply_defaults()
    return bound.arguments


def _binding_key(arguments) -> tuple:
    return tuple((k, "tensor" if isinstance(v, torch.Tensor) else repr(v)) for k, v in arguments.items())


def _fetch_attr(root, target: str):
    value = root
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _batchnorm_calls(root, nodes, layer_names) -> dict[Node, str]:
    """Node -> layer name of every call of a BN to solve; refuses a BN called twice or read as attributes."""
    calls: dict[Node, str] = {}
    for n in nodes:
        if n.op == "call_module" and id(root.get_submodule(n.target)) in layer_names:
            calls[n] = layer_names[id(root.get_submodule(n.target))]
        elif n.op == "get_attr" and "." in n.target:
            owner = id(root.get_submodule(n.target.rsplit(".", 1)[0]))
            if owner in layer_names:
                raise SweepRefused(f"BatchNorm {layer_names[owner]} is used outside its own call ({n.target})")
    names = list(calls.values())
    for name in dict.fromkeys(names):
        if names.count(name) > 1:
            raise SweepRefused(f"BatchNorm {name} is called {names.count(name)} times per forward: its "
                               "statistics pool inputs of several depths, which no sweep can order")
    return calls


def _node_call(root, node: Node) -> NodeCall:
    """The node as a call, an in-place op replaced by its out-of-place twin (see :func:`_mutated_input`)."""
    target, args, kwargs = node.target, node.args, dict(node.kwargs)
    if node.op == "call_module":
        return NodeCall(node.op, root.get_submodule(target), args, kwargs)
    if node.op == "call_method" and _inplace_name(target):
        if not hasattr(torch.Tensor, target[:-1]):
            raise SweepRefused(f"the in-place method {target} has no out-of-place twin the sweep knows")
        return NodeCall(node.op, target[:-1], args, kwargs)
    if node.op == "call_method":
        return NodeCall(node.op, target, args, kwargs)
    if target in _INPLACE_OPERATORS:
        return NodeCall(node.op, _INPLACE_OPERATORS[target], args, kwargs)
    flag_off = _without_inplace_flag(target, args, kwargs)
    if flag_off is not None:
        return NodeCall(node.op, target, *flag_off)
    if _inplace_name(getattr(target, "__name__", "")):
        return NodeCall(node.op, _out_of_place_twin(target), args, kwargs)
    return NodeCall(node.op, target, args, kwargs)


def _inplace_name(name: str) -> bool:
    return name.endswith("_") and not name.endswith("__")


def _without_inplace_flag(target, args, kwargs):
    """``(args, kwargs)`` with ``inplace=False`` for a call made with ``inplace=True``
    (keyword or positional), else None."""
    if kwargs.get("inplace") is True:
        return args, {**kwargs, "inplace": False}
    if not _has_signature(target) or "inplace" not in inspect.signature(target).parameters:
        return None
    try:
        bound = inspect.signature(target).bind(*args, **kwargs)
    except TypeError:
        return None
    if bound.arguments.get("inplace") is not True:
        return None
    bound.arguments["inplace"] = False
    return bound.args, bound.kwargs


def _has_signature(target) -> bool:
    """Python functions only: builtins take no ``inplace`` flag, and parsing theirs is slow."""
    return inspect.isfunction(target)


def _out_of_place_twin(target) -> Callable:
    name = target.__name__[:-1]
    for namespace in (inspect.getmodule(target), torch, F):
        twin = getattr(namespace, name, None) if namespace is not None else None
        if callable(twin):
            return twin
    raise SweepRefused(f"the in-place op {target.__name__} has no out-of-place twin the sweep knows")


def _mutated_input(node: Node):
    """The node an in-place op changes (None for other nodes); ``x[i] = v`` is refused."""
    if node.op == "call_function" and node.target is operator.setitem:
        raise SweepRefused("the forward assigns into a tensor (x[...] = v), which the sweep cannot reorder")
    inplace = (node.op == "call_method" and _inplace_name(node.target)) or (node.op == "call_function" and (
        node.target in _INPLACE_OPERATORS or _inplace_name(getattr(node.target, "__name__", ""))
        or _without_inplace_flag(node.target, node.args, node.kwargs) is not None))
    first = node.args[0] if node.args else None
    return first if inplace and isinstance(first, Node) else None


def _refuse_reads_after_mutation(root, nodes, order) -> None:
    """Out-of-place twins are exact unless a later node reads the changed value (or a view of it)."""
    for node in nodes:
        changed = _mutated_input(node)
        if changed is None:
            continue
        for alias in _aliases(root, changed):
            late = [u for u in alias.users if u is not node and order.get(u, -1) > order[node]]
            if late:
                raise SweepRefused(f"the in-place op {node.name} changes {alias.name}, which {late[0].name} reads "
                                   "afterwards; the sweep runs in-place ops out of place")


def _aliases(root, start: Node) -> set[Node]:
    """``start`` and every node that may share its memory through view-like ops, both ways."""
    group, todo = set(), [start]
    while todo:
        n = todo.pop()
        if n in group:
            continue
        group.add(n)
        if _is_view(root, n) and n.args and isinstance(n.args[0], Node):
            todo.append(n.args[0])
        todo.extend(u for u in n.users if _is_view(root, u) and u.args and u.args[0] is n)
    return group


def _is_view(root, node: Node) -> bool:
    if node.op == "call_method":
        return node.target in _VIEW_METHODS
    if node.op == "call_function":
        return node.target in _VIEW_FUNCTIONS
    return node.op == "call_module" and isinstance(root.get_submodule(node.target), _VIEW_MODULES)


def _depths(nodes, bn_of) -> dict[Node, int]:
    depth: dict[Node, int] = {}
    for n in nodes:
        depth[n] = max((depth[a] for a in n.all_input_nodes), default=0) + (1 if n in bn_of else 0)
    return depth


def _ancestors(starts) -> set[Node]:
    seen, todo = set(), list(starts)
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return seen


def _frontiers(nodes, needed, bn_of, depth, depths) -> list[list[Node]]:
    """``frontiers[s]``: stored values of depth <= s that a node deeper than s (or a BN's moments) needs."""
    reach = {}
    for n in nodes:
        if n in needed and n.op != "get_attr":
            users = [depth[u] for u in n.users if u in needed or u in bn_of]
            reach[n] = max(users, default=-1)
    return [[n for n, last in reach.items() if depth[n] <= s < last] for s in range(depths)]

"""Apply the rulebook (:mod:`.rules`) to a graph view, BN by BN in graph order.

For each BN: its own checks, then *into the preceding op*, then *into the following op*, then
(with ``bn_to_affine``) *to an affine map*. A direction finds its neighbour by walking the data
flow through the see-through ops (and, after the BN, through one Flatten/Reshape to
``(N, C * prod(S))``); every op on the way must feed only the next one. A refusal names the first
check that failed, for each direction. The view is edited as the fold will be (the BN bypassed,
the neighbour's parameters replaced by float64 masters), so later BNs see the graph as it will
be: ``Conv -> BN -> BN`` folds twice into one Conv, rounded once.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from . import affine
from .graph import Graph, Node
from .rules import (BN_CHECKS, BN_FOLD_CHECKS, INTO_FOLLOWING, INTO_PRECEDING, RULES, SEE_THROUGH, TARGET_CHECKS,
                    TO_AFFINE, Match, Rule)

__all__ = ["Step", "plan"]


class Refused(Exception):
    """A fold does not apply; the message is the reason a report shows."""


@dataclasses.dataclass(eq=False)
class Step:
    """What :func:`plan` decided for one BN, and the edits the backend must make."""

    bn: Node
    direction: str | None  # None: left as it is
    target: Node | None = None
    reason: str | None = None
    bypassed: list[tuple[Node, int]] = dataclasses.field(default_factory=list)  # (node, its data input)
    scale_shift: tuple[np.ndarray, np.ndarray] | None = None  # of a to-affine BN
    dropped_attrs: tuple[str, ...] = ()  # attributes the rewrite of ``target`` removed


def plan(graph: Graph, *, bn_to_affine: bool = False) -> list[Step]:
    """Decide every BN of ``graph`` in graph order, editing ``graph`` as the folds will."""
    return [_decide(graph, bn, bn_to_affine) for bn in graph.batchnorms()]


def _decide(graph: Graph, bn: Node, bn_to_affine: bool) -> Step:
    if reason := _first(BN_CHECKS, graph, bn):
        return Step(bn, None, reason=reason)
    p = bn.params
    scale, shift = affine.bn_scale_shift(p[1].array, p[2].array, p[3].array, p[4].array, bn.attrs.get("epsilon", 1e-5))
    reasons = []
    if reason := _first(BN_FOLD_CHECKS, graph, bn):
        reasons.append(reason)
    else:
        for direction, find in ((INTO_PRECEDING, _preceding), (INTO_FOLLOWING, _following)):
            try:
                match, rule = find(graph, bn, scale, shift)
            except Refused as refusal:
                reasons.append(f"{direction.removeprefix('into-')}: {refusal}")
                continue
            return _apply(graph, match, rule, direction)
    reason = "; ".join(reasons)
    if bn_to_affine:
        if problem := _to_affine_problem(graph, bn):
            return Step(bn, None, reason=f"{reason}; to-affine: {problem}")
        bn.op, bn.params = "Add", {}  # later BNs see the Mul + Add
        return Step(bn, TO_AFFINE, reason=reason, scale_shift=(scale, shift))
    return Step(bn, None, reason=reason)


def _first(checks, *args) -> str | None:
    return next((reason for check in checks if (reason := check(*args))), None)


def _apply(graph: Graph, match: Match, rule: Rule, direction: str) -> Step:
    """Edit the view as the fold will: new float64 parameters on the neighbour, BN bypassed."""
    rewrite, target = rule.rewrite(match), match.target
    target.op = rewrite.op
    for name in rewrite.drop_attrs:
        target.attrs.pop(name, None)
    weight = target.params[1]
    bias = target.params.get(2) or match.added_bias
    target.params[1] = dataclasses.replace(weight, array=rewrite.weight)
    target.params[2] = (dataclasses.replace(bias, array=rewrite.bias, dtype=weight.dtype) if bias is not None else
                        dataclasses.replace(weight, name=f"{weight.name}_bias", array=rewrite.bias, handle=None))
    target.changed = True
    bypassed = [*([match.bias_add] if match.bias_add else []), (match.bn, 0)]
    for node, data in bypassed:
        graph.bypass(node, data)
    return Step(match.bn, direction, target, bypassed=bypassed, dropped_attrs=rewrite.drop_attrs)


def _to_affine_problem(graph: Graph, bn: Node) -> str | None:
    source = bn.inputs[0]
    shape = source.shape if source is not None else None
    if shape is None or source.dtype is None:
        name = source.output if source is not None else "?"
        return f"the rank or type of its input '{name}' is unknown (shape inference gave none)"
    if len(shape) < 2:
        return f"its input '{source.output}' has rank {len(shape)}, below 2"
    if graph.opset is not None and graph.opset < 7:
        return "opset < 7 has no broadcasting Mul/Add"
    return None


# --------------------------------------------------------------------------- finding the neighbour

def _rule_for(direction: str, op: str) -> Rule | None:
    return next((rule for rule in RULES if rule.direction == direction and op in rule.ops), None)


def _sole_use_problem(node: Node, user: Node) -> str | None:
    if node.graph_output:
        return f"{node.op} output '{node.output}' is also a graph output"
    others = sorted({u.name for u, _ in node.users if u is not user})
    if others:
        return f"{node.op} output '{node.output}' also feeds {', '.join(others)} (its output is used elsewhere)"
    return None


def _preceding(graph: Graph, bn: Node, scale, shift) -> tuple[Match, Rule]:
    consumer, source, axis = bn, bn.inputs[0], 1
    while source is not None and source.op in SEE_THROUGH:
        axis, why = SEE_THROUGH[source.op](source, axis, True)
        if why is not None:
            raise Refused(f"its input comes from {source.op} {source.name} ({why})")
        if problem := _sole_use_problem(source, consumer):
            raise Refused(problem)
        consumer, source = source, source.inputs[0]
    if source is None or source.op == "Input":
        raise Refused(f"its input '{source.output if source is not None else '?'}' is not produced by an op")
    bias_add = None
    if source.op == "Add" and (matmul := _matmul_of_bias_add(source)) is not None \
            and not _sole_use_problem(matmul[0], source) and not _sole_use_problem(source, consumer):
        bias_add, consumer, source = (source, matmul[1]), source, matmul[0]
    rule = _rule_for(INTO_PRECEDING, source.op)
    if rule is None:
        raise Refused(f"its input comes from {source.op}, not Conv, ConvTranspose, Gemm or MatMul")
    match = Match(graph, bn, scale, shift, source, bias_add=bias_add)
    _check_target(match, rule, axis, _sole_use_problem(source, consumer))
    return match, rule


def _matmul_of_bias_add(add: Node) -> tuple[Node, int] | None:
    """``(MatMul, its input index)`` of ``Add(MatMul(x, W), b)`` with a constant ``b``."""
    if len(add.inputs) != 2:
        return None
    return next(((source, data) for data, source in enumerate(add.inputs)
                 if source is not None and source.op == "MatMul" and (1 - data) in add.params), None)


def _following(graph: Graph, bn: Node, scale, shift) -> tuple[Match, Rule]:
    node, axis, repeat, reshaped = bn, 1, 1, False
    while True:
        what = "its output" if node is bn else f"{node.op} output"
        if node.graph_output:
            raise Refused(f"{what} '{node.output}' is a graph output")
        if len(node.users) != 1:
            raise Refused(f"{what} '{node.output}' feeds {len(node.users)} inputs")
        consumer, index = node.users[0]
        if index != 0:
            raise Refused(f"{what} is input {index} of {consumer.op}, not the data input")
        if consumer.op in SEE_THROUGH:
            axis, why = SEE_THROUGH[consumer.op](consumer, axis, False)
            if why is not None:
                raise Refused(f"{what} feeds {consumer.op} {consumer.name} ({why})")
        elif consumer.op == "Reshape" and not reshaped:
            repeat, reshaped, axis = _flatten_repeat(consumer, axis, scale.shape[0]), True, 1
        else:
            break
        node = consumer
    rule = _rule_for(INTO_FOLLOWING, consumer.op)
    if rule is None:
        raise Refused(f"{what} feeds {consumer.op}, not Conv, Gemm or Flatten/Reshape -> Gemm")
    match = Match(graph, bn, scale, shift, consumer, repeat=repeat, reshaped=reshaped)
    _check_target(match, rule, axis, None)
    return match, rule


def _flatten_repeat(reshape: Node, axis: int, channels: int) -> int | None:
    """Features per channel when ``reshape`` maps ``(A, C, *S)`` to ``(A, C * prod(S))``
    (None: it does, but ``prod(S)`` is unknown); refuse when it may do anything else.

    Row-major, so feature ``f`` belongs to channel ``f // prod(S)``. Axis 0 is kept when the op
    says so, when the shapes show it, or when the features are all of ``C * prod(S)``.
    """
    if axis != 1:
        raise Refused(f"{reshape.op} {reshape.name} reads the channels on axis {axis}, not 1")
    source, out = reshape.input_shape(0), reshape.shape
    rank = len(out) if out is not None else reshape.attrs.get("rank")
    spatial = math.prod(source[2:]) if source is not None and all(isinstance(d, int) for d in source[2:]) else None
    features = out[1] if out is not None and len(out) == 2 and isinstance(out[1], int) else None
    rows_kept = (reshape.attrs.get("keeps_axis0")
                 or (out is not None and source is not None and out[0] is not None and out[0] == source[0])
                 or (features is not None and spatial is not None and features == channels * spatial))
    if rank != 2 or not rows_kept:
        target = list(out) if out is not None else reshape.attrs.get("target")
        raise Refused(f"{reshape.op} to {target} may not keep the batch axis of its input "
                      f"{list(source) if source is not None else ''} (a flatten to (N, C*S) is needed)")
    if spatial is None and features is not None and features % channels == 0:
        spatial = features // channels
    return spatial


def _check_target(match: Match, rule: Rule, axis: int, use_problem: str | None) -> None:
    """Refuse, naming the neighbour, unless it passes every check."""
    def refuse(reason):
        raise Refused(f"{match.target.name} ({match.target.op}): {reason}")

    if reason := _first(TARGET_CHECKS, match.graph, match.target, match.bn):
        refuse(reason)
    if use_problem:
        refuse(use_problem)
    if axis != 1:
        refuse(f"the Transposes on the way put the BN's channels on its axis {axis}, not 1")
    if reason := _first(rule.checks, match):
        refuse(reason)

"""The fold rulebook: when an inference BatchNorm folds into a neighbour, and why not.

One set of rules for every path: :func:`bncal.fold_onnx` (an ONNX graph), :func:`bncal.fold` and
:func:`bncal.analyze_foldability` (a PyTorch model, which ``bncal inspect`` shows), and so
``fold-export``. Each backend presents its graph in ONNX vocabulary (:mod:`.graph`); the
planner (:mod:`.planner`) applies these units to it:

- :data:`BN_CHECKS` -- the BN itself: a BN failing one is left alone. :data:`BN_FOLD_CHECKS`
  keep it from folding but still allow an affine map.
- :data:`SEE_THROUGH` -- ops the per-channel affine map commutes with, so a fold looks through
  them: Identity, a Cast to the same type, Transposes that bring the channels back to axis 1, a
  Pad that copies values (reflect/edge/wrap) or adds none.
- :data:`RULES` -- one per kind of neighbour and direction: the op types, the checks that
  refuse (each returns the reason or None), and the rewrite. :data:`TARGET_CHECKS` apply to
  every neighbour.

Checks that read :class:`~.graph.ModuleFacts` are the PyTorch-only ones (an ONNX view has no
module facts, so they never refuse there). The arithmetic is in :mod:`.affine`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from . import affine
from .graph import Graph, Node, Param

__all__ = ["INTO_PRECEDING", "INTO_FOLLOWING", "TO_AFFINE", "Match", "Rewrite", "Rule", "BN_CHECKS",
           "BN_FOLD_CHECKS", "TARGET_CHECKS", "RULES", "SEE_THROUGH", "param_problem"]

INTO_PRECEDING = "into-preceding"
INTO_FOLLOWING = "into-following"
TO_AFFINE = "to-affine"


@dataclasses.dataclass(eq=False)
class Match:
    """A BN (as ``scale * x + shift``) and the neighbour a rule may fold it into."""

    graph: Graph
    bn: Node
    scale: np.ndarray
    shift: np.ndarray
    target: Node
    bias_add: tuple[Node, int] | None = None  # MatMul's ``Add(MatMul(x, W), b)`` and its data input
    repeat: int | None = 1  # features per channel after a flatten; None: take it from the weight
    reshaped: bool = False

    @property
    def channels(self) -> int:
        return self.scale.shape[0]

    @property
    def added_bias(self) -> Param | None:
        """The constant the bias Add adds (None without one, or if it adds no constant)."""
        return self.bias_add[0].params.get(1 - self.bias_add[1]) if self.bias_add else None


@dataclasses.dataclass(frozen=True)
class Rewrite:
    """The folded neighbour: its op type, new weight and bias (float64), attributes to drop."""

    op: str
    weight: np.ndarray
    bias: np.ndarray
    drop_attrs: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Rule:
    """A BN folding into one kind of neighbour: the op types, the checks that refuse, and the
    rewrite (None: recognised but never exact)."""

    direction: str
    ops: tuple[str, ...]
    checks: tuple[Callable[[Match], str | None], ...]
    rewrite: Callable[[Match], Rewrite] | None


# --------------------------------------------------------------------------- parameters

def param_problem(graph: Graph, node: Node, index: int, role: str) -> str | None:
    """Why input ``index`` of ``node`` is not a constant the fold may read (None if it is)."""
    param = node.params.get(index)
    if param is None:
        source = node.inputs[index] if index < len(node.inputs) else None
        if source is None:
            return f"{node.op} {role} input is missing"
        return f"{node.op} {role} '{source.output}' is not a constant initializer"
    if param.array is None:
        return f"{node.op} {role} '{param.name}' is not a constant initializer"
    if param.overridable:
        old_ir = " (IR < 4 model)" if graph.old_ir else ""
        return (f"parameter '{param.name}' is also a graph input{old_ir}, so it can be overridden at run time; "
                "if it never is, treat such inputs as constants (fold-export --constant-initializer-inputs, "
                "treat_initializer_inputs_as_constant=True) or re-save without them (strip_initializer_inputs)")
    return None


def _array(node: Node, index: int) -> np.ndarray | None:
    param = node.params.get(index)
    return None if param is None else param.array


def _is_float(dtype: str | None) -> bool:
    return dtype is not None and dtype.startswith(("float", "bfloat"))


def _module_check(attr: str, message: str) -> Callable[..., str | None]:
    """A check on the PyTorch module behind a node: ``message`` if its fact ``attr`` holds."""
    def check(graph, node, *_):
        facts = node.module
        return message.format(type=facts.type_name) if facts is not None and getattr(facts, attr) else None
    return check


# --------------------------------------------------------------------------- the BN itself

def _bn_mode(graph: Graph, bn: Node) -> str | None:
    if bn.attrs.get("training_mode"):
        return "training-mode BatchNormalization"
    if bn.attrs.get("training_outputs_used"):
        return "its running mean/variance outputs are used (training outputs)"
    if bn.attrs.get("spatial", 1) == 0:
        return "spatial=0 (per-activation statistics) is not supported"
    return None


def _bn_constants(graph: Graph, bn: Node) -> str | None:
    for index, role in enumerate(("scale", "bias", "mean", "var"), 1):
        if problem := param_problem(graph, bn, index, role):
            return problem
    if not _is_float(bn.params[3].dtype):
        return f"BN statistics have non-floating dtype {bn.params[3].dtype}"
    if len({bn.params[i].array.shape for i in range(1, 5)}) != 1 or bn.params[1].array.ndim != 1:
        return "scale, bias, mean and var are not per-channel vectors of one length"
    return None


def _bn_values(graph: Graph, bn: Node) -> str | None:
    var = bn.params[4].array.astype(np.float64)
    if not np.all(var + bn.attrs.get("epsilon", 1e-5) > 0):  # also catches NaN
        return "var + epsilon is not positive for every channel"
    if not all(np.all(np.isfinite(bn.params[i].array.astype(np.float64))) for i in range(1, 5)):
        return "its parameters are not finite"
    return None


BN_CHECKS = (
    _module_check("overrides_forward", "{type} overrides forward (e.g. adds an activation); "
                  "folding would drop its extra behaviour"),
    _module_check("no_running_stats", "BN has no running statistics (track_running_stats=False): it "
                  "normalises with batch statistics even in eval mode"),
    _module_check("hooks", "BN has forward hooks, which folding would bypass"),
    _module_check("read_elsewhere", "BN parameters or buffers are read elsewhere in forward"),
    _module_check("extra_arguments", "BN is called with extra arguments"),
    _bn_mode,
    _bn_constants,
    _bn_values,
)


def _bn_called_more_than_once(graph: Graph, bn: Node) -> str | None:
    calls = bn.module.calls if bn.module is not None else 1
    return f"BN module is called more than once ({calls} times) in forward" if calls > 1 else None


BN_FOLD_CHECKS = (_bn_called_more_than_once,)


# --------------------------------------------------------------------------- any neighbour

def _module_calls(graph: Graph, target: Node, bn: Node) -> str | None:
    calls = target.module.calls if target.module is not None else 1
    return f"its module is called more than once ({calls} times)" if calls != 1 else None


def _mixed_dtypes(graph: Graph, target: Node, bn: Node) -> str | None:
    weight = target.params.get(1)
    if weight is None:
        return None  # the rule's own check says what is missing
    dtypes = {weight.dtype} | {bn.params[i].dtype for i in range(1, 5)}
    if len(dtypes) > 1:
        return f"mixed dtypes ({', '.join(sorted(str(d) for d in dtypes))})"
    if not _is_float(weight.dtype):
        return f"its weight has non-floating dtype {weight.dtype}"
    return None


TARGET_CHECKS = (
    _module_check("overrides_forward", "{type} overrides forward"),
    _module_check("parametrized", "its weight is parametrized"),
    _module_check("hooks", "it has forward hooks"),
    _module_calls,
    _module_check("read_elsewhere", "its weights are read elsewhere in forward"),
    _module_check("shared_weights", "its weights are shared with another module"),
    _module_check("extra_arguments", "it is called with extra arguments"),
    _mixed_dtypes,
)


# --------------------------------------------------------------------------- checks of one rule

def _weight_and_bias(m: Match) -> str | None:
    t = m.target
    roles = ("B", "C") if t.op == "Gemm" else ("weight", "bias")
    problem = param_problem(m.graph, t, 1, roles[0])
    if problem is None and (2 in t.params or (len(t.inputs) > 2 and t.inputs[2] is not None)):
        problem = param_problem(m.graph, t, 2, roles[1])
    if problem is None and m.bias_add is not None:
        problem = param_problem(m.graph, m.bias_add[0], 1 - m.bias_add[1], "bias")
    return problem


def _weight_shape(m: Match) -> tuple:
    return m.target.params[1].array.shape


def _out_channels_match(m: Match) -> str | None:
    t, shape = m.target, _weight_shape(m)
    group = t.attrs.get("group", 1)
    if t.op == "ConvTranspose" and shape[0] % group:
        return f"ConvTranspose: {shape[0]} input channels do not split into {group} groups"
    out = affine.output_channels(t.op, shape, group=group, trans_b=t.attrs.get("transB", 0))
    if out != m.channels:
        return f"{t.op} has {out} output channels, the BN {m.channels}"
    bias = _array(t, 2)
    if t.op != "Gemm" and bias is not None and bias.shape != (out,):
        return f"{t.op} bias has shape {bias.shape}, not ({out},)"
    added = m.added_bias.array if m.added_bias is not None else None
    if added is not None and (added.size != out or added.shape[-1] != out):
        return f"the Add after MatMul adds shape {added.shape}, not ({out},)"
    return None


def _runs_batched(m: Match) -> str | None:
    shape = m.target.input_shape(0)
    if shape is not None and len(shape) != len(_weight_shape(m)):
        return "it runs on an unbatched input"
    return None


def _gemm_b_is_2d(m: Match) -> str | None:
    shape = _weight_shape(m)
    return None if len(shape) == 2 else f"Gemm B has shape {shape}, not 2-D"


def _matmul_weight_2d(m: Match) -> str | None:
    shape = _weight_shape(m)
    return None if len(shape) == 2 else f"MatMul weight of shape {shape} is not (K, {m.channels})"


def _matmul_input_2d(m: Match) -> str | None:
    shape = m.target.input_shape(0)
    if shape is not None and len(shape) == 2:
        return None
    found = "unknown" if shape is None else f"{len(shape)}-D"
    return (f"MatMul input rank is {found}; the BN normalises axis 1, which is the weight's output "
            f"axis only for a 2-D (N, C) output{'' if shape is None else f', not for {len(shape)} dims'}")


def _not_reshaped(m: Match) -> str | None:
    return "the BN output reaches it reshaped" if m.reshaped else None


def _in_channels_match(m: Match) -> str | None:
    shape, group = _weight_shape(m), m.target.attrs.get("group", 1)
    if affine.input_channels("Conv", shape, group=group) != m.channels or shape[0] % group:
        return f"Conv weight {shape} with {group} groups does not read {m.channels} channels"
    return None


def _no_zero_padding(m: Match) -> str | None:
    pads, auto_pad = m.target.attrs.get("pads") or (), m.target.attrs.get("auto_pad", "NOTSET")
    if any(pads) or auto_pad not in ("NOTSET", "VALID"):
        shown = list(pads) if any(pads) else auto_pad
        return (f"the Conv pads its input with zeros ({shown}); a BN shift folded into a Conv that pads "
                "with zeros would be lost at the borders (exact only without padding)")
    return None


def _not_trans_a(m: Match) -> str | None:
    return "Gemm has transA=1, so the BN's channels are not its input features" if m.target.attrs.get("transA") else None


def _features_match(m: Match) -> str | None:
    features = affine.input_channels("Gemm", _weight_shape(m), trans_b=m.target.attrs.get("transB", 0))
    if m.repeat is None:  # a flatten of unknown spatial size: the weight tells it
        m.repeat = features // m.channels
    if m.channels * m.repeat != features:
        return f"Gemm takes {features} features, not {m.channels} channels x {m.repeat}"
    return None


def _never(reason: str) -> Callable[[Match], str]:
    return lambda m: reason


# --------------------------------------------------------------------------- rewrites

def _scale_outputs(m: Match) -> Rewrite:
    t = m.target
    weight, bias = affine.fold_output_side(
        t.op, _array(t, 1), _array(t, 2), m.scale, m.shift, group=t.attrs.get("group", 1),
        trans_b=t.attrs.get("transB", 0), beta=t.attrs.get("beta", 1.0))
    return Rewrite(t.op, weight, bias, drop_attrs=("beta",))


def _matmul_to_gemm(m: Match) -> Rewrite:
    added = m.added_bias.array.reshape(-1) if m.added_bias is not None else None
    weight, bias = affine.fold_output_side("MatMul", _array(m.target, 1), added, m.scale, m.shift)
    return Rewrite("Gemm", weight, bias)


def _scale_inputs(m: Match) -> Rewrite:
    t = m.target
    weight, bias = affine.fold_input_side(
        t.op, _array(t, 1), _array(t, 2), m.scale, m.shift, group=t.attrs.get("group", 1),
        trans_b=t.attrs.get("transB", 0), alpha=t.attrs.get("alpha", 1.0), beta=t.attrs.get("beta", 1.0),
        repeat=m.repeat)
    return Rewrite(t.op, weight, bias, drop_attrs=("beta",))


RULES = (
    # op -> BN: scale the op's output channels.
    Rule(INTO_PRECEDING, ("Conv", "ConvTranspose"), (_weight_and_bias, _runs_batched, _out_channels_match),
         _scale_outputs),
    Rule(INTO_PRECEDING, ("Gemm",), (_weight_and_bias, _gemm_b_is_2d, _out_channels_match), _scale_outputs),
    Rule(INTO_PRECEDING, ("MatMul",), (_weight_and_bias, _matmul_weight_2d, _matmul_input_2d, _out_channels_match),
         _matmul_to_gemm),
    # BN -> op: scale the op's input channels, the shift becomes bias.
    Rule(INTO_FOLLOWING, ("Conv",), (_not_reshaped, _weight_and_bias, _runs_batched, _in_channels_match,
                                     _no_zero_padding), _scale_inputs),
    Rule(INTO_FOLLOWING, ("Gemm",), (_not_trans_a, _weight_and_bias, _gemm_b_is_2d, _features_match), _scale_inputs),
    Rule(INTO_FOLLOWING, ("ConvTranspose",), (_never(
        "a ConvTranspose after BN does not absorb the shift exactly (it sums a position-dependent number of taps)"),),
         None),
)


# --------------------------------------------------------------------------- ops the fold sees through

def _identity(node: Node, axis: int, backward: bool) -> tuple[int | None, str | None]:
    return axis, None


def _same_type_cast(node: Node, axis: int, backward: bool):
    source = node.inputs[0] if node.inputs else None
    src = source.dtype if source is not None else None
    if src is None or src != node.attrs.get("to"):
        return None, f"it casts {src or 'an unknown type'} to {node.attrs.get('to')}"
    return axis, None


def _transpose(node: Node, axis: int, backward: bool):
    perm = node.attrs.get("perm")
    if perm is None or axis >= len(perm):
        return None, "its permutation is unknown"
    return (perm[axis] if backward else list(perm).index(axis)), None


def _commuting_pad(node: Node, axis: int, backward: bool):
    pads, mode = node.attrs.get("pads"), node.attrs.get("mode", "constant")
    if pads is None:
        return None, "its pads are not constant"
    if any(pads.get(axis, (0, 0))):
        return None, "it pads the channel axis"
    if mode == "constant" and any(p > 0 for pair in pads.values() for p in pair):
        return None, ("a constant-mode Pad with nonzero pads: the padded values would not get the BN's "
                      "shift, so folding across it is not exact")
    return axis, None


# op -> fn(node, channel axis on the side we come from, walking backward) ->
# (channel axis on the other side, None) or (None, why the op is in the way).
SEE_THROUGH = {"Identity": _identity, "Cast": _same_type_cast, "Transpose": _transpose, "Pad": _commuting_pad}

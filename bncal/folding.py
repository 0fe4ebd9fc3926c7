"""Fold eval-mode BatchNorm into neighbouring Conv / ConvTranspose / Linear layers.

An eval-mode BN is a per-channel affine map ``y = s * x + t`` with::

    s = gamma / sqrt(running_var + eps)        (gamma = 1 when affine=False)
    t = beta - running_mean * s                (beta = 0 when affine=False)

*Into the preceding op* (``op -> BN``): the op's output channel ``o`` is scaled,
``W'[o] = s[o] * W[o]``, ``b'[o] = s[o] * b[o] + t[o]``. A Conv weight is laid out
``(out, in/groups, k...)``; a ConvTranspose weight ``(in, out/groups, k...)``, where output
channel ``o = g * (out/groups) + j`` lives in ``W[g*in/groups:(g+1)*in/groups, j]``.

*Into the following op* (``BN -> op``): the op's input channel ``c`` is scaled,
``W'[:, c] = W[:, c] * s[c]``, and the shift becomes a bias, ``b' = b + sum_c,k W[:, c, k] t[c]``.
This is exact only if every output sees the shift at every tap: a Conv without zero padding
(reflect / replicate / circular padding copy BN outputs, so they commute with the affine map), a
Linear on ``(N, C)``, or a Linear after a flatten of ``(N, C, *S)`` (``s`` and ``t`` repeated over
``S``). ConvTranspose sums a position-dependent number of taps, so it is never a following target.

The data flow comes from ``torch.fx`` symbolic tracing, not from module names: an op is a target
only if its module is called exactly once and the value between it and the BN has no other user
(folding into a conv that is applied twice, or whose output also feeds another branch, would
change those other uses). Identity and Dropout modules between them are allowed: in eval mode
they are identities. Tensor shapes (e.g. the spatial size a flatten folds over) come from
running ``example_inputs`` through the traced graph, on the meta device when the model allows it.

Folding always uses eval semantics (running statistics), whatever mode the user's model is in;
the folded model is for inference and is returned in eval mode.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import torch
import torch.fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd
from torch.nn.utils import parametrize

from .errors import BncalError
from .report import FoldDecision, ReportDisplay, format_table, plural

__all__ = ["fold", "analyze_foldability", "FoldResult", "ChannelAffine"]

INTO_PRECEDING = "into-preceding"
INTO_FOLLOWING = "into-following"
TO_AFFINE = "to-affine"

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TRANSPOSE_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
# BN classes whose eval-mode forward is exactly F.batch_norm with the running statistics.
_PLAIN_BN_FORWARDS = (_BatchNorm.forward, nn.SyncBatchNorm.forward)
_SHAPE_KEY = "bncal_shape"
_EVAL_IDENTITIES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                    nn.AlphaDropout, nn.FeatureAlphaDropout)


class ChannelAffine(nn.Module):
    """``y = x * scale + shift`` per channel (dim 1): an eval-mode BN without the BN.

    Exports to ONNX as one Mul and one Add. ``scale`` and ``shift`` are 1-D buffers.
    """

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor):
        super().__init__()
        self.register_buffer("scale", scale.detach().clone().reshape(-1))
        self.register_buffer("shift", shift.detach().clone().reshape(-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (-1,) + (1,) * (x.dim() - 2)
        return x * self.scale.reshape(shape) + self.shift.reshape(shape)

    def extra_repr(self) -> str:
        return f"channels={self.scale.numel()}"


@dataclasses.dataclass(repr=False)
class FoldResult(ReportDisplay):
    """A folded copy of a model and one decision per BatchNorm.

    ``model`` is a new module in eval mode with the original hierarchy: folded BNs are
    ``nn.Identity``, BNs turned into affine maps are :class:`ChannelAffine`, refused BNs are
    left as they were. For a ``to-affine`` decision ``target`` is the BN's own name and
    ``reason`` says why it could not be folded into a neighbour.
    """

    model: nn.Module
    decisions: list[FoldDecision]

    def summary(self) -> str:
        """``Sequential: folded 7 of 7 BN layers`` (and how many became affine maps or were kept)."""
        affine = sum(d.direction == TO_AFFINE for d in self.decisions)
        folded = sum(d.folded for d in self.decisions) - affine
        text = f"{type(self.model).__name__}: folded {folded} of {plural(len(self.decisions), 'BN layer')}"
        kept = len(self.decisions) - folded - affine
        if affine:
            text += f", {affine} turned into Mul + Add"
        if kept:
            text += f", {kept} kept"
        return text

    def table(self) -> str:
        rows = [(d.bn, d.direction or "kept", d.target, d.reason) for d in self.decisions]
        return format_table(rows, ["bn", "action", "target", "reason"])


def fold(model: nn.Module, example_inputs, *, bn_to_affine: bool = False) -> FoldResult:
    """Return an eval-mode copy of ``model`` with its BatchNorms folded where that is exact.

    ``example_inputs`` is the tuple of positional inputs (a lone tensor is accepted); it is run
    once through a copy to learn tensor shapes. ``model`` itself is never modified. With
    ``bn_to_affine=True`` a BN that cannot be folded but is a plain BN with running statistics
    is replaced by an equivalent :class:`ChannelAffine`. Weights are computed in float64 and
    stored in their own dtype. BNs are folded with their running statistics (eval semantics)
    even if ``model`` is in train mode. Raises :class:`BncalError` if the model fails on the
    inputs or has uninitialised lazy modules.
    """
    check_initialized(model)
    work = copy.deepcopy(model).eval()
    decisions, actions = _plan(work, as_tuple(example_inputs), bn_to_affine)
    _apply(work, actions)
    return FoldResult(work.eval(), decisions)


def analyze_foldability(model: nn.Module, example_inputs) -> list[FoldDecision]:
    """The decisions :func:`fold` would take (without ``bn_to_affine``), building nothing.

    The model is copied before it is run, so its statistics and mode are left alone.
    """
    check_initialized(model)
    work = copy.deepcopy(model).eval()
    decisions, _ = _plan(work, as_tuple(example_inputs), bn_to_affine=False)
    return decisions


# --------------------------------------------------------------------------- planning

@dataclasses.dataclass
class _Action:
    bn: nn.Module
    direction: str
    target: nn.Module | None = None
    repeat: int = 1  # features per BN channel after a flatten (into-following Linear only)


class _Tracer(torch.fx.Tracer):
    # BN / Conv / Linear subclasses from user code must stay call_module nodes, so that a
    # subclass's forward is judged as a whole instead of being traced into its parts.
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (_BatchNorm, _ConvNd, nn.Linear)):
            return True
        return super().is_leaf_module(m, qualname)


def check_initialized(model: nn.Module) -> None:
    """Raise BncalError if ``model`` has uninitialised lazy parameters.

    A copy would initialise them with other random values than the user's model will get.
    """
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if isinstance(tensor, nn.parameter.UninitializedTensorMixin):
            raise BncalError(f"{name} is an uninitialised lazy parameter; run the model once on "
                             "an example input before folding or exporting it")


def as_tuple(example_inputs) -> tuple:
    """Positional inputs as a tuple (a lone tensor becomes a 1-tuple)."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


def _plan(model: nn.Module, inputs: tuple, bn_to_affine: bool):
    bn_names = {}
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm):
            bn_names[module] = name
    if not bn_names:
        return [], []
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # fx raises many types (TraceError, TypeError, ...)
        reason = f"model could not be traced: {one_line(exc)}"
        return [FoldDecision(n, None, None, reason) for n in bn_names.values()], []
    gm = torch.fx.GraphModule(model, graph)
    _record_shapes(model, graph, inputs)
    return _Planner(model, gm, bn_names, bn_to_affine).run()


class _ShapeRecorder(torch.fx.Interpreter):
    # Like fx's ShapeProp, but it does not print tracebacks and runs on meta tensors too.
    def run_node(self, node):
        result = super().run_node(node)
        if isinstance(result, torch.Tensor):
            node.meta[_SHAPE_KEY] = tuple(result.shape)
        return result


def _record_shapes(model: nn.Module, graph: torch.fx.Graph, inputs: tuple) -> None:
    """Store each tensor node's shape in ``node.meta``; raise BncalError if the inputs don't fit.

    Shapes are computed on a meta-device clone first (no arithmetic; a real forward of a big
    model costs more than the whole fold). A model that cannot run on meta tensors (explicit
    devices, ``.item()``) is run for real, without gradients.
    """
    try:
        _ShapeRecorder(meta_clone(model), graph=graph).run(*_to_meta(inputs))
        return
    except Exception:  # anything meta cannot do: fall back to the real computation
        pass
    try:
        with torch.no_grad():
            _ShapeRecorder(model, graph=graph).run(*inputs)
    except Exception as exc:
        raise BncalError(
            f"the model failed on the example inputs: {one_line(exc)}; pass inputs of the "
            "shape and dtype the model expects") from exc


def meta_clone(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers live on the meta device.

    Tensor data is never copied.
    """
    check_initialized(model)
    memo = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        empty = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = (nn.Parameter(empty, requires_grad=tensor.requires_grad)
                            if isinstance(tensor, nn.Parameter) else empty)
    return copy.deepcopy(model, memo)


def _to_meta(inputs: tuple) -> tuple:
    return tuple(x.to("meta") if isinstance(x, torch.Tensor) else x for x in inputs)


class _Planner:
    def __init__(self, model, gm, bn_names, bn_to_affine):
        self.model, self.gm, self.graph = model, gm, gm.graph
        self.bn_names, self.bn_to_affine = bn_names, bn_to_affine
        self.calls: dict[nn.Module, int] = {}
        # ids of modules and parameters that forward reads as attributes (e.g. F.linear(x, m.weight))
        self.read_ids: set[int] = set()
        for node in self.graph.nodes:
            if node.op == "call_module":
                module = model.get_submodule(node.target)
                self.calls[module] = self.calls.get(module, 0) + 1
            elif node.op == "get_attr":
                owner, _, attr = node.target.rpartition(".")
                owner_module = _try(model.get_submodule, owner)
                self.read_ids.add(id(owner_module))
                self.read_ids.add(id(getattr(owner_module, attr, None)))
        owners: dict[int, int] = {}
        for module in model.modules():
            for p in module.parameters(recurse=False):
                owners[id(p)] = owners.get(id(p), 0) + 1
        self.param_owners = owners

    def run(self):
        decided: dict[nn.Module, FoldDecision] = {}
        actions = []
        for node in list(self.graph.nodes):
            if node.op != "call_module":
                continue
            bn = self.model.get_submodule(node.target)
            if not isinstance(bn, _BatchNorm) or bn in decided:
                continue
            decision, action = self._decide(node, bn)
            decided[bn] = decision
            if action is not None:
                actions.append(action)
        unseen = "not called in the traced forward (unused, or inside a module that is not traced)"
        decisions = [decided.get(bn) or FoldDecision(name, None, None, unseen)
                     for bn, name in self.bn_names.items()]
        return decisions, actions

    def _decide(self, node, bn):
        name = self.bn_names[bn]
        own = self._bn_problem(node, bn)
        if own is not None:
            return FoldDecision(name, None, None, own), None
        if self.calls[bn] > 1:
            reason = f"BN module is called more than once ({self.calls[bn]} times) in forward"
        else:
            target, why_before = self._preceding(node, bn)
            if target is not None:
                self._drop_node(node)
                return (FoldDecision(name, target[0], INTO_PRECEDING),
                        _Action(bn, INTO_PRECEDING, target[1]))
            target, why_after = self._following(node, bn)
            if target is not None:
                self._drop_node(node)
                return (FoldDecision(name, target[0], INTO_FOLLOWING),
                        _Action(bn, INTO_FOLLOWING, target[1], target[2]))
            reason = f"{why_before}; {why_after}"
        if self.bn_to_affine:
            return FoldDecision(name, name, TO_AFFINE, reason), _Action(bn, TO_AFFINE)
        return FoldDecision(name, None, None, reason), None

    def _drop_node(self, node):
        # Later BNs must see the graph as it will be: the folded BN gone (conv -> BN -> BN).
        node.replace_all_uses_with(node.args[0])
        self.graph.erase_node(node)

    def _bn_problem(self, node, bn) -> str | None:
        """Why this BN can be neither folded nor turned into an affine map (None if it can)."""
        if type(bn).forward not in _PLAIN_BN_FORWARDS:
            return (f"{type(bn).__name__} overrides forward (e.g. adds an activation); folding "
                    "would drop its extra behaviour")
        if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
            return ("BN has no running statistics (track_running_stats=False): it normalises "
                    "with batch statistics even in eval mode")
        if _has_hooks(bn):
            return "BN has forward hooks, which folding would bypass"
        if id(bn) in self.read_ids:
            return "BN parameters or buffers are read elsewhere in forward"
        if not bn.running_mean.is_floating_point():
            return f"BN statistics have non-floating dtype {bn.running_mean.dtype}"
        if len(node.args) != 1 or node.kwargs:
            return "BN is called with extra arguments"
        return None

    def _preceding(self, node, bn):
        """``((name, module), None)`` if ``bn`` folds into the op before it, else ``(None, why)``."""
        consumer, src = node, node.args[0]
        while self._passes_through(src) and len(_data_users(src)) == 1:
            consumer, src = src, src.args[0]
        module = self._module_of(src)
        if not isinstance(module, (_CONV_TYPES, _CONV_TRANSPOSE_TYPES, nn.Linear)):
            return None, f"preceding op {_describe(src)} is not a Conv/ConvTranspose/Linear"
        why = self._target_problem(module, bn)
        if why is None and set(_data_users(src)) != {consumer}:
            users = ", ".join(_describe(u) for u in _data_users(src) if u is not consumer)
            why = f"its output is also used elsewhere (by {users})"
        if why is None:
            out = _shape(src)
            channels = module.out_features if isinstance(module, nn.Linear) else module.out_channels
            if out is None or channels != bn.num_features:
                why = "its output channels do not match the BN"
            elif isinstance(module, nn.Linear) and len(out) != 2:
                why = (f"its output has {len(out)} dims; BN normalises dim 1, "
                       "not the Linear's features")
            elif not isinstance(module, nn.Linear) and len(out) != _spatial_dims(module) + 2:
                why = "it runs on an unbatched input"
        if why is not None:
            return None, f"not folded into preceding {src.target}: {why}"
        return (src.target, module), None

    def _following(self, node, bn):
        """``((name, module, repeat), None)`` if ``bn`` folds into the op after it, else ``(None, why)``."""
        bn_in = _shape(node.args[0])
        prev, nxt, why = self._next_op(node)
        repeat = _flatten_repeat(bn_in, prev, nxt) if nxt is not None else None
        if repeat is not None:
            prev, nxt, why = self._next_op(nxt)
        if nxt is None:
            return None, f"no following op to fold into: {why}"
        module = self._module_of(nxt)
        if isinstance(module, _CONV_TRANSPOSE_TYPES):
            return None, ("no following op to fold into: a ConvTranspose after BN does not absorb "
                          "the shift exactly")
        if not isinstance(module, (_CONV_TYPES, nn.Linear)):
            return None, f"following op {_describe(nxt)} is not a Conv/Linear"
        why = self._target_problem(module, bn)
        if why is None and (nxt.args != (prev,) or nxt.kwargs):
            why = "it is called with extra arguments"
        if why is None and bn_in is None:
            why = "the BN input shape is unknown"
        if why is None and isinstance(module, nn.Linear):
            if repeat is None and len(bn_in) != 2:
                why = f"BN input has {len(bn_in)} dims and is not flattened before the Linear"
            elif module.in_features != bn.num_features * (repeat or 1):
                why = "its input features do not match the BN channels"
        elif why is None:
            if repeat is not None or len(bn_in) != _spatial_dims(module) + 2:
                why = "BN output reaches it reshaped or unbatched"
            elif module.in_channels != bn.num_features:
                why = "its input channels do not match the BN"
            elif module.padding_mode == "zeros" and _has_padding(module):
                why = (f"it pads with zeros (padding={module.padding}), where the BN shift "
                       "would be lost at the borders")
        if why is not None:
            return None, f"not folded into following {nxt.target}: {why}"
        return (nxt.target, module, repeat or 1), None

    def _next_op(self, node):
        """``(prev, next, None)``: the one op reading ``node`` (past eval-mode identities), whose
        input is ``prev``; or ``(node, None, why)`` if the value has no single reader."""
        users = _data_users(node)
        while len(users) == 1 and self._passes_through(users[0]):
            node = users[0]
            users = _data_users(node)
        if len(users) == 1:
            return node, users[0], None
        what = "unused" if not users else "used by " + ", ".join(_describe(u) for u in users)
        return node, None, f"output of {_describe(node)} is {what}"

    def _passes_through(self, node) -> bool:
        """True for a call of Identity or Dropout: identities in eval mode, so BN folds across them."""
        module = self._module_of(node)
        return (type(module) in _EVAL_IDENTITIES and not _has_hooks(module)
                and len(node.args) == 1 and not node.kwargs)

    def _target_problem(self, module, bn) -> str | None:
        """Why ``module`` may not absorb ``bn`` whatever the graph around it (None if it may)."""
        base = next(t for t in (*_CONV_TYPES, *_CONV_TRANSPOSE_TYPES, nn.Linear) if isinstance(module, t))
        if type(module).forward is not base.forward:
            return f"{type(module).__name__} overrides forward"
        if parametrize.is_parametrized(module):
            return "its weight is parametrized"
        if _has_hooks(module):
            return "it has forward hooks"
        if self.calls.get(module, 0) != 1:
            return f"its module is called more than once ({self.calls.get(module, 0)} times)"
        if id(module) in self.read_ids or any(id(p) in self.read_ids for p in module.parameters(recurse=False)):
            return "its weights are read elsewhere in forward"
        if any(self.param_owners[id(p)] > 1 for p in module.parameters(recurse=False)):
            return "its weights are shared with another module"
        dtypes = {module.weight.dtype, bn.running_mean.dtype, bn.running_var.dtype}
        if bn.affine:
            dtypes |= {bn.weight.dtype, bn.bias.dtype}
        if len(dtypes) > 1:
            return f"mixed dtypes ({', '.join(sorted(str(d) for d in dtypes))})"
        if not module.weight.is_floating_point():
            return f"its weight has non-floating dtype {module.weight.dtype}"
        return None

    def _module_of(self, node):
        if isinstance(node, torch.fx.Node) and node.op == "call_module":
            return self.model.get_submodule(node.target)
        return None


def _flatten_repeat(src, prev, node) -> int | None:
    """``prod(S)`` if ``node`` turns ``prev``, a BN output of shape ``src = (N, C, *S)``, into
    ``(N, C*prod(S))``, else None.

    Any view/reshape/flatten between those shapes is row-major, so feature ``c*prod(S) + i``
    comes from channel ``c``.
    """
    is_reshape = (
        (node.op == "call_function" and node.target in (torch.flatten, torch.reshape))
        or (node.op == "call_method" and node.target in ("flatten", "view", "reshape"))
        or (node.op == "call_module" and type(node.graph.owning_module.get_submodule(node.target)) is nn.Flatten)
    )
    if not is_reshape or not node.args or node.args[0] is not prev:
        return None
    out = _shape(node)
    if src is None or out is None or len(src) < 3 or len(out) != 2:
        return None
    n, c, *spatial = src
    if out[0] != n or out[1] != c * math.prod(spatial):
        return None
    return math.prod(spatial)


def _data_users(node) -> list:
    """Users of ``node`` that read its values; shape queries (``x.size(0)``, ``x.shape``) are
    left out because folding does not change shapes."""
    return [u for u in node.users if not _is_shape_query(u)]


def _is_shape_query(node) -> bool:
    if node.op == "call_method" and node.target in ("size", "dim"):
        return True
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) > 1 and node.args[1] in ("shape", "ndim", "dtype", "device")
    return False


def _shape(node) -> tuple | None:
    return node.meta.get(_SHAPE_KEY) if isinstance(node, torch.fx.Node) else None


def _describe(node) -> str:
    if not isinstance(node, torch.fx.Node):
        return repr(node)
    if node.op == "call_module":
        return f"{node.target} ({type(node.graph.owning_module.get_submodule(node.target)).__name__})"
    if node.op == "placeholder":
        return f"model input {node.target}"
    if node.op == "output":
        return "the model output"
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _has_padding(conv) -> bool:
    if isinstance(conv.padding, str):
        return conv.padding != "valid" and any(d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size))
    return any(conv.padding)


def _spatial_dims(module) -> int:
    return module.weight.dim() - 2


def _try(getter, name):
    try:
        return getter(name)
    except AttributeError:
        return None


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message``, for reasons and error messages."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


# --------------------------------------------------------------------------- applying

def _bn_scale_shift(bn: _BatchNorm):
    """``(s, t)`` of the eval-mode BN as float64 vectors."""
    mean = bn.running_mean.detach().double()
    var = bn.running_var.detach().double()
    scale = torch.rsqrt(var + bn.eps)
    if bn.affine:
        scale = scale * bn.weight.detach().double()
    shift = -mean * scale
    if bn.affine:
        shift = shift + bn.bias.detach().double()
    return scale, shift


def _apply(model: nn.Module, actions: list[_Action]) -> None:
    # float64 masters so that a layer absorbing two BNs (one each side) is rounded once.
    masters: dict[nn.Module, list[torch.Tensor]] = {}
    replacements: dict[nn.Module, nn.Module] = {}
    for action in actions:
        scale, shift = _bn_scale_shift(action.bn)
        if action.direction == TO_AFFINE:
            dtype = action.bn.running_mean.dtype
            replacements[action.bn] = ChannelAffine(scale.to(dtype), shift.to(dtype))
            continue
        target = action.target
        if target not in masters:
            weight = target.weight.detach().double()
            bias = target.bias.detach().double() if target.bias is not None else None
            if bias is None:
                out = weight.shape[0] if not isinstance(target, _ConvTransposeNd) else target.out_channels
                bias = torch.zeros(out, dtype=torch.float64, device=weight.device)
            masters[target] = [weight, bias]
        weight, bias = masters[target]
        if action.direction == INTO_PRECEDING:
            masters[target] = _fold_output_side(target, weight, bias, scale, shift)
        else:
            masters[target] = _fold_input_side(target, weight, bias, scale, shift, action.repeat)
        replacements[action.bn] = nn.Identity()

    with torch.no_grad():
        for target, (weight, bias) in masters.items():
            target.weight.copy_(weight.to(target.weight.dtype))
            if target.bias is not None:
                target.bias.copy_(bias.to(target.bias.dtype))
            else:
                target.bias = nn.Parameter(bias.to(target.weight.dtype),
                                           requires_grad=target.weight.requires_grad)
    _replace_modules(model, replacements)


def _fold_output_side(target, weight, bias, scale, shift):
    """Scale output channels: ``op -> BN`` becomes one op."""
    tail = (1,) * (weight.dim() - 2)
    if isinstance(target, _ConvTransposeNd):
        groups = target.groups
        in_ch, out_per_group = weight.shape[0], weight.shape[1]
        grouped = weight.reshape(groups, in_ch // groups, out_per_group, *weight.shape[2:])
        weight = (grouped * scale.reshape(groups, 1, out_per_group, *tail)).reshape(weight.shape)
    else:
        weight = weight * scale.reshape(-1, *((1,) * (weight.dim() - 1)))
    return [weight, bias * scale + shift]


def _fold_input_side(target, weight, bias, scale, shift, repeat):
    """Scale input channels and turn the shift into bias: ``BN -> op`` becomes one op."""
    if isinstance(target, nn.Linear):
        scale, shift = scale.repeat_interleave(repeat), shift.repeat_interleave(repeat)
        return [weight * scale[None, :], bias + weight @ shift]
    groups = target.groups
    out_ch, in_per_group = weight.shape[0], weight.shape[1]
    tail = (1,) * (weight.dim() - 2)
    grouped = weight.reshape(groups, out_ch // groups, in_per_group, *weight.shape[2:])
    shift_g = shift.reshape(groups, 1, in_per_group, *tail)
    bias = bias + (grouped * shift_g).sum(dim=tuple(range(2, grouped.dim()))).reshape(out_ch)
    weight = (grouped * scale.reshape(groups, 1, in_per_group, *tail)).reshape(weight.shape)
    return [weight, bias]


def _replace_modules(model: nn.Module, replacements: dict[nn.Module, nn.Module]) -> None:
    """Swap modules under every name they are registered as (a module may have aliases)."""
    if not replacements:
        return
    slots = [(parent, key, child)
             for parent in model.modules()
             for key, child in parent._modules.items()
             if child is not None and child in replacements]
    for parent, key, child in slots:
        parent._modules[key] = replacements[child]

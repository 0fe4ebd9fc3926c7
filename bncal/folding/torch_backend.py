"""BN folding on PyTorch models: the rulebook (:mod:`.rules`) over a ``torch.fx`` view.

The data flow comes from ``torch.fx`` symbolic tracing, not from module names, and is presented
the way ``torch.onnx.export`` emits it, so the rules decide here what they decide on the
exported graph:

- a Conv with ``padding_mode`` reflect/replicate/circular is ``Pad(mode=reflect/edge/wrap)``
  feeding a ``Conv`` without pads (an all-zero Pad when ``padding=0``);
- ``nn.Linear`` on a 2-D input is ``Gemm(transB=1)``, on any other rank ``MatMul`` + ``Add``;
- Identity and Dropout modules (and ``F.dropout(..., training=False)``) are ``Identity``;
  ``x.float()``-style casts are ``Cast``; ``nn.Flatten``, ``torch.flatten``, ``view`` and
  ``reshape`` are ``Reshape`` with the shapes recorded from ``example_inputs``;
- a BN with an activation (timm's ``BatchNormAct2d`` family, :func:`bncal.torch.bn_modules.activation_split`)
  is its BN followed by an opaque op for its ``drop`` and ``act``; a frozen BN (torchvision's and
  timm's ``FrozenBatchNorm2d``) is a ``BatchNormalization`` with its fixed statistics;
- anything else is an opaque op named after its module class, function or method.

What only a module can refuse (an overridden forward, hooks, a module called twice, weights
read elsewhere or shared between modules, a parametrized weight) is recorded as
:class:`~.graph.ModuleFacts`; the rules refuse with it, because folding writes into the module
itself. The exported graph has no such limits: there ``fold-export`` may fold what these refuse.

Tensor shapes come from running ``example_inputs`` through the traced graph, on the meta device
when the model allows it. Folding always uses eval semantics (running statistics), whatever
mode the user's model is in; the folded model is for inference and is returned in eval mode.
"""

from __future__ import annotations

import copy
import dataclasses
from collections import Counter

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd
from torch.nn.utils import parametrize

from ..torch.bn_modules import activation_split, is_frozen_batchnorm
from ..errors import BncalError, one_line
from ..report import FoldDecision, ReportDisplay, format_table, plural
from .graph import Graph, ModuleFacts, Node, Param
from .planner import plan
from .rules import INTO_FOLLOWING, INTO_PRECEDING, TO_AFFINE

__all__ = ["fold", "analyze_foldability", "FoldResult", "ChannelAffine", "check_initialized", "meta_clone",
           "as_tuple"]

# BN classes whose eval-mode forward is exactly F.batch_norm with the running statistics.
_PLAIN_BN_FORWARDS = (_BatchNorm.forward, nn.SyncBatchNorm.forward)
_EVAL_IDENTITIES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                    nn.AlphaDropout, nn.FeatureAlphaDropout)
_DROPOUT_FUNCTIONS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout)
_RESHAPE_FUNCTIONS = (torch.flatten, torch.reshape)
_RESHAPE_METHODS = ("flatten", "view", "reshape")
_CAST_METHODS = {"float": torch.float32, "double": torch.float64, "half": torch.float16, "bfloat16": torch.bfloat16}
_PAD_MODES = {"reflect": "reflect", "replicate": "edge", "circular": "wrap"}
# Module classes whose forward the view knows; a subclass with its own forward is opaque code.
_KNOWN_TARGETS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                  nn.Linear)
_SHAPE_KEY, _DTYPE_KEY = "bncal_shape", "bncal_dtype"


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
    left as they were. A folded BN with an activation (timm's ``BatchNormAct2d``) becomes its
    ``act`` module (its ``drop`` is the identity at inference), behind the ChannelAffine of a
    to-affine decision. For a ``to-affine`` decision ``target`` is the BN's own name and
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


def fold(model: nn.Module, example_inputs, *, bn_to_affine: bool = False, copy_weights: bool = True) -> FoldResult:
    """Return an eval-mode copy of ``model`` with its BatchNorms folded where that is exact.

    ``example_inputs`` is the tuple of positional inputs (a lone tensor is accepted); it is run
    once through a copy to learn tensor shapes. ``model`` itself is never modified. With
    ``bn_to_affine=True`` a BN that cannot be folded but is a plain BN with running statistics
    is replaced by an equivalent :class:`ChannelAffine`. Weights are computed in float64 and
    stored in their own dtype, as new parameters. BNs are folded with their running statistics
    (eval semantics) even if ``model`` is in train mode. ``copy_weights=False`` copies the
    modules but not the parameters and buffers the fold leaves unchanged: the copy shares them
    with ``model`` (a change to one is a change to both), for a caller that only runs or exports
    it (fold-export: VGG-11's 530 MB are not copied). Raises :class:`BncalError` if the model
    fails on the inputs or has uninitialised lazy modules.
    """
    check_initialized(model)
    shared = {} if copy_weights else {id(t): t for t in [*model.parameters(), *model.buffers()]}
    work = copy.deepcopy(model, shared).eval()
    decisions, steps, view = _plan(work, as_tuple(example_inputs), bn_to_affine)
    _apply(work, steps, view)
    return FoldResult(work.eval(), decisions)


def analyze_foldability(model: nn.Module, example_inputs) -> list[FoldDecision]:
    """The decisions :func:`fold` would take (without ``bn_to_affine``), building nothing.

    The same rules decide ``fold-export``'s graph fold, so these are also its decisions on the
    exported model, except where a module fact (see the module docstring) refuses a fold that
    the graph allows. The model is copied before it is run, so its statistics and mode are
    left alone.
    """
    check_initialized(model)
    work = copy.deepcopy(model).eval()
    return _plan(work, as_tuple(example_inputs), bn_to_affine=False)[0]


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


# --------------------------------------------------------------------------- tracing

class _Tracer(torch.fx.Tracer):
    # BN / Conv / Linear subclasses from user code must stay call_module nodes, so that a
    # subclass's forward is judged as a whole instead of being traced into its parts.
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (_BatchNorm, _ConvNd, nn.Linear)) or is_frozen_batchnorm(m):
            return True
        return super().is_leaf_module(m, qualname)


class _ShapeRecorder(torch.fx.Interpreter):
    # Like fx's ShapeProp, but it does not print tracebacks and runs on meta tensors too.
    def run_node(self, node):
        result = super().run_node(node)
        if isinstance(result, torch.Tensor):
            node.meta[_SHAPE_KEY] = tuple(result.shape)
            node.meta[_DTYPE_KEY] = _dtype_name(result.dtype)
        return result


def _record_shapes(model: nn.Module, graph: torch.fx.Graph, inputs: tuple) -> None:
    """Store each tensor node's shape and dtype in ``node.meta``; raise BncalError if the inputs
    don't fit.

    Shapes are computed on a meta-device clone first (no arithmetic; a real forward of a big
    model costs more than the whole fold). A model that cannot run on meta tensors (explicit
    devices, ``.item()``) is run for real, without gradients.
    """
    meta_inputs = tuple(x.to("meta") if isinstance(x, torch.Tensor) else x for x in inputs)
    try:
        _ShapeRecorder(meta_clone(model), graph=graph).run(*meta_inputs)
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


def _plan(model: nn.Module, inputs: tuple, bn_to_affine: bool):
    bn_names = {}
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm) or is_frozen_batchnorm(module):
            bn_names.setdefault(module, name)
    if not bn_names:
        return [], [], None
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # fx raises many types (TraceError, TypeError, ...)
        reason = f"model could not be traced: {one_line(exc)}"
        return [FoldDecision(n, None, None, reason) for n in bn_names.values()], [], None
    _record_shapes(model, graph, inputs)
    view = _ViewBuilder(model, graph, bn_names).build()
    steps = plan(view, bn_to_affine=bn_to_affine)
    first = {}
    for step in steps:
        first.setdefault(step.bn.handle, step)
    unseen = "not called in the traced forward (unused, or inside a module that is not traced)"
    decisions = [_decision(first[bn], name) if bn in first else FoldDecision(name, None, None, unseen)
                 for bn, name in bn_names.items()]
    return decisions, list(first.values()), view


def _decision(step, name: str) -> FoldDecision:
    if step.direction == TO_AFFINE:
        return FoldDecision(name, name, TO_AFFINE, step.reason)
    if step.direction in (INTO_PRECEDING, INTO_FOLLOWING):
        return FoldDecision(name, step.target.name, step.direction)
    return FoldDecision(name, None, None, step.reason)


# --------------------------------------------------------------------------- the view

class _ViewBuilder:
    """The traced graph in ONNX vocabulary (see the module docstring)."""

    def __init__(self, model: nn.Module, graph: torch.fx.Graph, bn_names: dict):
        self.model, self.graph, self.bn_names = model, graph, bn_names
        self.calls = Counter(model.get_submodule(n.target) for n in graph.nodes if n.op == "call_module")
        # ids of modules and parameters that forward reads as attributes (e.g. F.linear(x, m.weight))
        self.read_ids: set[int] = set()
        for node in graph.nodes:
            if node.op == "get_attr":
                owner_name, _, attr = node.target.rpartition(".")
                owner = _try_submodule(model, owner_name)
                self.read_ids |= {id(owner), id(getattr(owner, attr, None))}
        self.owners = Counter(id(p) for m in model.modules() for p in m.parameters(recurse=False))
        self.values: dict[torch.fx.Node, Node] = {}  # fx node -> view node producing its value
        self.nodes: list[Node] = []

    def build(self) -> Graph:
        for fx_node in self.graph.nodes:
            if fx_node.op == "output":
                torch.fx.node.map_arg(fx_node.args, self._mark_output)
            elif not _is_shape_query(fx_node):
                self.values[fx_node] = self._convert(fx_node)
        return Graph(self.nodes)

    def _mark_output(self, fx_node):
        if fx_node in self.values:
            self.values[fx_node].graph_output = True

    def _add(self, fx_node, op, inputs, name=None, **fields) -> Node:
        node = Node(op, name or fx_node.name, fx_node.name, inputs, shape=fx_node.meta.get(_SHAPE_KEY),
                    dtype=fx_node.meta.get(_DTYPE_KEY), **fields)
        self.nodes.append(node)
        return node

    def _inputs(self, fx_node) -> list[Node | None]:
        found = []
        torch.fx.node.map_arg((fx_node.args, fx_node.kwargs), found.append)
        return [self.values.get(n) for n in found]

    def _convert(self, fx_node) -> Node:
        if fx_node.op == "placeholder":
            return self._add(fx_node, "Input", [])
        if fx_node.op == "call_module":
            return self._module(fx_node, self.model.get_submodule(fx_node.target))
        op, attrs = _function_op(fx_node)
        return self._add(fx_node, op, self._inputs(fx_node), attrs=attrs)

    def _module(self, fx_node, module: nn.Module) -> Node:
        inputs = self._inputs(fx_node)
        sole_input = len(fx_node.args) == 1 and not fx_node.kwargs
        if module in self.bn_names:
            bn = self._add(fx_node, "BatchNormalization", inputs, name=self.bn_names[module],
                           params=_bn_params(module, self.bn_names[module]), attrs={"epsilon": float(module.eps)},
                           module=self._facts(module, sole_input), handle=module)
            after = activation_split(module)
            if after is None:
                return bn
            # Its drop and act run after the BN part, inside the module: one op the BN feeds.
            known = all(type(m) in _EVAL_IDENTITIES and not _has_hooks(m) for m in after)
            return self._add(fx_node, "Identity" if known else "+".join(type(m).__name__ for m in after), [bn],
                             name=f"{self.bn_names[module]} (after its BN)")
        if isinstance(module, (_ConvNd, nn.Linear)):
            return self._linear(fx_node, module, inputs, self._facts(module, sole_input))
        if type(module) in _EVAL_IDENTITIES and not _has_hooks(module) and sole_input:
            return self._add(fx_node, "Identity", inputs)
        if type(module) is nn.Flatten and not _has_hooks(module):
            return self._add(fx_node, "Reshape", inputs)
        return self._add(fx_node, type(module).__name__, inputs)

    def _facts(self, module: nn.Module, sole_input: bool) -> ModuleFacts:
        params = list(module.parameters(recurse=False))
        if module in self.bn_names:
            # A frozen BN's forward is its fixed affine; a documented activation split is modelled.
            split = is_frozen_batchnorm(module) or activation_split(module) is not None
            plain = (type(module).forward,) if split else _PLAIN_BN_FORWARDS
        else:
            plain = tuple(t.forward for t in _KNOWN_TARGETS if isinstance(module, t))[:1]
        return ModuleFacts(
            type(module).__name__,
            overrides_forward=type(module).forward not in plain,
            hooks=_has_hooks(module),
            calls=self.calls[module],
            parametrized=parametrize.is_parametrized(module),
            read_elsewhere=id(module) in self.read_ids or any(id(p) in self.read_ids for p in params),
            shared_weights=any(self.owners[id(p)] > 1 for p in params),
            extra_arguments=not sole_input,
            no_running_stats=isinstance(module, _BatchNorm) and (
                not module.track_running_stats or module.running_mean is None or module.running_var is None),
        )

    def _linear(self, fx_node, module, inputs, facts) -> Node:
        """Conv (behind a Pad for non-zero padding modes), ConvTranspose, Gemm or MatMul + Add."""
        weight = _param(module.weight, f"{fx_node.target}.weight")
        bias = {2: _param(module.bias, f"{fx_node.target}.bias")} if module.bias is not None else {}
        fields = dict(name=fx_node.target, module=facts, handle=module)
        if isinstance(module, _ConvTransposeNd):
            return self._add(fx_node, "ConvTranspose", inputs, params={1: weight, **bias},
                             attrs={"group": module.groups}, **fields)
        if isinstance(module, _ConvNd):
            pads = _onnx_pads(module)
            if module.padding_mode != "zeros":
                pad_shape = _padded(inputs[0].shape if inputs and inputs[0] else None, pads)
                padded = Node("Pad", f"{fx_node.target} (padding_mode={module.padding_mode})", f"{fx_node.name}_pad",
                              inputs[:1], attrs={"mode": _PAD_MODES[module.padding_mode], "pads": pads},
                              shape=pad_shape, dtype=inputs[0].dtype if inputs and inputs[0] else None)
                self.nodes.append(padded)
                inputs, pads = [padded, *inputs[1:]], {}
            spatial = module.weight.dim() - 2
            flat = [pads.get(2 + i, (0, 0))[0] for i in range(spatial)] + [pads.get(2 + i, (0, 0))[1] for i in range(spatial)]
            return self._add(fx_node, "Conv", inputs, params={1: weight, **bias},
                             attrs={"group": module.groups, "pads": flat}, **fields)
        data_shape = inputs[0].shape if inputs and inputs[0] else None
        if data_shape is not None and len(data_shape) == 2:
            return self._add(fx_node, "Gemm", inputs, params={1: weight, **bias}, attrs={"transB": 1}, **fields)
        transposed = Param(weight.name, weight.array.T, weight.dtype, handle=weight.handle)
        matmul = self._add(fx_node, "MatMul", inputs, params={1: transposed}, **fields)
        if not bias:
            return matmul
        return self._add(fx_node, "Add", [matmul, None], name=f"{fx_node.target} (bias)", params={1: bias[2]},
                         handle=module)


def _function_op(fx_node) -> tuple[str, dict]:
    """The ONNX op of a call_function / call_method / get_attr node, and its attributes."""
    target, args, kwargs = fx_node.target, fx_node.args, fx_node.kwargs
    if (fx_node.op == "call_function" and target in _RESHAPE_FUNCTIONS) or \
            (fx_node.op == "call_method" and target in _RESHAPE_METHODS):
        return "Reshape", {}
    if fx_node.op == "call_function" and target in _DROPOUT_FUNCTIONS:
        training = kwargs.get("training", args[2] if len(args) > 2 else True)
        if training is False:
            return "Identity", {}
    if target in ("permute", torch.permute, "transpose", torch.transpose) and not kwargs:
        return "Transpose", {"perm": _permutation(fx_node)}
    if fx_node.op == "call_method":
        if target == "contiguous" and len(args) == 1:
            return "Identity", {}
        if target in _CAST_METHODS and len(args) == 1 and not kwargs:
            return "Cast", {"to": _dtype_name(_CAST_METHODS[target])}
        if target == "to" and len(args) == 2 and not kwargs and isinstance(args[1], torch.dtype):
            return "Cast", {"to": _dtype_name(args[1])}
        return target, {}
    if fx_node.op == "get_attr":
        return "get_attr", {}
    return getattr(target, "__name__", str(target)), {}


def _permutation(fx_node) -> list[int] | None:
    """The ONNX perm of ``x.permute(...)`` / ``x.transpose(a, b)`` (None if not constant)."""
    source = fx_node.args[0].meta.get(_SHAPE_KEY) if isinstance(fx_node.args[0], torch.fx.Node) else None
    dims = fx_node.args[1:]
    if fx_node.target in ("permute", torch.permute) and len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        dims = tuple(dims[0])
    if source is None or not all(isinstance(d, int) for d in dims):
        return None
    rank = len(source)
    if fx_node.target in ("transpose", torch.transpose):
        if len(dims) != 2:
            return None
        perm = list(range(rank))
        a, b = (d % rank for d in dims)
        perm[a], perm[b] = perm[b], perm[a]
        return perm
    return [d % rank for d in dims] if len(dims) == rank else None


def _onnx_pads(conv: _ConvNd) -> dict[int, tuple[int, int]]:
    """The conv's padding as ``{axis: (begin, end)}`` (axes of the batched input; zeros left out).

    ``_reversed_padding_repeated_twice`` lists (begin, end) from the last spatial axis to the
    first; torch computes it for ``padding="same"`` too.
    """
    spatial = conv.weight.dim() - 2
    rp = conv._reversed_padding_repeated_twice
    pads = {2 + i: (rp[2 * (spatial - 1 - i)], rp[2 * (spatial - 1 - i) + 1]) for i in range(spatial)}
    return {axis: pair for axis, pair in pads.items() if any(pair)}


def _padded(shape, pads):
    if shape is None:
        return None
    return tuple(d + sum(pads.get(i, (0, 0))) if isinstance(d, int) else d for i, d in enumerate(shape))


def _bn_params(bn: _BatchNorm, name: str) -> dict[int, Param]:
    """gamma, beta, mean, var at ONNX BatchNormalization's input positions (1 and 0 for
    ``affine=False``; none without running statistics). A frozen BN holds all four as buffers."""
    if bn.running_mean is None or bn.running_var is None:
        return {}
    mean = bn.running_mean
    affine = is_frozen_batchnorm(bn) or bn.affine
    gamma = bn.weight if affine else torch.ones_like(mean)
    beta = bn.bias if affine else torch.zeros_like(mean)
    tensors = {1: (gamma, "weight"), 2: (beta, "bias"), 3: (mean, "running_mean"), 4: (bn.running_var, "running_var")}
    return {i: _param(t, f"{name}.{role}") for i, (t, role) in tensors.items()}


def _param(tensor: torch.Tensor, name: str) -> Param:
    data = tensor.detach().cpu()
    array = data.numpy() if data.dtype in (torch.float16, torch.float32, torch.float64) else data.double().numpy()
    return Param(name, array, _dtype_name(tensor.dtype), handle=tensor)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _is_shape_query(node) -> bool:
    """Reads only a shape, not values (folding does not change shapes), e.g. ``x.size(0)``."""
    if node.op == "call_method" and node.target in ("size", "dim"):
        return True
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) > 1 and node.args[1] in ("shape", "ndim", "dtype", "device")
    return False


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _try_submodule(model: nn.Module, name: str):
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


# --------------------------------------------------------------------------- applying

def _apply(model: nn.Module, steps, view: Graph | None) -> None:
    replacements: dict[nn.Module, nn.Module] = {}
    for step in steps:
        bn = step.bn.handle
        after = activation_split(bn)
        act = after[-1] if after is not None else None  # the drop before it is the identity at inference
        if step.direction == TO_AFFINE:
            scale, shift = (torch.from_numpy(a).to(bn.running_mean.dtype) for a in step.scale_shift)
            replacements[bn] = ChannelAffine(scale, shift) if act is None else nn.Sequential(
                ChannelAffine(scale, shift), act)
        elif step.direction is not None:
            replacements[bn] = nn.Identity() if act is None else act
    with torch.no_grad():
        for node in view.nodes if view is not None else ():
            if node.changed:
                _write_module(node)
    _replace_modules(model, replacements)


def _write_module(node: Node) -> None:
    """Give a folded node's module its final weight and bias (float64 masters) as new
    parameters: the old ones may be shared with the user's model (``copy_weights=False``)."""
    module, weight, bias = node.handle, node.params[1].array, node.params[2].array
    if isinstance(module, nn.Linear) and not (node.op == "Gemm" and node.attrs.get("transB")):
        weight = weight.T  # (in, out) as Gemm(transB=0) / MatMul holds it
    old = module.weight

    def parameter(array, shape):
        tensor = torch.from_numpy(np.ascontiguousarray(array)).to(device=old.device, dtype=old.dtype)
        return nn.Parameter(tensor.reshape(shape), requires_grad=old.requires_grad)

    module.weight = parameter(weight, old.shape)
    module.bias = parameter(bias, -1)


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

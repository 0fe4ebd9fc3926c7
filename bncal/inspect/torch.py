"""The PyTorch front end of :mod:`bncal.inspect.model`: BN layers and the producer/consumer graph of a module.

Kept apart so that inspecting an ONNX file never imports torch. The graph comes from ``torch.fx``
(BN, dropout and activation modules kept as leaves); when tracing fails the leaf modules are
chained in execution order (with example inputs) or in registration order, and a note says so.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

from torch.nn.modules.conv import _ConvNd

from ..torch.bn_modules import activation_split, is_frozen_batchnorm
from ..errors import one_line
from .model import NEVER_UPDATED, NOT_TRACKED, BNLayer, Graph, Node, frozen_layer, statistics_status

__all__ = ["torch_layers", "torch_graph"]

_ACT_MODULES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU,
                nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Mish, nn.PReLU,
                nn.Softplus, nn.RReLU)
_ACT_FUNCTIONS = {F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.gelu, F.silu, F.leaky_relu,
                  F.leaky_relu_, F.elu, F.elu_, F.selu, F.celu, F.hardswish, F.hardsigmoid,
                  F.hardtanh, F.mish, F.prelu, F.softplus, F.rrelu, F.sigmoid, F.tanh,
                  torch.sigmoid, torch.tanh, torch.selu}
_ACT_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_"}
_DROPOUT_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                      F.feature_alpha_dropout, torch.dropout, torch.alpha_dropout,
                      torch.feature_dropout, torch.feature_alpha_dropout}
_PASS_MODULES = (nn.Flatten, nn.Unflatten, nn.Identity)
_PASS_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.permute,
                   torch.transpose}
_LINEAR_FUNCTIONS = {F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
                     F.linear, torch.matmul}
_PASS_METHODS = {"view", "reshape", "flatten", "contiguous", "squeeze", "unsqueeze", "permute",
                 "transpose"}


def _module_kind(module: nn.Module) -> str:
    if isinstance(module, _BatchNorm) or is_frozen_batchnorm(module):
        return "bn"
    if isinstance(module, (_ConvNd, nn.Linear)):
        return "linear"
    if isinstance(module, _DropoutNd):
        return "dropout" if module.p > 0 else "pass"
    if isinstance(module, _ACT_MODULES):
        return "act"
    if isinstance(module, _PASS_MODULES):
        return "pass"
    return "other"


class _LeafTracer(fx.Tracer):
    # BatchRenorm and other BN subclasses live outside torch.nn: keep them whole too.
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return _module_kind(m) != "other" or super().is_leaf_module(m, qualname)


def _function_name(fn) -> str:
    module = getattr(fn, "__module__", None) or ""
    prefix = "F." if module.endswith("functional") else "torch."
    return prefix + getattr(fn, "__name__", str(fn))


def _dropout_p_is_zero(node: fx.Node) -> bool:
    p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else None)
    return isinstance(p, (int, float)) and p == 0


def _fx_graph(model: nn.Module) -> Graph:
    graph = _LeafTracer().trace(model)
    nodes = []
    for node in graph.nodes:
        inputs = [n.name for n in node.all_input_nodes]
        kind, label, layer = "other", node.name, None
        if node.op == "call_module":
            module = model.get_submodule(node.target)
            kind = _module_kind(module)
            label = str(node.target)
            layer = label if kind == "bn" else None
            if kind == "bn" and activation_split(module) is not None:
                # timm's BatchNormAct2d: its activation runs inside it, after the BN.
                nodes.append(Node(f"{node.name}/bn", kind, label, inputs, layer))
                kind, label, layer, inputs = "act", f"{label}.act", None, [f"{node.name}/bn"]
        elif node.op == "call_function":
            label = f"{_function_name(node.target)} ({node.name})"
            if node.target in _ACT_FUNCTIONS:
                kind = "act"
            elif node.target in _DROPOUT_FUNCTIONS:
                kind = "pass" if _dropout_p_is_zero(node) else "dropout"
            elif node.target in _PASS_FUNCTIONS:
                kind = "pass"
            elif node.target in _LINEAR_FUNCTIONS:
                kind = "linear"
        elif node.op == "call_method":
            label = f".{node.target}() ({node.name})"
            if node.target in _ACT_METHODS:
                kind = "act"
            elif node.target in _PASS_METHODS:
                kind = "pass"
        elif node.op == "output":
            kind, label = "output", "model output"
        nodes.append(Node(node.name, kind, label, inputs, layer))
    return Graph(nodes)


def _leaf_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules with no children, or BN/dropout/activation modules (kept whole), in order."""
    leaves, inside = [], None
    for name, module in model.named_modules():
        if inside is not None and name.startswith(inside):
            continue
        if _module_kind(module) != "other" or not any(True for _ in module.children()):
            if name:
                leaves.append((name, module))
            if any(True for _ in module.children()):
                inside = name + "."
    return leaves


def _chain_graph(model: nn.Module, order: list[str]) -> Graph:
    nodes, previous = [], []
    for i, name in enumerate(order):
        module = model.get_submodule(name)
        kind = _module_kind(module)
        key = f"{name}#{i}"
        nodes.append(Node(key, kind, name, previous, name if kind == "bn" else None))
        previous = [key]
        if kind == "bn" and activation_split(module) is not None:
            nodes.append(Node(f"{key}/act", "act", f"{name}.act", previous))
            previous = [f"{key}/act"]
    nodes.append(Node("output", "output", "model output", previous))
    return Graph(nodes)


def _execution_order(model: nn.Module, example_inputs) -> list[str]:
    """Names of the leaf modules in the order a forward pass (eval mode, no grad) calls them."""
    order, handles = [], []
    modes = {m: m.training for m in model.modules()}
    for name, module in _leaf_modules(model):
        handles.append(module.register_forward_pre_hook(lambda m, a, name=name: order.append(name)))
    try:
        model.eval()
        inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
        with torch.no_grad():
            model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    return order


def torch_graph(model: nn.Module, example_inputs, notes: list[str]) -> tuple[Graph, str]:
    try:
        return _fx_graph(model), "torch.fx"
    except Exception as error:  # fx raises many types (TraceError, TypeError, ...)
        reason = one_line(error)
    if example_inputs is not None:
        try:
            order = _execution_order(model, example_inputs)
            notes.append(f"torch.fx could not trace the model ({reason}); producer/consumer relations "
                         "are guessed from the order one forward pass calls the leaf modules, so graph "
                         "rules (BN020, BN021, BN030) can miss functional ops and branches")
            return _chain_graph(model, order), "execution order"
        except Exception as run_error:
            reason += f"; running example_inputs failed too ({one_line(run_error)})"
    notes.append(f"torch.fx could not trace the model ({reason}); producer/consumer relations are "
                 "guessed from the registration order of the leaf modules, so graph rules (BN020, "
                 "BN021, BN030) can be wrong; pass example_inputs for the execution order")
    return _chain_graph(model, [name for name, _ in _leaf_modules(model)]), "module order"


def torch_layers(model: nn.Module) -> list[BNLayer]:
    from ..torch.nn import is_batch_renorm  # local: bncal.torch.nn imports nothing from here, but keep it light

    layers = []
    for name, m in model.named_modules():
        if is_frozen_batchnorm(m):
            layers.append(frozen_layer(name or type(m).__name__, type(m).__name__, int(m.running_mean.shape[0]),
                                        float(m.eps)))
            continue
        if not isinstance(m, _BatchNorm):
            continue
        momentum = None if m.momentum is None else float(m.momentum)
        counter = None
        if m.track_running_stats and m.running_mean is not None:
            counter = None if m.num_batches_tracked is None else int(m.num_batches_tracked)
            stats, detail = statistics_status(m.running_mean.detach().double().cpu().numpy(),
                                              m.running_var.detach().double().cpu().numpy(), counter)
        else:
            stats, detail = NOT_TRACKED, "no running statistics: inference uses batch statistics"
        layers.append(BNLayer(
            name=name or type(m).__name__, type=type(m).__name__, channels=int(m.num_features),
            momentum_torch=momentum, momentum_tf=None if momentum is None else 1.0 - momentum,
            affine=bool(m.affine), track_running_stats=bool(m.track_running_stats), eps=float(m.eps),
            stats=stats, stats_detail=detail, renorm=is_batch_renorm(m), num_batches_tracked=counter,
            momentum_zero_signal=stats == NEVER_UPDATED and bool(counter)))
    return layers

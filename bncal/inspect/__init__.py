"""Check a BatchNorm network against what is known about training and deploying BN.

:func:`bncal.inspect_model` takes a PyTorch module, an ONNX model or a Keras model and returns an
:class:`InspectReport`: one row per BN layer and a list of :class:`Finding` values, each with a
stable rule id, the evidence, and a fix. Nothing is printed; ``report.table()`` renders text
and :func:`bncal.report.to_jsonable` turns the report into JSON.

Rules (severity, trigger):

=====  ========  ===========================================================================
BN001  error     moving statistics never updated: running mean all 0 and running var all 1 (a Keras
                 renorm layer: moving stddev 1, i.e. variance 1 - epsilon); a warning for batch
                 renormalisation layers whose renorm averages never moved either: with r and d
                 unclipped in training the network was trained against exactly those values
BN002  error     degenerate statistics: a variance <= 0 or non-finite, a non-finite mean
BN003  warning   momentum 0 (PyTorch) / 1 (TF, ONNX): the moving statistics cannot change
BN004  warning   track_running_stats=False: inference normalises with each batch's statistics
BN005  error     ONNX BatchNormalization with training_mode=1 in a graph meant for inference
BN010  info/w.   momentum does not fit batch and dataset size (:func:`bncal.momentum.suggest_momentum`)
BN020  info      affine BN directly after a nonlinearity: scale/shift redundant with the next layer
BN021  warning   non-affine BN directly before a nonlinearity: scale/shift needed
BN030  warning   dropout upstream of a BN through non-BN ops (variance shift, Li et al. 2019)
BN040  info      batch size <= 32 per device: batch renormalisation (Ioffe 2017)
BN050  info      BN that cannot be folded, with the folding pass's reason
BN060  warning   ONNX: normalisation a converter lowered to arithmetic (:mod:`bncal.onnx.lowered`):
                 its statistics are folded into constants, no command can check or recalibrate them
=====  ========  ===========================================================================

A BN attribute the file does not carry is reported as absent, never as the ONNX default: an
ONNX BatchNormalization without ``momentum`` has ``momentum_absent`` set, both momenta None
(``absent`` in the table, null in JSON), and BN010 leaves it out (the notes say so).

The graph rules (BN020, BN021, BN030) look at producer/consumer relations. For PyTorch these
come from ``torch.fx`` (BN, dropout and activation modules kept as leaves); when tracing fails
the leaf modules are chained in execution order (if ``example_inputs`` are given) or in
registration order, and the report says so in its notes. For ONNX they come from the graph.
Shape-only ops (flatten, reshape, view, squeeze, transpose, identity) count as transparent when
deciding what is "directly" before or after a BN.

The parts: :mod:`bncal.inspect.model` (rules, findings, BN rows, the report, the graph),
:mod:`bncal.inspect.rules` (the rules, run by :func:`inspect_graph`), and one front end per model
kind that reduces a model to BN rows and a graph: :mod:`bncal.inspect.torch`,
:mod:`bncal.inspect.onnx`, :mod:`bncal.keras.inspection`. :func:`inspect_model`
(``bncal.inspect_model``) routes a model to its front end.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..errors import BncalError
from ..extras import is_torch_module
from ..report import FoldDecision
from .model import RECALIBRATE_COMMAND, RULES, SEVERITIES, BNLayer, Finding, Graph, InspectReport, Node, frozen_layer
from .rules import inspect_graph

__all__ = ["inspect_model", "InspectReport", "Finding", "BNLayer", "Graph", "Node", "RULES", "SEVERITIES",
           "RECALIBRATE_COMMAND", "inspect_graph"]


def inspect_model(model, *, batch_size: int | None = None, dataset_size: int | None = None,
                  epochs: float = 1, example_inputs=None,
                  fold_decisions: list[FoldDecision] | Callable | None = None) -> InspectReport:
    """Inspect the BatchNorm layers of ``model`` (a PyTorch module, an ONNX ModelProto or the
    path of an ``.onnx`` file; a Keras model or ``.keras`` path goes to
    :func:`bncal.keras.inspect`) and return an :class:`~bncal.inspect.InspectReport`.

    ``batch_size`` (per device) enables BN040, and with ``dataset_size`` and ``epochs`` BN010.
    ``example_inputs`` (a tensor or tuple) is only used when ``torch.fx`` cannot trace the
    model: one eval-mode forward without gradients records the order of the modules, and the
    model's train/eval flags are restored. ``fold_decisions`` is a list of
    :class:`bncal.report.FoldDecision` or a callable producing one, called as
    ``fold_decisions(model)``, or ``fold_decisions(model, example_inputs)`` when example inputs
    are given (so ``bncal.folding.analyze_foldability`` can be passed as it is).
    The model is not modified.
    """
    from ..keras import is_keras_model
    from ..loading import model_kind

    notes: list[str] = []
    lowered = None
    # A Keras model is an nn.Module too on the torch backend: ask first.
    if isinstance(model, (str, Path)) and model_kind(model).name == "keras" or is_keras_model(model):
        from ..keras import inspect

        return inspect(model, batch_size=batch_size, dataset_size=dataset_size, epochs=epochs,
                       example_inputs=example_inputs)
    if isinstance(model, (str, Path)):
        import onnx

        path = Path(model)
        if not path.is_file():
            raise BncalError(f"{path} is not a file; give an .onnx model or pass a torch.nn.Module")
        model = onnx.load(str(path))

    if is_torch_module(model):
        from .torch import torch_graph, torch_layers

        source = "pytorch"
        layers = torch_layers(model)
        if layers:
            graph, graph_source = torch_graph(model, example_inputs, notes)
        else:
            graph, graph_source = Graph([]), "torch.fx"
    elif type(model).__name__ == "ModelProto":
        from ..onnx.lowered import find_lowered_normalisations
        from .onnx import onnx_graph_and_layers

        source, graph_source = "onnx", "onnx"
        graph, layers = onnx_graph_and_layers(model)
        lowered = find_lowered_normalisations(model)
        # A frozen BN exported from PyTorch is a BN row of its own, not a converter's lowering.
        layers += [frozen_layer(l.name, l.frozen, l.channels, float("nan")) for l in lowered if l.frozen]
        lowered = [l for l in lowered if not l.frozen]
    else:
        raise BncalError(f"cannot inspect a {type(model).__name__}; give a torch.nn.Module or an ONNX model")

    decisions = None
    if fold_decisions is not None:
        if callable(fold_decisions):
            args = (model,) if example_inputs is None else (model, example_inputs)
            decisions = fold_decisions(*args)
        else:
            decisions = fold_decisions
    return inspect_graph(source, graph, layers, graph_source=graph_source, batch_size=batch_size,
                         dataset_size=dataset_size, epochs=epochs, fold_decisions=decisions, notes=notes,
                         lowered=lowered)

"""Export PyTorch models to ONNX: eval-mode inference graphs, and train-mode graphs for checks.

:func:`export_onnx` uses ``torch.onnx.export(dynamo=True, optimize=True)`` by default:
``optimize=False`` is no faster and leaves shape arithmetic behind, and the TorchScript exporter
(``dynamo=False``) is deprecated and leaves Identity nodes (timings: README, "Measured figures
behind the defaults"). ``optimize=True`` folds BN into Conv/ConvTranspose/Gemm with onnxscript's rewrite
rules, so what is left depends on the onnxscript version. ``fold-export``
(:func:`bncal.folding.export.fold_export_torch`) therefore folds with bncal's own rules, in the
module before the export (:func:`export_owned_ir` of the folded copy) and in the graph for
what is left, exporting with ``keep_batchnorm=True`` (onnxscript's optimizer without its
BN-fusion rules); BN and linear nodes are named after their PyTorch modules, so its decisions
use the names ``bncal inspect`` shows.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import logging
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from ..outputs import atomic_output
from .passes import output_tensors
from ..errors import BncalError, one_line
from ..folding import as_tuple, check_initialized, meta_clone

__all__ = ["export_onnx", "export_train_mode_onnx", "supported_opsets", "forward_parameter_names",
           "positional_inputs"]

_PROTOBUF_LIMIT = 2**31 - 1
_BATCH_AXIS = "batch"


def export_onnx(
    model: nn.Module,
    example_inputs,
    path=None,
    *,
    opset: int | None = None,
    input_names=None,
    output_names=None,
    dynamic_batch: bool = True,
    dynamo: bool = True,
    keep_batchnorm: bool = False,
) -> onnx.ModelProto:
    """Export an eval-mode copy of ``model`` to ONNX and return the checked ``ModelProto``.

    ``example_inputs`` is the tuple of positional tensor inputs (a lone tensor is accepted).
    ``model`` is not modified: a deep copy is put in eval mode, so any BatchNormalization in the
    graph is the inference one. With ``dynamic_batch`` dim 0 of every input and output is the
    symbolic axis ``batch`` (traced at batch 2 when the example has 1 sample, see
    :func:`traced_batch`). Outputs that are tuples, lists or dicts are flattened (dicts in
    insertion order). Default names are ``input``/``output`` for a single tensor; several
    inputs are named after the parameters of ``model.forward`` they are passed to
    (``forward(self, image, meta)``: ``image``, ``meta``), so that dict batches by those names
    feed the graph; ``input_0, ...`` where the parameters cannot name them (``*args``), and
    ``output_0, ...`` for several outputs; outputs in dicts are named after their keys
    (``{"out": y, "aux": z}``: ``out``, ``aux``; nested ones join their path with ``_``).
    ``dynamo=False`` uses the deprecated TorchScript
    exporter. ``keep_batchnorm=True`` keeps every BatchNormalization node (a reference export of
    an unfolded model): the graph gets constant folding only, none of onnxscript's rewrite rules
    (which fuse BN into Conv/Gemm). If ``path`` is given the model is written there atomically,
    as one file (ONNX external data only above the 2 GB protobuf limit, beside it as
    ``<name>.data``).
    Raises :class:`BncalError` if the exporter fails or the names do not fit.
    """
    check_initialized(model)
    return export_owned_module(copy.deepcopy(model).eval(), example_inputs, path, opset=opset, input_names=input_names,
                               output_names=output_names, dynamic_batch=dynamic_batch, dynamo=dynamo,
                               keep_batchnorm=keep_batchnorm)


def export_owned_module(work: nn.Module, example_inputs, path=None, *, opset: int | None = None, input_names=None,
                        output_names=None, dynamic_batch: bool = True, dynamo: bool = True,
                        keep_batchnorm: bool = False, check: bool = True) -> onnx.ModelProto:
    """:func:`export_onnx` of ``work`` itself, not of a copy: for a module the caller made and
    owns (such as :func:`bncal.folding.fold`'s result), in eval mode; the exporter may change it.
    ``check=False`` (without ``path``) skips ``onnx.checker``, for a caller that loads the graph in
    onnxruntime anyway (ResNet-18: 0.15 s of checking and sizing)."""
    names = dict(opset=opset, input_names=input_names, output_names=output_names, dynamic_batch=dynamic_batch)
    if dynamo:
        import onnx_ir as ir

        proto = ir.serde.serialize_model(export_owned_ir(work, example_inputs, keep_batchnorm=keep_batchnorm, **names))
    else:
        inputs = as_tuple(example_inputs)
        input_names, output_names = _names(work, inputs, input_names, output_names)
        with _exporter_errors(dynamic_batch):
            proto = _torchscript_export(work, inputs, opset, input_names, output_names, dynamic_batch,
                                        torch.onnx.TrainingMode.EVAL, constant_folding=not keep_batchnorm)
    return _check_and_save(proto, path) if check or path is not None else proto


def export_owned_ir(work: nn.Module, example_inputs, *, opset: int | None = None, input_names=None,
                    output_names=None, dynamic_batch: bool = True, keep_batchnorm: bool = False):
    """:func:`export_owned_module` with torch's dynamo exporter, as the ``onnx_ir.Model`` it
    builds: no ``ModelProto``, whose weights would be copies (see :mod:`bncal.onnx.io`). Its
    initializers are ``work``'s own tensors. Not checked."""
    inputs = as_tuple(example_inputs)
    input_names, output_names = _names(work, inputs, input_names, output_names)
    with _exporter_errors(dynamic_batch):
        dynamic_shapes = None
        if dynamic_batch:
            inputs = traced_batch(inputs)
            batch = torch.export.Dim(_BATCH_AXIS)
            dynamic_shapes = tuple({0: batch} if isinstance(x, torch.Tensor) else None for x in inputs)
        program = torch.onnx.export(
            work, inputs, dynamo=True, optimize=not keep_batchnorm, external_data=False,
            opset_version=opset, input_names=input_names, output_names=output_names,
            dynamic_shapes=dynamic_shapes)
        model = program.model
        if keep_batchnorm:
            _optimize_keeping_batchnorm(model)
    got = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    if opset is not None and got != opset:  # the exporter falls back silently
        raise BncalError(f"the exporter could not produce opset {opset} for this model (onnx's version converter "
                         f"failed, it gave opset {got}); ask for opset {got} or leave the opset out")
    _name_nodes_after_modules(model)
    return model


@contextlib.contextmanager
def _exporter_errors(dynamic_batch: bool):
    """The exporter's output silenced, and its failures as one-line BncalErrors."""
    with _quiet():
        try:
            yield
        except BncalError:
            raise
        except Exception as exc:
            hint = "; if the model fixes its batch size, pass dynamic_batch=False" if dynamic_batch else ""
            raise BncalError(f"torch.onnx.export failed: {one_line(exc)}{hint}") from exc


def traced_batch(inputs: tuple) -> tuple:
    """The example inputs a dynamic batch axis is traced with: ``inputs``, or each tensor twice
    over when they hold one sample. torch.export specialises sizes 0 and 1, and some models
    fail to export at batch 1 with a dynamic axis (ConvNeXt-T: "Invalid ranges [2:1]")."""
    tensors = [x for x in inputs if isinstance(x, torch.Tensor)]
    if not tensors or any(x.dim() == 0 or x.shape[0] != 1 for x in tensors):
        return inputs
    return tuple(torch.cat([x, x]) if isinstance(x, torch.Tensor) else x for x in inputs)


def supported_opsets() -> range:
    """The opsets :func:`export_onnx` may be asked for: torch's lowest to the newest this onnx knows.
    Below the exporter's own (18) onnx's version converter is used, which can fail for a model."""
    from torch.onnx import _constants

    return range(_constants.ONNX_MIN_OPSET, onnx.defs.onnx_opset_version() + 1)


def _optimize_keeping_batchnorm(model) -> None:
    """What ``optimize=True`` does (constant folding, onnxscript's default rewrite rules, dead
    node removal) minus the rules that fuse BatchNormalization, so the graph is as clean as the
    exporter's default and every BN is still there. Falls back to folding constants only where
    this onnxscript lacks those rules."""
    import onnxscript.optimizer

    onnxscript.optimizer.fold_constants(model)
    rules = rewrite_rules_keeping_batchnorm()
    if rules:
        from onnxscript import rewriter

        rewriter.rewrite(model, pattern_rewrite_rules=rules)
    onnxscript.optimizer.remove_unused_nodes(model)


def rewrite_rules_keeping_batchnorm() -> list | None:
    """onnxscript's default rewrite rules without its BN-fusion rules, or None where this
    onnxscript does not have them.

    The BN-fusion rules are onnxscript's public rule objects
    (``onnxscript.rewriter.rules.common.fuse_batchnorm_into_*_rule``), removed by identity. The
    default set itself has no public name in onnxscript 0.7 (``optimize`` reads
    ``rewriter._DEFAULT_REWRITE_RULES``); it is taken from there so that the graph is what
    ``optimize=True`` would give, BNs aside.
    """
    try:
        from onnxscript import rewriter
        from onnxscript.rewriter.rules import common

        batchnorm_fusions = (common.fuse_batchnorm_into_conv_rule, common.fuse_batchnorm_into_conv_transpose_rule,
                             common.fuse_batchnorm_into_gemm_rule)
        default = list(rewriter._DEFAULT_REWRITE_RULES)
    except (ImportError, AttributeError):
        return None
    kept = [rule for rule in default if not any(rule is fusion for fusion in batchnorm_fusions)]
    return kept if len(kept) == len(default) - len(batchnorm_fusions) else None


_NAMED_AFTER_MODULES = ("BatchNormalization", "Conv", "ConvTranspose", "Gemm", "MatMul")


def _name_nodes_after_modules(model) -> None:
    """Rename BN, Conv and matrix-product nodes of an ``onnx_ir.Model`` after the PyTorch module
    they came from (``layer1.0.bn1``), so reports on the ONNX graph speak the model's language.
    The dynamo exporter records the module path in each node's ``pkg.torch.onnx.name_scopes``;
    names stay unique (a second node of the same module keeps its own name)."""
    import ast

    taken = {n.name for n in model.graph}
    for node in model.graph:
        if node.op_type not in _NAMED_AFTER_MODULES:
            continue
        scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
        try:
            module = ast.literal_eval(scopes)[-2] if scopes else ""
        except (ValueError, SyntaxError, IndexError):
            continue
        if module and module not in taken:
            taken.discard(node.name)
            node.name = module
            taken.add(module)


def export_train_mode_onnx(
    model: nn.Module,
    example_inputs,
    path=None,
    *,
    opset: int | None = None,
    input_names=None,
    output_names=None,
    dynamic_batch: bool = True,
) -> onnx.ModelProto:
    """Export a train-mode copy of ``model``: BatchNormalization with ``training_mode=1``.

    Only the TorchScript exporter can emit train-mode BN (the dynamo exporter silently exports
    eval behaviour). It runs the model while tracing, which updates running statistics, so it
    works on a deep copy and ``model`` is left as it was. Constant folding is off so that no BN
    is folded away. Names, ``dynamic_batch`` and ``path`` work as in :func:`export_onnx`.
    """
    inputs = as_tuple(example_inputs)
    check_initialized(model)
    work = copy.deepcopy(model)
    input_names, output_names = _names(work.eval(), inputs, input_names, output_names)
    work.train()
    with _quiet():
        try:
            proto = _torchscript_export(work, inputs, opset, input_names, output_names,
                                        dynamic_batch, torch.onnx.TrainingMode.TRAINING,
                                        constant_folding=False)
        except Exception as exc:
            raise BncalError(f"torch.onnx.export (training mode) failed: {one_line(exc)}") from exc
    return _check_and_save(proto, path)


def _torchscript_export(model, inputs, opset, input_names, output_names, dynamic_batch, training,
                        constant_folding=True):
    # In eval mode this exporter fuses Conv+BN as part of constant folding.
    buffer = io.BytesIO()
    dynamic_axes = None
    if dynamic_batch:
        dynamic_axes = {name: {0: _BATCH_AXIS} for name in [*input_names, *output_names]}
    torch.onnx.export(
        model, inputs, buffer, dynamo=False, opset_version=opset, input_names=input_names,
        output_names=output_names, dynamic_axes=dynamic_axes, training=training,
        do_constant_folding=constant_folding)
    return onnx.load_from_string(buffer.getvalue())


def _names(model, inputs, input_names, output_names) -> tuple[list[str], list[str]]:
    """Validate or default the input and output names (one per tensor leaf)."""
    n_inputs = sum(isinstance(x, torch.Tensor) for x in inputs)
    with torch.no_grad():
        try:  # counting outputs needs no arithmetic: try on the meta device first
            meta_inputs = tuple(x.to("meta") if isinstance(x, torch.Tensor) else x for x in inputs)
            returned = meta_clone(model)(*meta_inputs)
        except Exception:
            try:
                returned = model(*inputs)
            except Exception as exc:
                from ..data import input_hint

                raise BncalError(
                    f"the model failed on the example inputs: {one_line(exc)}; pass inputs of the shape and "
                    f"dtype the model expects{input_hint(inputs, one_line(exc))}") from exc
    _refuse_missing_outputs(returned)
    if input_names is None and n_inputs > 1:
        parameters = forward_parameter_names(model)
        if parameters is not None and len(inputs) <= len(parameters):
            input_names = [name for name, x in zip(parameters, inputs) if isinstance(x, torch.Tensor)]
    input_names = _default_names(input_names, n_inputs, "input")
    outputs = output_tensors(returned)
    if output_names is None:
        output_names = _keyed_output_names(returned)
        if output_names is not None and set(output_names) & set(input_names):
            output_names = None  # a key that names an input too: ONNX names must be distinct
    output_names = _default_names(output_names, len(outputs), "output")
    return input_names, output_names


def _refuse_missing_outputs(returned) -> None:
    """BncalError when the forward returns None, or a tuple/list/dict holding None: an ONNX
    graph's outputs are tensors, and the comparisons need every one of them."""
    def where_none(value, path=""):
        if value is None:
            return path or "the result"
        items = (value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (tuple, list))
                 else ())
        return next((w for k, v in items if (w := where_none(v, f"{path}[{k!r}]")) is not None), None)

    missing = where_none(returned)
    if returned is None:
        raise BncalError("the model's forward returned None, so there is nothing to export or compare; return the "
                         "output tensor(s) from forward")
    if missing is not None:
        raise BncalError(f"the model's forward returned a {type(returned).__name__} holding None at {missing}; an "
                         "exported graph's outputs are tensors: return only tensors (drop the None entries)")


def forward_parameter_names(model) -> list[str] | None:
    """The names of the parameters of ``model.forward`` that take positional inputs, in order
    (None when the signature cannot be read); ``*args`` and keyword-only parameters are not
    included."""
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in signature.parameters.values() if p.kind in kinds]


def positional_inputs(model, batch) -> tuple[tuple, list[str] | None]:
    """One batch as ``model``'s positional inputs, and their names where the batch names them.

    A dict (keyword inputs, any key order) becomes its values in the order of
    ``model.forward``'s parameters, a parameter left out in between taking its default; the
    names are the keys in that order. A tuple or list is the positional inputs as they are, a
    lone value the only one (names None).
    """
    if not isinstance(batch, dict):
        return (tuple(batch) if isinstance(batch, (list, tuple)) else (batch,)), None
    parameters = forward_parameter_names(model)
    if parameters is None:
        return tuple(batch.values()), list(batch)
    unknown = [k for k in batch if k not in parameters]
    if unknown:
        raise BncalError(f"the batch's keys {unknown} are not parameters of the model's forward{tuple(parameters)}; "
                         "pick the model's inputs out of each batch with --inputs KEY (library: inputs=)")
    last = max(parameters.index(k) for k in batch)
    signature = inspect.signature(model.forward).parameters
    values, names = [], []
    for name in parameters[:last + 1]:
        if name in batch:
            values.append(batch[name])
            names.append(name)
        elif signature[name].default is not inspect.Parameter.empty:
            values.append(signature[name].default)
        else:
            raise BncalError(f"the batch gives {', '.join(map(repr, batch))} but not {name!r}, which the model's "
                             "forward needs before them; give every input")
    return tuple(values), names


def _default_names(names, count: int, stem: str) -> list[str]:
    if names is None:
        return [stem] if count == 1 else [f"{stem}_{i}" for i in range(count)]
    names = list(names)
    if len(names) != count:
        raise BncalError(f"{len(names)} {stem} names given for {count} {stem} tensors; "
                         f"give one name per {stem} tensor")
    if len(set(names)) != len(names):
        raise BncalError(f"{stem} names must be distinct, got {names}")
    return names


def _keyed_output_names(value) -> list[str] | None:
    """Output names from the keys of dict outputs (``{"out": y, "aux": z}`` gives ``out``, ``aux``;
    nested leaves join their path with ``_``, a leading position as ``output_<i>``), in
    :func:`_flatten`'s order; None when no dict holds a tensor, or the names would repeat."""
    paths: list[tuple] = []

    def walk(v, path):
        if isinstance(v, torch.Tensor):
            paths.append(path)
        elif isinstance(v, (tuple, list)):
            for i, item in enumerate(v):
                walk(item, (*path, i))
        elif isinstance(v, dict):
            for key, item in v.items():
                walk(item, (*path, str(key)))

    walk(value, ())
    if not any(isinstance(p, str) for path in paths for p in path):
        return None
    names = ["_".join(map(str, ("output", *path) if isinstance(path[0], int) else path)) for path in paths]
    return names if len(set(names)) == len(names) else None


def _check_and_save(proto: onnx.ModelProto, path) -> onnx.ModelProto:
    large = _byte_size(proto) > _PROTOBUF_LIMIT
    if not large:
        onnx.checker.check_model(proto)
    if path is not None:
        path = Path(path)
        with atomic_output(path) as tmp:
            if large:
                onnx.save_model(proto, tmp, save_as_external_data=True,
                                all_tensors_to_one_file=True, location=f"{path.name}.data")
                onnx.checker.check_model(str(tmp))
            else:
                onnx.save_model(proto, tmp)
    return proto


def _byte_size(proto) -> int:
    try:
        return proto.ByteSize()
    except Exception:  # protobuf refuses to size messages beyond its limit
        return _PROTOBUF_LIMIT + 1


@contextlib.contextmanager
def _quiet():
    """Silence the exporters' progress prints, warnings and log lines; restore afterwards."""
    # onnxscript's version converter logs a traceback when it cannot reach an opset; bncal says so itself.
    loggers = {logging.getLogger("torch.onnx"): logging.ERROR, logging.getLogger("onnxscript"): logging.CRITICAL}
    levels = {logger: logger.level for logger in loggers}
    for logger, level in loggers.items():
        logger.setLevel(level)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in levels.items():
            logger.setLevel(level)

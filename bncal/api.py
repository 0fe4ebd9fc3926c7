"""The front doors that take any model kind: :func:`check` routes a model to its framework's check.

Routing by kind lives here, above the per-framework modules, so that none of them needs to
know the others.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from .checking import CheckReport, CheckThresholds
from .errors import BncalError
from .extras import is_torch_module

__all__ = ["check"]


def check(
    model,
    data: Iterable,
    *,
    thresholds: CheckThresholds = CheckThresholds(),
    max_samples: int | None = None,
    providers: list | None = None,
    progress: bool | Callable[[int], None] = False,
    inputs=None,
    parity_batches: int = 3,
) -> CheckReport:
    """Check whether ``model``'s moving BN statistics match ``data``: the front door of every model kind.

    - an ``onnx.ModelProto`` or ``.onnx`` path: :func:`bncal.onnx_check.check_onnx`, in onnxruntime;
    - a ``torch.nn.Module`` with batch renormalisation layers: :func:`bncal.check_torch.check_torch`,
      in PyTorch (an export would make them plain BatchNorms, whose train mode is not theirs);
    - any other ``torch.nn.Module``: exported to ONNX with its BatchNorms kept (inputs shaped like
      the first batch, a dynamic batch axis), then :func:`~bncal.onnx_check.check_onnx` on that graph; PyTorch
      eval and onnxruntime are first compared on the first ``parity_batches`` batches
      (:attr:`CheckReport.parity`), and a failed parity fails the check: the export would not
      speak for the model. The model's train/eval flags are left as they were;
    - a Keras model or ``.keras`` path: :func:`bncal.keras.check`, in Keras itself
      (``providers`` does not apply there).

    ``data`` is an iterable of batches (numpy arrays or tensors; tuples or dicts for several
    inputs; ``inputs`` picks them out of ``(inputs, labels)`` batches, see
    :func:`bncal.data.select_inputs`). Returns the :class:`CheckReport`; ``report.passed`` and
    ``report.verdict`` give the outcome.

    Raises:
        BncalError: a model of another kind, data not matching the model, no BN to check.
    """
    from pathlib import Path

    from .data import NumpyBatches, select_inputs
    from .keras import is_keras_model

    if isinstance(model, (str, Path)):
        from .loading import model_kind

        path = Path(model)
        if model_kind(path).name == "keras":
            from .keras import load_model as load_keras

            model = load_keras(path)
        else:
            import onnx

            if not path.is_file():
                raise BncalError(f"{path} is not a file; give an .onnx or .keras model, or a model object")
            model = onnx.load(str(path))
    if is_keras_model(model):
        from .keras import check as check_keras

        return check_keras(model, select_inputs(data, inputs), thresholds=thresholds, max_samples=max_samples,
                           progress=progress)
    if type(model).__name__ == "ModelProto":
        from .onnx_check import check_onnx

        return check_onnx(model, data, thresholds=thresholds, max_samples=max_samples, providers=providers,
                          progress=progress, inputs=inputs)
    if not is_torch_module(model):
        raise BncalError(f"cannot check a {type(model).__name__}; give an ONNX model, a torch.nn.Module or a "
                         "Keras model")
    from itertools import islice

    import torch

    from .data import TorchBatches
    from .export import export_onnx, positional_inputs
    from .fold_export import torch_onnx_parity
    from .nn import is_batch_renorm

    selected = select_inputs(data, inputs)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    if any(is_batch_renorm(m) for m in model.modules()):
        # An export turns a renorm layer into a plain BatchNormalization, whose train mode is not renorm's.
        from .check_torch import check_torch

        report = check_torch(model, TorchBatches(selected, dtype), thresholds=thresholds, max_samples=max_samples,
                             progress=progress)
        report.notes.append("checked in PyTorch, not in onnxruntime: the model has batch renormalisation layers, "
                            "which an ONNX export turns into plain BatchNormalization")
        return report
    first = [positional_inputs(model, batch) for batch in islice(TorchBatches(selected, dtype), parity_batches)]
    if not first:
        raise BncalError("the data is empty; give at least one batch")
    # Dict batches name the graph inputs, so that they feed it by name whatever their key order.
    proto = export_onnx(model, first[0][0], keep_batchnorm=True, input_names=first[0][1])
    parity = torch_onnx_parity(model, proto, [batch for batch, _ in first])
    from .onnx_check import check_onnx

    report = check_onnx(proto, NumpyBatches(selected), thresholds=thresholds, max_samples=max_samples,
                        providers=providers, progress=progress)
    return report.with_parity(parity)

"""The front doors that take any model kind: :func:`recalibrate` and :func:`check` route a model to
its framework's path (PyTorch, ONNX or Keras); :func:`assert_deployable` runs inspect, check and the
accuracy guard.

Routing by kind lives here, above the per-framework packages, so that none of them needs to
know the others.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from .checking import CheckReport, CheckThresholds
from .errors import BncalError, DeploymentError
from .extras import MissingExtra, is_available, is_torch_module
from .gate import DeploymentReport, allowed_notes, allowed_rules, refusal, refused_findings

__all__ = ["recalibrate", "check", "assert_deployable"]


def recalibrate(model, data, **options):
    """Recompute the moving statistics of every BatchNorm in ``model`` from ``data``, in place.

    A PyTorch module: :func:`bncal.torch.recalibration.recalibrate`, where every option is
    documented. A ``keras.Model`` (on Keras's torch backend an ``nn.Module`` too, so it is asked
    first): :func:`bncal.keras.recalibrate`, with its options (``batch_size`` among them: arrays
    in ``data`` are cut into batches of 32 rows by default); ``device``, ``process_group``,
    ``inputs`` and ``guard`` do not apply to it and are refused, the torch eval sweep's
    ``cache_mb`` and ``spill_dir`` are ignored, and an option neither path knows is a TypeError.
    An ONNX model: :func:`bncal.recalibrate_onnx`, which returns a new model.

    Returns the :class:`~bncal.report.RecalibrationReport`.
    """
    from .keras import is_keras_model

    if is_keras_model(model):
        if options.get("device") is not None or options.get("process_group") is not None:
            raise BncalError("a keras.Model is recalibrated by bncal.keras.recalibrate, on the devices Keras places "
                             "it on and in one process: leave device and process_group unset")
        if options.get("inputs") is not None:
            raise BncalError("a keras.Model reads Keras's own batches ((x, y) tuples keep x): leave inputs unset")
        if options.get("guard") is not None:
            raise BncalError("the accuracy guard scores PyTorch and ONNX models; score a Keras model on your held-out "
                             "data yourself")
        from .keras import recalibrate as recalibrate_keras

        unused = {"cache_mb", "spill_dir", "metric", "guard_tol", "device", "process_group", "inputs", "guard"}
        return recalibrate_keras(model, data, **{k: v for k, v in options.items() if k not in unused})
    if type(model).__name__ == "ModelProto":
        raise BncalError("an ONNX model is recalibrated into a new model: use bncal.recalibrate_onnx(model, data), "
                         "which returns (new_model, report)")
    if not is_torch_module(model):
        if not is_available("torch"):
            raise MissingExtra("torch", "recalibrating a PyTorch model")
        raise BncalError(f"cannot recalibrate a {type(model).__name__}; give a torch.nn.Module or a Keras model")
    from .torch.recalibration import recalibrate as recalibrate_torch

    return recalibrate_torch(model, data, **options)


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

    - an ``onnx.ModelProto`` or ``.onnx`` path: :func:`bncal.onnx.check.check_onnx`, in onnxruntime;
    - a ``torch.nn.Module`` with batch renormalisation layers: :func:`bncal.torch.check.check_torch`,
      in PyTorch (an export would make them plain BatchNorms, whose train mode is not theirs);
    - any other ``torch.nn.Module``: exported to ONNX with its BatchNorms kept (inputs shaped like
      the first batch, a dynamic batch axis), then :func:`~bncal.onnx.check.check_onnx` on that graph; PyTorch
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
        from .onnx.check import check_onnx

        return check_onnx(model, data, thresholds=thresholds, max_samples=max_samples, providers=providers,
                          progress=progress, inputs=inputs)
    if not is_torch_module(model):
        raise BncalError(f"cannot check a {type(model).__name__}; give an ONNX model, a torch.nn.Module or a "
                         "Keras model")
    from itertools import islice

    import torch

    from .data import TorchBatches
    from .torch.export import export_onnx, positional_inputs
    from .folding.export import torch_onnx_parity
    from .torch.nn import is_batch_renorm

    selected = select_inputs(data, inputs)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    if any(is_batch_renorm(m) for m in model.modules()):
        # An export turns a renorm layer into a plain BatchNormalization, whose train mode is not renorm's.
        from .torch.check import check_torch

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
    from .onnx.check import check_onnx

    report = check_onnx(proto, NumpyBatches(selected), thresholds=thresholds, max_samples=max_samples,
                        providers=providers, progress=progress)
    return report.with_parity(parity)


def assert_deployable(model_or_onnx, data=None, guard=None, *, allow=(), metric=None, guard_tol: float | None = None,
                      thresholds=None, inputs=None) -> DeploymentReport:
    """Raise :class:`DeploymentError` unless ``model_or_onnx`` is fit to deploy; else return the
    :class:`DeploymentReport`.

    ``model_or_onnx``: a PyTorch module (checked in eval mode, not modified), an ONNX
    ``ModelProto`` or ``.onnx`` path, or a Keras model. Always: ``bncal inspect``'s rules, every
    error-severity finding not in ``allow`` fails. With ``data`` (batches as for
    :func:`bncal.check_onnx`; ``inputs`` picks the model inputs out of each batch): the
    train/inference check under ``thresholds``; a PyTorch model is exported with its BatchNorms
    kept and checked in onnxruntime, a Keras model is checked in Keras. With ``guard`` (labelled
    batches or a data spec, :func:`bncal.guard.guard_batches`): the accuracy guard, the model
    in inference mode against itself normalising with the guard batches' own statistics,
    ``metric`` (default top-1) within ``guard_tol`` points (default 0.5). The error's
    ``report`` is the :class:`DeploymentReport`.
    """
    from .inspect import inspect_model

    allowed = allowed_rules(allow)
    model = model_or_onnx
    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        from pathlib import Path

        if Path(model).suffix.lower() == ".onnx":
            import onnx

            if not Path(model).is_file():
                raise BncalError(f"{model} is not a file; give an .onnx model or a model object")
            model = onnx.load(str(model))
    inspection = inspect_model(model)
    report = DeploymentReport(inspect=inspection)
    refused = refused_findings(inspection, allowed)
    if refused:
        report.reasons.append(refusal(refused, "pass it as deployable"))
    report.allowed = allowed_notes(inspection.findings, allowed)
    if data is not None:
        from .api import check
        from .checking import CheckThresholds

        report.check = check(model, data, thresholds=thresholds or CheckThresholds(), inputs=inputs)
        if not report.check.passed:
            report.reasons.append(f"check {report.check.verdict}: " + ("; ".join(report.check.reasons)
                                                                       or "some normalisation could not be checked"))
    if guard is not None:
        from .guard import guard_model

        report.guard = guard_model(model, guard, metric=metric, tol=guard_tol)
        if not report.guard.passed:
            report.reasons.append(report.guard.reason())
    if report.reasons:
        raise DeploymentError("not deployable: " + " | ".join(report.reasons), report=report)
    return report

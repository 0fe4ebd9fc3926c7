"""bncal: make BatchNorm networks safe to deploy.

The library stands alone (the CLI in :mod:`bncal.cli` is a thin layer over it) and imports
its heavy dependencies lazily, so ``import bncal`` is cheap and imports neither torch nor
onnxruntime::

    import bncal
    report = bncal.recalibrate(model, loader)          # exact moving statistics, in place
    result = bncal.fold(model, (example,))              # BN folded into neighbouring ops
    onnx_model, report = bncal.fold_export_torch(model, (example,), "model.onnx")  # export + parity proof
    verdict = bncal.check(model, heldout).verdict       # moving vs batch statistics, any model kind
    bncal.assert_deployable(model, data=loader, guard=labelled)  # raises DeploymentError if not fit to deploy

Results show themselves (:class:`bncal.report.ReportDisplay`): ``repr`` is one line, ``print``
gives the CLI's table, a notebook renders it as HTML. PyTorch, images and plots are extras
(:mod:`bncal.extras`): a name whose module needs a missing one raises :class:`MissingExtra`,
which says what to install.
"""

from __future__ import annotations

from ._lazy import lazy_exports
from .errors import BncalError, DeploymentError, VerificationError

__version__ = "0.1.0"

# Public name -> module that defines it; imported on first use.
_EXPORTS = {
    "recalibrate": "api",
    "batchnorm_layers": "torch.recalibration",
    "ChannelMoments": "stats",
    "RecalibrationReport": "report",
    "CheckReport": "checking",
    "InspectReport": "inspect",
    "FoldExportReport": "folding.export",
    "ComparisonReport": "verify",
    "MissingExtra": "extras",
    "fit_state_dict": "torch.loading",
    "load_model": "loading",
    "load_state_dict": "torch.loading",
    "save_state_dict": "torch.loading",
    "load_data": "data",
    "select_inputs": "data",
    "fold": "folding",
    "analyze_foldability": "folding",
    "FoldResult": "folding",
    "export_onnx": "torch.export",
    "fold_onnx": "folding",
    "compare_outputs": "verify",
    "fold_export_torch": "folding.export",
    "fold_export_onnx": "folding.export",
    "recalibrate_onnx": "onnx.recalibration",
    "make_train_graph": "onnx.graphs",
    "make_stats_graph": "onnx.graphs",
    "check": "api",
    "check_onnx": "onnx.check",
    "CheckThresholds": "checking",
    "inspect_model": "inspect",
    "suggest_momentum": "momentum",
    "torch_to_tf": "momentum",
    "tf_to_torch": "momentum",
    "InverseDecayMomentum": "momentum",
    "convert_to_batchrenorm": "torch.nn",
    "convert_to_batchnorm": "torch.nn",
    "assert_deployable": "api",
    "DeploymentReport": "gate",
    "GuardReport": "guard",
    "load_labelled_data": "data",
    "unfreeze_batchnorm": "torch.bn_modules",
    "sync_to_batchnorm": "torch.bn_modules",
}

__all__ = ["BncalError", "VerificationError", "DeploymentError", "__version__", *_EXPORTS]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

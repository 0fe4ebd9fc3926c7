"""The PyTorch path: recalibration, check, export and the BatchNorm modules model libraries build.

- :mod:`.recalibration` -- :func:`recalibrate`, the PyTorch backend of the one driver
  (:mod:`bncal.driver`), and the BN layers a run handles;
- :mod:`.eval_sweep` (with :mod:`.sweep_plan`, :mod:`.sweep_cache`) -- eval mode solved depth by
  depth on a ``torch.fx`` trace, in about one forward;
- :mod:`.passes` -- batches on the device, per-call BN moments, the default forward;
- :mod:`.check` -- :func:`check_torch`, the check run in PyTorch (renorm models);
- :mod:`.export` -- export to ONNX with the BatchNorms kept;
- :mod:`.loading` -- models and weights, safely by default (the PyTorch kind of :mod:`bncal.loading`);
- :mod:`.nn` -- batch renormalisation modules (also ``bncal.nn``);
- :mod:`.bn_modules` -- frozen BN, BN-activation modules, SyncBatchNorm, as timm and torchvision build them.

This package imports torch only when one of its names is used.
"""

from __future__ import annotations

from .._lazy import lazy_exports

_EXPORTS = {
    "recalibrate": "recalibration",
    "batchnorm_layers": "recalibration",
    "check_torch": "check",
    "export_onnx": "export",
    "unfreeze_batchnorm": "bn_modules",
    "sync_to_batchnorm": "bn_modules",
}

__all__ = list(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

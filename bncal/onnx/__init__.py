"""The ONNX path, in onnxruntime alone (no torch): recalibration, check, and reading ONNX files.

- :mod:`.view` -- the one ONNX BatchNorm view every reader uses (:func:`find_batchnorms`:
  statistics through ``Identity`` and ``Constant``, shared statistics, skip reasons);
- :mod:`.graphs` -- the derived train and statistics graphs (onnx_ir edits);
- :mod:`.runtime` -- sessions, feeds from user batches, per-BN batch statistics;
- :mod:`.recalibration` -- :func:`recalibrate_onnx`, the ONNX backend of the one driver (:mod:`bncal.driver`);
- :mod:`.check` -- :func:`check_onnx`;
- :mod:`.lowered` -- normalisation a converter lowered to arithmetic (BN060);
- :mod:`.io` -- loading and writing large ONNX files.

The BN folding on ONNX graphs is :mod:`bncal.folding`'s.
"""

from __future__ import annotations

from .._lazy import lazy_exports

_EXPORTS = {
    "recalibrate_onnx": "recalibration",
    "check_onnx": "check",
    "find_batchnorms": "view",
    "make_train_graph": "graphs",
    "make_stats_graph": "graphs",
}

__all__ = list(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

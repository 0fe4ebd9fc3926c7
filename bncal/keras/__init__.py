"""Keras 3 models in bncal: recalibrate, check and inspect BatchNormalization layers.

An optional extra (``pip install 'bncal[keras]'``), written against Keras's backend-agnostic
API (``keras.ops``, layer attributes, ``keras.Model``), so it runs under any Keras backend;
bncal's tests run it on the torch backend. ``import bncal.keras`` is cheap: Keras itself is
imported on first use, by :func:`import_keras`, which picks the torch backend when
``KERAS_BACKEND`` is unset, Keras would default to TensorFlow, TensorFlow is not installed and
torch is::

    import bncal.keras
    model = bncal.keras.load_model("model.keras")           # safe_mode=True: no Lambda code runs
    report = bncal.keras.recalibrate(model, x_calib, mode="eval", batch_size=256)
    bncal.keras.save_model(model, "model-recalibrated.keras")  # atomic
    print(bncal.keras.check(model, x_heldout).table())
    print(bncal.keras.inspect(model, batch_size=2000, dataset_size=4000).table())

The results are the same report types as the PyTorch and ONNX paths
(:class:`bncal.report.RecalibrationReport`, :class:`bncal.check.CheckReport`,
:class:`bncal.inspection.InspectReport`), computed by the same statistics core
(:mod:`bncal.stats`) and the same rules.
"""

from __future__ import annotations

import importlib

# Public name -> submodule that defines it; imported (with Keras) on first use.
_EXPORTS = {
    "import_keras": "_backend",
    "load_model": "loading",
    "save_model": "loading",
    "batchnorm_layers": "layers",
    "recalibrate": "recalibration",
    "check": "check",
    "inspect": "inspection",
    "InverseDecayMomentum": "callbacks",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'bncal.keras' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)

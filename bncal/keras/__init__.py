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
(:class:`bncal.report.RecalibrationReport`, :class:`bncal.checking.CheckReport`,
:class:`bncal.inspect.model.InspectReport`), computed by the same statistics core
(:mod:`bncal.stats`), the same recalibration policy (:mod:`bncal.calibration`) and the same
rules. ``bncal.recalibrate`` and ``bncal.inspect_model`` hand a ``keras.Model`` over to these
functions (:func:`is_keras_model`). On the command line a ``.keras`` file, or a factory spec
returning a ``keras.Model``, is a MODEL for ``bncal inspect``, ``check`` and ``recalibrate -o
OUT.keras`` (the Keras kind of :mod:`bncal.loading`); image folders reach a channels-last model
as NHWC (:mod:`bncal.keras.data`).
"""

from __future__ import annotations

import sys

from .._lazy import lazy_exports

# Public name -> submodule that defines it; imported (with Keras) on first use.
_EXPORTS = {
    "import_keras": "backend",
    "load_model": "loading",
    "save_model": "loading",
    "batchnorm_layers": "layers",
    "recalibrate": "recalibration",
    "check": "checking",
    "inspect": "inspection",
    "InverseDecayMomentum": "callbacks",
    "RecalibrateOnTrainEnd": "callbacks",
}

__all__ = [*_EXPORTS, "is_keras_model"]


def is_keras_model(obj) -> bool:
    """Whether ``obj`` is a ``keras.Model`` (Keras 3, or Keras 2's ``tf_keras``), without
    importing Keras (an object cannot be one unless Keras is imported). On the torch backend a
    ``keras.Model`` is an ``nn.Module`` too: every entry point that takes either asks this first
    and hands Keras models to :mod:`bncal.keras`."""
    for module in ("keras", "tf_keras"):
        api = sys.modules.get(module)
        model_class = getattr(api, "Model", None) if api is not None else None
        if isinstance(model_class, type) and isinstance(obj, model_class):
            return True
    return False


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

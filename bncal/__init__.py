"""bncal: make BatchNorm networks safe to deploy.

The library stands alone (the CLI in :mod:`bncal.cli` is a thin layer over it) and imports
its heavy dependencies lazily, so ``import bncal`` is cheap::

    import bncal
    report = bncal.recalibrate(model, loader)          # exact moving statistics, in place
"""

from __future__ import annotations

import importlib

from .errors import BncalError, VerificationError

__version__ = "0.1.0"

# Public name -> module that defines it; imported on first use.
_EXPORTS = {
    "recalibrate": "recalibration",
    "batchnorm_layers": "recalibration",
    "ChannelMoments": "stats",
    "RecalibrationReport": "report",
    "load_model": "loading",
    "load_state_dict": "loading",
    "save_state_dict": "loading",
    "load_data": "data",
}

__all__ = ["BncalError", "VerificationError", "__version__", *_EXPORTS]


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'bncal' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)

"""Optional dependencies: which extra provides a module, and the one message when it is missing.

The base package (onnx, onnxruntime, onnx-ir, numpy, click, tqdm) serves ONNX files. Everything
else is an extra of ``pyproject.toml``; this table is the one place that says which::

    pip install 'bncal[torch]'    PyTorch models: torch, onnxscript (export), safetensors
    pip install 'bncal[images]'   image-folder data: pillow
    pip install 'bncal[plot]'     --plot: matplotlib
    pip install 'bncal[keras]'    Keras models
    pip install 'bncal[tf]'       TensorFlow 1 graphs (bncal.tf1); also Keras's TensorFlow backend

:func:`require` imports a module or raises :class:`MissingExtra` naming the extra;
:func:`missing_extra` turns an ``ImportError`` raised anywhere (a lazy ``import torch`` deep in a
command, a user's model file) into the same error, so every path words it alike.
"""

from __future__ import annotations

import importlib
import sys

from .errors import BncalError

__all__ = ["EXTRAS", "MissingExtra", "require", "missing_extra", "is_available", "is_torch_module"]

#: top-level module -> (what it is called for users, the extra that installs it)
EXTRAS = {
    "torch": ("PyTorch", "torch"),
    "onnxscript": ("onnxscript (PyTorch's ONNX exporter)", "torch"),
    "safetensors": ("safetensors", "torch"),
    "PIL": ("Pillow", "images"),
    "matplotlib": ("matplotlib", "plot"),
    "keras": ("Keras", "keras"),
    "tensorflow": ("TensorFlow", "tf"),
}


class MissingExtra(BncalError, ImportError):
    """An optional dependency is not installed; the message names the extra that installs it."""

    def __init__(self, module: str, what: str = "this"):
        name, extra = EXTRAS[module]
        self.module, self.extra = module, extra
        super().__init__(f"{what} needs {name}: pip install 'bncal[{extra}]'")


def is_torch_module(model) -> bool:
    """Whether ``model`` is a ``torch.nn.Module`` (torch is not imported to find out: one cannot exist without it)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(model, torch.nn.Module)


def is_available(module: str) -> bool:
    """Whether ``module`` can be imported (found without importing it)."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(module: str, what: str = "this"):
    """Import ``module`` (a key of :data:`EXTRAS`) and return it, or raise :class:`MissingExtra`.

    ``what`` starts the message: ``"--plot"`` gives "--plot needs matplotlib: pip install 'bncal[plot]'".
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if _top_level(getattr(exc, "name", None)) == module.partition(".")[0]:
            raise MissingExtra(module.partition(".")[0], what) from None
        raise


def missing_extra(exc: BaseException, what: str = "this") -> MissingExtra | None:
    """The :class:`MissingExtra` behind ``exc`` (an ImportError of an optional module), else None.

    Follows ``__cause__``, so a BncalError that wraps the failed import of a user's model file
    (which imports torch) is recognised too.
    """
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, MissingExtra):
            return exc
        if isinstance(exc, ImportError):
            top = _top_level(getattr(exc, "name", None))
            if top in EXTRAS and not is_available(top):
                return MissingExtra(top, what)
        exc, seen = exc.__cause__, seen + 1
    return None


def _top_level(name: str | None) -> str | None:
    return name.partition(".")[0] if name else None

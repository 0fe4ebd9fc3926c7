"""Public names that a package imports from its submodules on first use (PEP 562).

``import bncal`` and ``import bncal.folding`` stay cheap: torch, onnxruntime or Keras load only
when a name that needs them is used, and a missing optional dependency then raises
:class:`bncal.extras.MissingExtra`, naming the extra that installs it.
"""

from __future__ import annotations

import importlib


def lazy_exports(package: str, exports: dict[str, str]):
    """``(__getattr__, __dir__)`` for ``package`` whose public name ``n`` lives in submodule
    ``exports[n]`` (relative to the package); ``__dir__`` lists the names of ``exports`` and
    any others the package's ``__all__`` adds."""

    def __getattr__(name):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        try:  # a subpackage (bncal.folding) may import its torch part only on getattr
            value = getattr(importlib.import_module(f".{module}", package), name)
        except ImportError as exc:
            from .extras import MissingExtra, missing_extra

            missing = missing_extra(exc)
            if missing is None:
                raise
            raise MissingExtra(missing.module, f"{package}.{name}") from None  # the name the caller used
        vars(importlib.import_module(package))[name] = value  # later lookups skip __getattr__
        return value

    def __dir__():
        return sorted(getattr(importlib.import_module(package), "__all__", exports))

    return __getattr__, __dir__

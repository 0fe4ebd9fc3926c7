"""Model and data specs as text: what a spec names, found without loading a model framework.

A spec is ``package.module:function``, ``path/file.py:function`` (the user's own code, imported
as written) or a file path. :func:`resolve_callable` imports the function; :func:`spec_files`
lists the files a spec names without running anything; the suffix constants say which files
belong to which framework. :mod:`bncal.loading` (every model kind) and :mod:`bncal.keras.loading`
build on this module; it imports neither.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from pathlib import Path

from .errors import BncalError, one_line

__all__ = ["is_onnx_path", "split_spec", "spec_files", "resolve_callable", "KERAS_MODEL_SUFFIXES",
           "KERAS_SAVE_SUFFIXES", "is_tensorflow_export", "parse_model_kwargs"]


def is_onnx_path(spec) -> bool:
    return str(spec).lower().endswith(".onnx")


def split_spec(spec: str) -> tuple[str, str, bool] | None:
    """``(target, attribute, is_file)`` of a ``target:attribute`` spec, or None without a colon."""
    if ":" not in spec:
        return None
    target, _, attr = spec.rpartition(":")
    return target, attr, target.endswith(".py") or "/" in target or "\\" in target


def spec_files(spec) -> list[Path]:
    """The files a model or data spec names, found without running anything from them.

    A path: that file, or a folder (every file inside it is an input). ``file.py:func``:
    ``file.py``. ``package.module:func``: the module's source file, where it can be found.
    """
    text = str(spec)
    path = Path(text)
    if path.exists():
        return [path]
    parts = split_spec(text)
    if parts is None:
        return [path]
    target, _, is_file = parts
    if is_file:
        return [Path(target)]
    try:
        found = importlib.util.find_spec(target)
    except (ImportError, ValueError, AttributeError):
        return []
    origin = getattr(found, "origin", None)
    return [Path(origin)] if origin and Path(origin).is_file() else []


def resolve_callable(spec: str, what: str = "factory"):
    """Import ``module:attr`` or ``path/file.py:attr`` and return the attribute."""
    parts = split_spec(spec)
    if parts is None:
        raise BncalError(f"{what} spec {spec!r} needs the form 'package.module:function' or 'path/file.py:function'")
    target, attr, is_file = parts
    if is_file:
        path = Path(target)
        if not path.is_file():
            raise BncalError(f"{what} file {path} does not exist")
        module_name = f"_bncal_user_{abs(hash(str(path.resolve())))}"
        module = sys.modules.get(module_name)
        if module is None:
            spec_obj = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(spec_obj)
            sys.modules[module_name] = module
            # Let the file import its neighbours, as running it as a script would.
            sys.path.insert(0, str(path.resolve().parent))
            try:
                spec_obj.loader.exec_module(module)
            except Exception as exc:
                del sys.modules[module_name]
                raise BncalError(f"importing {path} (for {what} spec {spec}) failed: {one_line(exc)}") from exc
            finally:
                sys.path.remove(str(path.resolve().parent))
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise BncalError(f"cannot import module {target!r} for {what} spec {spec!r}: {exc}") from exc
        except Exception as exc:
            raise BncalError(f"importing module {target} (for {what} spec {spec}) failed: {one_line(exc)}") from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        import difflib

        names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n, None))]
        close = difflib.get_close_matches(attr, names, n=3, cutoff=0.6)
        hint = (f"; did you mean {target}:{close[0]}" + (f" (or {', '.join(close[1:])})" if close[1:] else "") + "?"
                if close else "")
        raise BncalError(f"{target} has no attribute {attr!r} (from {what} spec {spec!r}){hint}") from None


#: Files Keras saves whole models to: Keras 3's zip, and the legacy HDF5 file of Keras 2 (tf.keras) and 3.
#: PyTorch weight files a recalibrated model's weights can be written to.
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
KERAS_MODEL_SUFFIXES = (".keras", ".h5", ".hdf5")
#: What a recalibrated Keras model is written as: Keras 3's format, or the legacy HDF5 file when asked for.
KERAS_SAVE_SUFFIXES = (".keras", ".h5")


def is_tensorflow_export(spec) -> bool:
    """Whether ``spec`` names a TensorFlow SavedModel folder or a ``.pb`` graph: no Keras model
    to load, but the kind a TensorFlow user hands over (the Keras kind then says what works)."""
    path = Path(str(spec))
    return path.suffix.lower() == ".pb" or (path.is_dir() and (path / "saved_model.pb").is_file())


def parse_model_kwargs(model_kwargs) -> dict:
    """``model_kwargs`` (None, a dict, or a JSON object as text, as ``--model-kwargs`` gives it) as a dict."""
    if model_kwargs is None:
        return {}
    if isinstance(model_kwargs, dict):
        return model_kwargs
    try:
        value = json.loads(model_kwargs)
    except json.JSONDecodeError as exc:
        raise BncalError(f"--model-kwargs is not valid JSON ({exc.msg}); give an object such as '{{\"width\": 32}}'") from None
    if not isinstance(value, dict):
        raise BncalError("--model-kwargs must be a JSON object such as '{\"width\": 32}'")
    return value

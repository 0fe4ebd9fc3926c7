"""Loading models and weights, safely by default, and saving recalibrated weights atomically.

A model is named by a *spec*: ``package.module:factory`` or ``path/to/file.py:factory``, a
callable returning an ``nn.Module`` (the user's own code, run as written). Weights come from
``.safetensors`` or from a ``.pt``/``.pth``/``.bin`` state dict read with
``torch.load(weights_only=True)``. Whole pickled modules, TorchScript and ``.pt2`` archives
execute code from the file when loaded: they are refused unless ``allow_pickle=True``.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from pathlib import Path

from .errors import BncalError
from ._io import atomic_output

__all__ = ["resolve_callable", "load_model", "load_state_dict", "save_state_dict", "is_onnx_path"]

_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def is_onnx_path(spec) -> bool:
    return str(spec).lower().endswith(".onnx")


def resolve_callable(spec: str, what: str = "factory"):
    """Import ``module:attr`` or ``path/file.py:attr`` and return the attribute."""
    if ":" not in spec:
        raise BncalError(f"{what} spec {spec!r} needs the form 'package.module:function' or 'path/file.py:function'")
    target, _, attr = spec.rpartition(":")
    if target.endswith(".py") or "/" in target or "\\" in target:
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
                raise BncalError(f"importing {path} failed: {type(exc).__name__}: {exc}") from exc
            finally:
                sys.path.remove(str(path.resolve().parent))
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise BncalError(f"cannot import module {target!r} for {what} spec {spec!r}: {exc}") from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        raise BncalError(f"{target} has no attribute {attr!r} (from {what} spec {spec!r})") from None


def load_model(spec: str, *, weights=None, model_kwargs: str | dict | None = None, allow_pickle: bool = False):
    """Build the model named by ``spec`` and load ``weights`` into it (strictly). Returns it in eval mode."""
    from torch import nn

    path = Path(spec)
    if path.suffix.lower() in _PICKLE_SUFFIXES + (".pt2", ".ts") and ":" not in spec:
        if not allow_pickle:
            raise BncalError(f"{spec} is a pickled model file, and loading it would execute code from it; "
                             "give a factory spec with --weights, or pass --allow-pickle for a file you trust")
        if not path.is_file():
            raise BncalError(f"model file {path} does not exist")
        model = _load_pickled_module(path)
    else:
        kwargs = _parse_kwargs(model_kwargs)
        factory = resolve_callable(spec, "model")
        if isinstance(factory, type) and issubclass(factory, nn.Module) or callable(factory):
            try:
                model = factory(**kwargs)
            except TypeError as exc:
                raise BncalError(f"calling {spec} failed: {exc}; check --model-kwargs") from exc
        else:
            raise BncalError(f"{spec} is not callable")
        if not isinstance(model, nn.Module):
            raise BncalError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    if weights is not None:
        state = load_state_dict(weights, allow_pickle=allow_pickle)
        _load_into(model, state, weights)
    return model.eval()


def _parse_kwargs(model_kwargs):
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


def _load_pickled_module(path: Path):
    import torch

    try:
        if path.suffix == ".pt2":
            return torch.export.load(str(path)).module()
        try:
            return torch.jit.load(str(path), map_location="cpu")
        except RuntimeError:
            return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise BncalError(f"cannot load model file {path}: {type(exc).__name__}: {exc}") from exc


def load_state_dict(path, *, allow_pickle: bool = False) -> dict:
    """Read a state dict from ``.safetensors`` or a ``torch.save`` file (weights_only unless allowed).

    Wrappers such as ``{"state_dict": ...}`` or ``{"model": ...}`` are unwrapped and a
    ``module.`` prefix (DistributedDataParallel) is removed.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise BncalError(f"weights file {path} does not exist")
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise BncalError(f"{path} is not a readable safetensors file ({exc}); is it truncated or corrupt?") from exc
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
        except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError...
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if "weights_only" in str(exc) or "Unsupported global" in str(exc):
                raise BncalError(f"{path} holds pickled objects that could execute code when loaded; save a plain "
                                 "state dict or safetensors, or pass --allow-pickle for a file you trust") from exc
            raise BncalError(f"cannot read weights from {path} ({text}); is it truncated or corrupt?") from exc
    state = _unwrap(state, path)
    return state


def _unwrap(state, path):
    import torch

    for key in ("state_dict", "model_state_dict", "model", "module", "ema"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    if isinstance(state, torch.nn.Module):
        state = state.state_dict()
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BncalError(f"{path} does not contain a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _load_into(model, state: dict, source) -> None:
    own = model.state_dict()
    mismatched = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in state.items()
                  if k in own and hasattr(own[k], "shape") and not _is_uninitialized(own[k])
                  and tuple(v.shape) != tuple(own[k].shape)]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if mismatched or missing or unexpected:
        parts = []
        if mismatched:
            parts.append(f"shape mismatch {_first(mismatched)}")
        if missing:
            parts.append(f"missing {_first(missing)}")
        if unexpected:
            parts.append(f"unexpected {_first(unexpected)}")
        raise BncalError(f"the weights in {source} do not fit the model ({'; '.join(parts)}); "
                         "check the model spec and --model-kwargs")
    model.load_state_dict(state, strict=True)


def _is_uninitialized(t) -> bool:
    from torch.nn.parameter import UninitializedBuffer, UninitializedParameter

    return isinstance(t, (UninitializedBuffer, UninitializedParameter))


def _first(items, n=3) -> str:
    shown = ", ".join(items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


def save_state_dict(model, path, *, force: bool = False) -> Path:
    """Write ``model.state_dict()`` atomically as ``.safetensors`` or, for other suffixes, ``torch.save``."""
    import torch

    path = Path(path)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_output(path) as tmp:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import save_file

            save_file(state, str(tmp), metadata={"producer": "bncal"})
        else:
            torch.save(state, tmp)
    return path

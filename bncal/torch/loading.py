"""Loading PyTorch models and weights, safely by default, and saving recalibrated weights atomically.

Weights come from ``.safetensors`` or from a ``.pt``/``.pth``/``.bin`` state dict read with
``torch.load(weights_only=True)``. Whole pickled modules, TorchScript and ``.pt2`` archives
execute code from the file when loaded: they are refused unless ``allow_pickle=True``. This is
the PyTorch kind of :mod:`bncal.loading`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import BncalError, first_line, one_line
from ..extras import missing_extra, require
from ..outputs import atomic_output, write_bytes
from ..specs import parse_model_kwargs, resolve_callable

__all__ = ["build_model", "load_model", "load_state_dict", "fit_state_dict", "save_state_dict", "is_whole_model_file",
           "COMMON_PREFIXES"]

_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
#: Prefixes wrappers add to every key: DataParallel/DDP, Lightning and training scripts, torch.compile.
COMMON_PREFIXES = ("module.", "model.", "_orig_mod.")


def is_whole_model_file(spec: str) -> bool:
    """Whether ``spec`` names a whole PyTorch model saved to a file (pickled, ``.pt2``, TorchScript),
    which carries its own weights, rather than a factory that builds one."""
    return Path(spec).suffix.lower() in _PICKLE_SUFFIXES + (".pt2", ".ts") and ":" not in spec


def build_model(spec: str, *, model_kwargs: str | dict | None = None, allow_pickle: bool = False):
    """The object ``spec`` names, without weights: a whole model file (pickled, ``.pt2``,
    TorchScript; only with ``allow_pickle``), or what the factory returns, whatever it is (the
    kind registry, :func:`bncal.loading.load_any`, hands a ``keras.Model`` to its kind)."""
    from ..keras.backend import choose_default_backend

    if is_whole_model_file(spec):
        require("torch", f"{spec} (a PyTorch model)")
        if not allow_pickle:
            raise BncalError(f"{spec} is a pickled model file, and loading it would execute code from it; "
                             "give a factory spec with --weights, or pass --allow-pickle for a file you trust")
        path = Path(spec)
        if not path.is_file():
            raise BncalError(f"model file {path} does not exist")
        return _load_pickled_module(path)
    kwargs = parse_model_kwargs(model_kwargs)
    choose_default_backend()  # the factory's file may import keras itself
    try:
        factory = resolve_callable(spec, "model")
    except BncalError as exc:  # a PyTorch model's file that imports torch, without torch
        missing = missing_extra(exc, f"{spec} (a PyTorch model)")
        if missing is not None and missing.module == "torch":
            raise missing from None
        raise
    if not callable(factory):
        raise BncalError(f"{spec} is a {type(factory).__name__}, not a callable returning a torch.nn.Module")
    try:
        return factory(**kwargs)
    except Exception as exc:  # the user's own code: say that it failed, and how
        hint = f"; check --model-kwargs {json.dumps(kwargs)}" if kwargs and isinstance(exc, TypeError) else ""
        raise BncalError(f"the model factory {spec} failed: {one_line(exc)}{hint}") from exc


def load_model(spec: str, *, weights=None, model_kwargs: str | dict | None = None, allow_pickle: bool = False,
               strip_prefix: str | None = None, built=None):
    """Build the model named by ``spec`` (:func:`build_model`; or take ``built``, what it already
    returned) and load ``weights`` into it (strictly). Returns it in eval mode.

    The keys of ``weights`` are matched to the model by :func:`fit_state_dict` (a ``module.``,
    ``model.`` or ``_orig_mod.`` prefix is removed where that fits unambiguously, or
    ``strip_prefix``).
    """
    model = build_model(spec, model_kwargs=model_kwargs, allow_pickle=allow_pickle) if built is None else built
    require("torch", f"{spec} (a PyTorch model)")
    from torch import nn

    if not isinstance(model, nn.Module):
        raise BncalError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    if weights is not None:
        state = load_state_dict(weights, allow_pickle=allow_pickle)
        _load_into(model, state, weights, strip_prefix)
    elif strip_prefix is not None:
        raise BncalError("--strip-prefix applies to the keys of --weights; give --weights too")
    return model.eval()


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
        raise BncalError(f"cannot load model file {path}: {one_line(exc)}") from exc


def load_state_dict(path, *, allow_pickle: bool = False) -> dict:
    """Read a state dict from ``.safetensors`` or a ``torch.save`` file (weights_only unless allowed).

    Checkpoints as training code saves them are unwrapped: ``{"state_dict": ...}`` (Lightning),
    ``{"model_state_dict": ...}``, ``{"model": ...}`` (torchvision's reference scripts),
    ``{"module": ...}``, ``{"ema": ...}``. Key prefixes are left as they are: :func:`fit_state_dict`
    removes them against a model. A file holding other pickled objects (an ``argparse.Namespace``,
    say) is refused, naming the first class that would need to be trusted.
    """
    path = Path(path)
    if not path.is_file():
        raise BncalError(f"weights file {path} does not exist")
    torch = require("torch", f"reading {path.name}")
    if path.suffix.lower() == ".safetensors":
        require("safetensors", f"reading {path.name}")
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
            text = first_line(exc)
            if "weights_only" in str(exc) or "Unsupported global" in str(exc):
                raise BncalError(_pickle_refusal(path, exc)) from None  # the message names what torch refused
            raise BncalError(f"cannot read weights from {path} ({text}); is it truncated or corrupt?") from exc
    state = _unwrap(state, path)
    return state


def _pickle_refusal(path: Path, exc: BaseException) -> str:
    """Why a checkpoint was refused, naming the first class torch.load(weights_only=True) would not trust."""
    found = re.search(r"GLOBAL ([\w.]+)", str(exc))
    name = found.group(1) if found else None
    if name is None:
        try:
            import torch

            name = next(iter(torch.serialization.get_unsafe_globals_in_checkpoint(str(path))), None)
        except Exception:  # an older torch, or a file it cannot scan: the refusal stands without the name
            name = None
    what = f"a pickled {name}" if name else "pickled objects"
    trust = f"torch.serialization.add_safe_globals([{name}])" if name else "torch.serialization.add_safe_globals([...])"
    return (f"{path} holds {what}, which could execute code when loaded; pass --allow-pickle for a file you trust "
            f"(from Python: {trust} before loading, or allow_pickle=True), or save a plain state dict or safetensors")


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
    return state


def _prefix_candidates(keys) -> list[str]:
    """Prefixes made of :data:`COMMON_PREFIXES` that start some key (``module.``, ``module._orig_mod.``...)."""
    found = set()
    for key in keys:
        prefix = ""
        while True:
            step = next((p for p in COMMON_PREFIXES if key.startswith(prefix + p)), None)
            if step is None:
                break
            prefix += step
            found.add(prefix)
    return sorted(found, key=lambda p: (len(p), p))


def _under(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def fit_state_dict(state: dict, model, *, strip_prefix: str | None = None, source="the weights") -> tuple[dict, str]:
    """``state``'s entries for ``model``, keys renamed to fit it, and the prefix that was removed.

    Training code saves keys with the prefix of a wrapper: ``module.`` (DataParallel and
    DistributedDataParallel), ``model.`` (Lightning modules and many training scripts),
    ``_orig_mod.`` (``torch.compile``), or combinations. Without ``strip_prefix``: ``state`` as it
    is when its keys are exactly the model's; else every combination of those prefixes found at
    the start of the keys is tried, each keeping the keys under it with the prefix removed, and
    the one whose keys are exactly the model's is taken. Keys outside it (a Lightning module's
    loss weights, say) are left out. Two that fit are ambiguous: :class:`BncalError`. With
    ``strip_prefix``: the keys under that prefix, with it removed (others left out). The result
    is then loaded strictly (:func:`load_model`); here only the keys are matched.
    """
    own = set(model.state_dict())
    if strip_prefix is not None:
        fitted = _under(state, strip_prefix)
        if not fitted:
            shown = _first(sorted(state), 2)
            raise BncalError(f"no key in {source} starts with {strip_prefix!r} (--strip-prefix); its keys look like {shown}")
        return fitted, strip_prefix
    if set(state) == own:
        return state, ""
    fitting = [p for p in _prefix_candidates(state) if set(_under(state, p)) == own]
    if len(fitting) > 1:
        raise BncalError(f"the weights in {source} fit the model after removing any of "
                         f"{', '.join(repr(p) for p in fitting)} from their keys; pass --strip-prefix with the one meant")
    if fitting:
        return _under(state, fitting[0]), fitting[0]
    return state, ""


def _load_into(model, state: dict, source, strip_prefix: str | None = None) -> None:
    state, removed = fit_state_dict(state, model, strip_prefix=strip_prefix, source=source)
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
        after = f" after removing the key prefix {removed!r}" if removed else ""
        raise BncalError(f"the weights in {source} do not fit the model{after} ({'; '.join(parts)}); "
                         f"check the model spec and --model-kwargs{_prefix_hint(state, own) if not removed else ''}")
    model.load_state_dict(state, strict=True)


def _prefix_hint(state: dict, own) -> str:
    """``; the file's keys start with 'net.' where the model's do not: pass --strip-prefix net.``, where that is so."""
    def head(key):
        return key.split(".", 1)[0] + "." if "." in key else None

    file_heads = {head(k) for k in state} - {None}
    model_heads = {head(k) for k in own} - {None}
    if len(file_heads) == 1 and not file_heads & model_heads:
        prefix = next(iter(file_heads))
        return f"; the file's keys start with {prefix!r} where the model's do not: pass --strip-prefix {prefix}"
    return ""


def _is_uninitialized(t) -> bool:
    from torch.nn.parameter import UninitializedBuffer, UninitializedParameter

    return isinstance(t, (UninitializedBuffer, UninitializedParameter))


def _first(items, n=3) -> str:
    shown = ", ".join(items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


def save_state_dict(model, path) -> Path:
    """Write ``model.state_dict()`` as ``.safetensors`` or, for other suffixes, ``torch.save``,
    through the output policy (:func:`bncal.outputs.atomic_output`)."""
    torch = require("torch", "saving a state dict")
    path = Path(path)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    if path.suffix.lower() == ".safetensors":
        require("safetensors", f"writing {path.name}")
        from safetensors.torch import save

        # Serialised here, not by save_file, which writes a temporary file of its own beside the output.
        return write_bytes(path, save(state, metadata={"producer": "bncal"}))
    with atomic_output(path) as tmp:
        torch.save(state, tmp)
    return path

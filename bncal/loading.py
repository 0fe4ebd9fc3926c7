"""Which kind of model a spec names, and loading it whatever its kind.

A model is named by a *spec*: ``package.module:factory`` or ``path/to/file.py:factory``, a
callable returning an ``nn.Module`` or a ``keras.Model`` (the user's own code, run as written),
or a model file (``.onnx``; ``.keras``, ``.h5``, ``.hdf5`` for Keras). Each kind loads safely by
default: PyTorch weights (:mod:`bncal.torch.loading`) from ``.safetensors`` or with
``torch.load(weights_only=True)``, Keras files in safe mode (:mod:`bncal.keras.loading`); what
executes code from a file needs ``allow_pickle=True``.

Which kind of model a spec names is decided once, here (:func:`model_kind`), from the spec's text
alone: ``.onnx`` and Keras files by their suffix (a SavedModel folder or ``.pb`` goes to the Keras
kind too, which says what to load instead), everything else is the PyTorch kind's.
A factory spec is only text, so what it returns decides in the end: a factory returning a
``keras.Model`` (on Keras's torch backend also an ``nn.Module``) is handed over to the Keras
kind (:attr:`ModelKind.adopts`), which loads its ``.weights.h5`` weights. :func:`load_any` loads
a spec and says which kind it turned out to be and which files it read. Another kind plugs in
with :func:`register_model_kind`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from .errors import BncalError
from .specs import (KERAS_MODEL_SUFFIXES, KERAS_SAVE_SUFFIXES, WEIGHT_SUFFIXES, is_onnx_path, is_tensorflow_export,
                    spec_files, split_spec)

__all__ = ["ModelKind", "LoadedModel", "model_kind", "register_model_kind", "load_any", "load_model",
           "output_suffixes", "kind_named"]



@dataclasses.dataclass(frozen=True)
class ModelKind:
    """One kind of model bncal can load.

    ``claims(spec)`` says from the spec's text alone (no imports) whether it names this kind;
    ``files(spec, weights)`` lists the files loading would read (for the output policy; never
    raises); ``load(spec, weights=, model_kwargs=, allow_pickle=)`` returns the model.
    ``saves_as``: the suffixes a recalibrated copy of such a model can be written to.
    ``adopts(obj)`` (optional) says whether an object a factory spec returned is this kind's
    model; ``adopt(obj, spec, weights=, allow_pickle=)`` then finishes loading it (its weights).
    """

    name: str
    claims: Callable[[str], bool]
    files: Callable[[str, object], list[Path]]
    load: Callable[..., object]
    saves_as: tuple[str, ...]
    adopts: Callable[[object], bool] | None = None
    adopt: Callable[..., object] | None = None


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """What :func:`load_any` returns: the kind's name, the model, and the files it read."""

    kind: str
    model: object
    spec: str
    files: tuple[Path, ...]


def _onnx_files(spec, weights) -> list[Path]:
    from .onnx.io import onnx_files

    return onnx_files(spec)


def _load_onnx_kind(spec, *, weights=None, model_kwargs=None, allow_pickle=False, strip_prefix=None):
    from .onnx.io import load_onnx

    if weights is not None or model_kwargs is not None or strip_prefix is not None:
        raise BncalError(f"{spec} is an ONNX file, which holds its own weights; --weights, --model-kwargs and "
                         "--strip-prefix apply to a PyTorch factory spec")
    return load_onnx(spec)


def _spec_and_weights(spec, weights) -> list[Path]:
    return spec_files(spec) + ([Path(weights)] if weights is not None else [])


def _is_keras_path(spec) -> bool:
    text = str(spec)
    return ((text.lower().endswith(KERAS_MODEL_SUFFIXES) and split_spec(text) is None)
            or is_tensorflow_export(text))


def _load_keras_kind(spec, *, weights=None, model_kwargs=None, allow_pickle=False, strip_prefix=None):
    from .keras.loading import load_model as load_keras_model

    if strip_prefix is not None:
        raise BncalError(f"{spec} is a Keras file, which holds its own weights; --strip-prefix applies to a "
                         "PyTorch factory spec")
    # --allow-pickle is the one opt-in to loading code: for a .keras file, its Lambda layers.
    return load_keras_model(spec, weights=weights, model_kwargs=model_kwargs, safe_mode=not allow_pickle)


def _adopt_keras(model, spec, *, weights=None, allow_pickle=False):
    from .keras.loading import adopt_factory_model

    return adopt_factory_model(model, spec, weights=weights, allow_pickle=allow_pickle)


def load_model(spec: str, *, weights=None, model_kwargs: str | dict | None = None, allow_pickle: bool = False,
               strip_prefix: str | None = None):
    """The model a factory spec (or a whole PyTorch model file) names, with ``weights``: a PyTorch
    model through :func:`bncal.torch.loading.load_model` (in eval mode, weights loaded strictly);
    a factory returning another kind's model (a ``keras.Model``, on Keras's torch backend an
    ``nn.Module`` too) is handed to that kind (:attr:`ModelKind.adopt`), which loads its weights."""
    from .torch.loading import build_model, load_model as load_torch_model

    built = build_model(spec, model_kwargs=model_kwargs, allow_pickle=allow_pickle)
    adopter = _adopting_kind(built)
    if adopter is not None:
        if strip_prefix is not None:
            raise BncalError(f"{spec} returns a {adopter.name} model; --strip-prefix applies to a PyTorch state dict")
        return adopter.adopt(built, spec, weights=weights, allow_pickle=allow_pickle)
    return load_torch_model(spec, weights=weights, strip_prefix=strip_prefix, allow_pickle=allow_pickle, built=built)


def _is_keras_model(obj) -> bool:
    from .keras import is_keras_model

    return is_keras_model(obj)


_KINDS: list[ModelKind] = [
    ModelKind("onnx", is_onnx_path, _onnx_files, _load_onnx_kind, (".onnx",)),
    ModelKind("keras", _is_keras_path, _spec_and_weights, _load_keras_kind, KERAS_SAVE_SUFFIXES,
              adopts=_is_keras_model, adopt=_adopt_keras),
    ModelKind("torch", lambda spec: True, _spec_and_weights, lambda spec, **kw: load_model(spec, **kw),
              WEIGHT_SUFFIXES),
]


def register_model_kind(kind: ModelKind) -> None:
    """Add a model kind, consulted before the PyTorch kind (which takes every other spec)."""
    _KINDS[:] = [k for k in _KINDS if k.name != kind.name]
    _KINDS.insert(len(_KINDS) - 1, kind)


def model_kind(spec) -> ModelKind:
    """The kind of model ``spec`` names, decided from its text alone (a factory spec may still
    turn out to be another kind's, see :func:`load_any`)."""
    return next(k for k in _KINDS if k.claims(str(spec)))


def kind_named(name: str) -> ModelKind:
    """The registered kind called ``name`` (``"onnx"``, ``"keras"``, ``"torch"``...)."""
    return next(k for k in _KINDS if k.name == name)


def _adopting_kind(obj) -> ModelKind | None:
    return next((k for k in _KINDS if k.adopts is not None and k.adopts(obj)), None)


def output_suffixes(spec) -> tuple[str, ...]:
    """The suffixes a recalibrated copy of the model ``spec`` names may be written to: its
    kind's, and for a factory spec also those of the kinds it may turn out to be."""
    kind = model_kind(spec)
    if kind.name != "torch" or split_spec(str(spec)) is None:
        return kind.saves_as
    return kind.saves_as + tuple(s for k in _KINDS if k.adopts is not None for s in k.saves_as)


def load_any(spec, *, weights=None, model_kwargs: str | dict | None = None, allow_pickle: bool = False,
             strip_prefix: str | None = None) -> LoadedModel:
    """Load the model ``spec`` names, whatever its kind: an ``nn.Module`` in eval mode (factory
    spec or pickled file, with ``weights``), an ``onnx.ModelProto`` (``.onnx`` file) or a
    ``keras.Model`` (``.keras`` file, or a factory returning one, with ``.weights.h5``
    weights). ``LoadedModel.kind`` is the kind it turned out to be.
    ``strip_prefix`` is passed to the kind's loader only when given (see :func:`fit_state_dict`)."""
    kind = model_kind(spec)
    extra = {} if strip_prefix is None else {"strip_prefix": strip_prefix}
    model = kind.load(str(spec), weights=weights, model_kwargs=model_kwargs, allow_pickle=allow_pickle, **extra)
    kind = _adopting_kind(model) or kind
    return LoadedModel(kind.name, model, str(spec), tuple(kind.files(str(spec), weights)))

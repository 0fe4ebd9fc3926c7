"""Loading Keras models safely, and saving them atomically.

A model is a ``.keras`` file or a legacy HDF5 ``.h5``/``.hdf5`` file (Keras 2's ``tf.keras`` and
Keras 3 write it; Keras 3's loader reads both), read with Keras's ``safe_mode=True`` by default:
a ``Lambda`` layer stores Python bytecode that would run when the file is loaded, so such files
load only with ``safe_mode=False``, for files you trust. A TensorFlow SavedModel folder or a
``.pb`` graph holds no Keras model: :func:`tensorflow_export_refusal` says what works instead. Or a spec ``package.module:factory`` /
``path/file.py:factory`` (the user's own code, run as written, see
:func:`bncal.specs.resolve_callable`) returning a ``keras.Model``, optionally with weights
from a ``.weights.h5`` file.
"""

from __future__ import annotations

from pathlib import Path

from ..outputs import atomic_output
from ..errors import BncalError, one_line
from ..specs import KERAS_MODEL_SUFFIXES, KERAS_SAVE_SUFFIXES, is_tensorflow_export, parse_model_kwargs, resolve_callable
from .backend import import_keras

__all__ = ["load_model", "save_model", "adopt_factory_model", "tensorflow_export_refusal"]


def load_model(path_or_spec, *, weights=None, model_kwargs: str | dict | None = None, safe_mode: bool = True,
               custom_objects: dict | None = None, compile: bool = True):
    """A ``keras.Model`` from a ``.keras``, ``.h5`` or ``.hdf5`` file or a factory spec.

    ``safe_mode`` (default True) refuses files whose ``Lambda`` layers would run code;
    ``custom_objects`` and ``compile`` are passed to ``keras.saving.load_model``.
    ``model_kwargs`` (a dict or JSON object) and ``weights`` (``.weights.h5``) apply to a spec.

    Raises:
        BncalError: a missing or unreadable file, a refused Lambda layer, a spec that does not
            give a ``keras.Model``, weights that do not fit, a ``.weights.h5`` file alone, a
            SavedModel folder or ``.pb`` graph.
    """
    text = str(path_or_spec)
    path = Path(text)
    if is_tensorflow_export(text):
        raise BncalError(tensorflow_export_refusal(path))
    if path.suffix.lower() == ".keras" and path.is_file():
        _check_keras_archive(path)  # before importing Keras (seconds), which would say "File not found"
    keras = import_keras()
    if text.lower().endswith(KERAS_MODEL_SUFFIXES) and ":" not in text:
        if path.name.lower().endswith(".weights.h5"):
            raise BncalError(f"{path} holds weights only (model.save_weights); give the factory that builds the "
                             f"model, with the weights: bncal ... path/file.py:factory --weights {path}")
        if not path.is_file():
            raise BncalError(f"model file {path} does not exist")
        if weights is not None or model_kwargs is not None:
            raise BncalError(f"a {path.suffix} file holds its weights and configuration; weights and model_kwargs "
                             "apply to a factory spec only")
        try:  # .h5/.hdf5: Keras 3's reader of the legacy format (Keras 2 and 3 files), safe_mode as for .keras
            return keras.saving.load_model(path, custom_objects=custom_objects, compile=compile, safe_mode=safe_mode)
        except Exception as exc:  # Keras raises ValueError, TypeError, zipfile and h5py errors...
            if safe_mode and "safe_mode" in str(exc):
                raise BncalError(f"{path} contains a Lambda layer whose Python code would run when it is loaded; "
                                 "pass safe_mode=False (bncal commands: --allow-pickle) only for a file you trust") from exc
            raise BncalError(f"cannot load {path} as a Keras model ({one_line(exc)}); is it a whole model saved by "
                             "Keras (model.save), with its custom layers given as custom_objects?") from exc
    factory = resolve_callable(text, "model")
    if not callable(factory):
        raise BncalError(f"{text} is not callable")
    try:
        model = factory(**parse_model_kwargs(model_kwargs))
    except TypeError as exc:
        raise BncalError(f"calling {text} failed: {exc}; check model_kwargs") from exc
    if not isinstance(model, keras.Model):
        raise BncalError(f"{text} returned {type(model).__name__}, not a keras.Model")
    return adopt_factory_model(model, text, weights=weights)


def _check_keras_archive(path: Path) -> None:
    """BncalError for a ``.keras`` file that is not a zip archive (Keras itself says "File not found")."""
    import zipfile

    try:
        size = path.stat().st_size
        with open(path, "rb") as file:
            head = file.read(8)
        is_zip = zipfile.is_zipfile(path)
    except OSError as exc:
        raise BncalError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if size == 0:
        raise BncalError(f"{path} is empty (0 bytes); was the save interrupted? Save the model again with "
                         "model.save('model.keras')")
    if is_zip:
        return
    if head.startswith(b"\x89HDF"):
        raise BncalError(f"{path} is an HDF5 file (the legacy .h5 format) named .keras; re-save it with "
                         "model.save('model.keras')")
    raise BncalError(f"{path} is not a .keras file: a .keras file is a zip archive and this one ({size} bytes) is not "
                     "one (truncated or corrupt?); save the model again with model.save('model.keras')")


def adopt_factory_model(model, spec: str, *, weights=None, allow_pickle: bool = False):
    """A ``keras.Model`` that the factory ``spec`` returned, with ``weights`` (a ``.weights.h5``
    file) loaded into it: how :func:`bncal.loading.load_model` hands a factory's Keras model
    over (on Keras's torch backend a ``keras.Model`` is an ``nn.Module`` too, but its weights
    are Keras's). ``allow_pickle`` is accepted for the hand-over and not needed: a
    ``.weights.h5`` file holds arrays only."""
    if weights is not None:
        path = Path(weights)
        if not path.name.lower().endswith((".weights.h5", ".keras")):
            raise BncalError(f"{spec} returns a keras.Model, whose --weights is a .weights.h5 file "
                             f"(model.save_weights), not {path.name}")
        if not path.is_file():
            raise BncalError(f"weights file {weights} does not exist")
        try:
            model.load_weights(weights)
        except Exception as exc:  # shape mismatches, missing variables, unreadable files
            raise BncalError(f"the weights in {weights} do not fit {spec} ({one_line(exc)})") from exc
    return model


def save_model(model, path) -> Path:
    """Write ``model`` to ``path`` atomically: a ``.keras`` file, or the legacy HDF5 format for
    ``.h5`` (what Keras 2 code reads). Written to a temporary file of the same suffix in the same
    directory, renamed over ``path`` once complete (an interrupted save leaves ``path`` as it was)."""
    keras = import_keras()
    path = Path(path)
    if path.suffix.lower() not in KERAS_SAVE_SUFFIXES:
        raise BncalError(f"{path}: a Keras model is saved as a .keras file (or .h5 for Keras 2 readers); give a "
                         "path ending in .keras")
    if not path.parent.is_dir():
        raise BncalError(f"output directory {path.parent} does not exist; create it first")
    with atomic_output(path) as tmp:  # staged under its own name, so Keras sees the suffix
        keras.saving.save_model(model, tmp)
    return path


def tensorflow_export_refusal(path: Path) -> str:
    """The one line for a SavedModel folder or a ``.pb`` graph: what bncal can repair instead."""
    what = "a frozen TensorFlow graph" if path.suffix.lower() == ".pb" else "a TensorFlow SavedModel"
    return (f"{path} is {what}, whose BatchNorm statistics are constants of the exported graph; recalibrate the "
            "Keras model that produced it (its .keras/.h5 file, or a factory with --weights model.weights.h5) and "
            "export again, or for tf.compat.v1 code recalibrate the graph's variables with "
            "bncal.tf1.recalibrate before freezing")

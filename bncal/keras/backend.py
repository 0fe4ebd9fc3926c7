"""Importing Keras for bncal: the backend choice, the missing-extra message, no-grad passes."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import sys
from pathlib import Path

from ..errors import BncalError, one_line

__all__ = ["import_keras", "inference_context", "choose_default_backend", "keras_apis", "keras_classes"]

INSTALL_HINT = "pip install 'bncal[keras]'"


def _configured_backend() -> str:
    """The backend Keras would pick without ``KERAS_BACKEND``: its config file's, else TensorFlow."""
    home = os.environ.get("KERAS_HOME")
    if home is None:  # Keras's own rule: ~/.keras, or /tmp/.keras when home is read-only
        base = Path.home() if os.access(Path.home(), os.W_OK) else Path("/tmp")
        home = str(base / ".keras")
    try:
        return str(json.loads((Path(home) / "keras.json").read_text()).get("backend", "tensorflow"))
    except (OSError, ValueError, AttributeError):
        return "tensorflow"


def choose_default_backend() -> None:
    """Before Keras is first imported, with ``KERAS_BACKEND`` unset and Keras about to default
    to TensorFlow (no other backend in ``~/.keras/keras.json``): if TensorFlow is not
    installed but torch is, set ``KERAS_BACKEND`` to ``torch`` (Keras reads it once, at
    import). A backend chosen any other way is left alone. Imports nothing: called before
    user code that may ``import keras`` itself runs (a model factory spec)."""
    if "keras" not in sys.modules and not os.environ.get("KERAS_BACKEND"):
        if (_configured_backend() == "tensorflow" and importlib.util.find_spec("tensorflow") is None
                and importlib.util.find_spec("torch") is not None):
            os.environ["KERAS_BACKEND"] = "torch"


def import_keras():
    """Import Keras 3 and return the module, the backend chosen by
    :func:`choose_default_backend` when nothing else chose it.

    Raises:
        BncalError: Keras is not installed, is older than 3, or fails to import.
    """
    choose_default_backend()
    try:
        import keras
    except ImportError as exc:
        if exc.name == "keras":
            raise BncalError(f"Keras models need keras 3, which is not installed: {INSTALL_HINT}") from None
        raise BncalError(f"importing keras failed ({one_line(exc)}); install its backend or set "
                         "KERAS_BACKEND to an installed one (torch, jax, tensorflow)") from exc
    major = int(str(getattr(keras, "__version__", "0")).split(".")[0] or 0)
    if major < 3:
        raise BncalError(f"bncal needs Keras 3, found {keras.__version__}: {INSTALL_HINT}")
    return keras


def inference_context():
    """A context for forward passes that need no gradients: ``torch.no_grad()`` on the torch
    backend (the other backends build no tape outside a training step)."""
    keras = import_keras()
    if keras.backend.backend() == "torch":
        import torch

        return torch.no_grad()
    return contextlib.nullcontext()


def keras_apis() -> list:
    """The Keras APIs whose models bncal takes: Keras 3, and Keras 2 (``tf_keras``, TensorFlow's
    ``tf.keras`` with ``TF_USE_LEGACY_KERAS=1``) where the user's code imported it. Its
    BatchNormalization holds the same variables (``moving_mean``, ``moving_variance``, tf.Variables
    Keras 3 reads on the TensorFlow backend). Imports nothing that is not imported yet."""
    apis = [import_keras()]
    legacy = sys.modules.get("tf_keras")
    if legacy is not None and getattr(legacy, "Model", None) is not None:
        apis.append(legacy)
    return apis


def keras_classes(path: str) -> tuple[type, ...]:
    """``keras.<path>`` (``"Model"``, ``"layers.BatchNormalization"``) of each of :func:`keras_apis`."""
    found = []
    for api in keras_apis():
        value = api
        for part in path.split("."):
            value = getattr(value, part, None)
        if isinstance(value, type):
            found.append(value)
    return tuple(found)

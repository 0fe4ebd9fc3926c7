"""Reading and writing ONNX files with one-line errors and atomic output."""

from __future__ import annotations

from pathlib import Path

from ._io import atomic_output
from .errors import BncalError

__all__ = ["load_onnx", "save_onnx"]

_TWO_GB = 2**31 - 1


def load_onnx(path):
    """Load an ONNX model (with its external data) and check it; BncalError if unreadable."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise BncalError(f"ONNX file {path} does not exist")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf DecodeError, missing external data...
        raise BncalError(f"{path} is not a readable ONNX model ({type(exc).__name__}: {exc}); is it truncated or corrupt?") from exc
    if not model.graph.node:
        raise BncalError(f"{path} holds no graph nodes; is it truncated or corrupt?")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0]
        raise BncalError(f"{path} is not a valid ONNX model: {first}") from exc
    return model


def save_onnx(model, path) -> Path:
    """Write ``model`` atomically as one file (external data only above protobuf's 2 GB limit)."""
    import onnx

    path = Path(path)
    large = model.ByteSize() > _TWO_GB
    if large:
        # External data must sit beside the final file: write it under the final name.
        onnx.save_model(model, str(path), save_as_external_data=True, location=path.name + ".data")
        return path
    with atomic_output(path) as tmp:
        onnx.save_model(model, str(tmp))
    return path

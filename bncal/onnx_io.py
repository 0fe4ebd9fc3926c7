"""Reading and writing ONNX files with one-line errors, through the output policy."""

from __future__ import annotations

from pathlib import Path

from .errors import BncalError, first_line, one_line
from .outputs import atomic_output

__all__ = ["load_onnx", "save_onnx", "onnx_files"]

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
        raise BncalError(f"{path} is not a readable ONNX model ({one_line(exc)}); is it truncated or corrupt?") from exc
    if not model.graph.node:
        raise BncalError(f"{path} holds no graph nodes; is it truncated or corrupt?")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise BncalError(f"{path} is not a valid ONNX model: {first_line(exc)}") from exc
    return model


def onnx_files(path) -> list[Path]:
    """The files loading ``path`` reads: the model and its external data files (never raises:
    an unreadable file is reported when it is loaded)."""
    path = Path(path)
    files = [path]
    try:
        import onnx

        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        return files
    tensors = list(model.graph.initializer)
    tensors += [a.t for n in model.graph.node for a in n.attribute if a.HasField("t")]
    for tensor in tensors:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next((e.value for e in tensor.external_data if e.key == "location"), None)
            if location and path.parent.joinpath(location) not in files:
                files.append(path.parent / location)
    return files


def save_onnx(model, path, *, serialized: bytes | None = None) -> Path:
    """Write ``model`` as one file (external data ``<name>.data`` beside it only above protobuf's
    2 GB limit), through the output policy: both files appear together, or neither does.
    ``serialized`` is ``model.SerializeToString()`` where the caller has it already."""
    import onnx

    path = Path(path)
    large = serialized is None and model.ByteSize() > _TWO_GB
    with atomic_output(path) as tmp:
        if serialized is not None:
            Path(tmp).write_bytes(serialized)
        elif large:  # the data file lands beside tmp, in the same staging folder, under its final name
            onnx.save_model(model, str(tmp), save_as_external_data=True, location=path.name + ".data")
        else:
            onnx.save_model(model, str(tmp))
    return path


def serialize(model) -> bytes:
    """``model``'s bytes, or a BncalError naming the limit for a model over protobuf's 2 GB."""
    try:
        return model.SerializeToString()
    except ValueError as exc:  # protobuf: "Message ... exceeds maximum protobuf size of 2GB"
        raise BncalError(f"the model is over protobuf's 2 GB limit ({one_line(exc)}); fold-export verifies models "
                         "in memory and cannot take one this large") from exc

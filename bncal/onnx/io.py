"""Reading and writing ONNX files with one-line errors, through the output policy.

A model is an ``onnx.ModelProto`` or an ``onnx_ir.Model``. An ``onnx_ir.Model`` (what torch's
exporter builds, its initializers the PyTorch model's own tensors) is written and run without a
protobuf copy of its weights: the graph is serialized without its large initializers, and each
of those is appended as one more ``ModelProto.graph`` field holding just that initializer, its
``raw_data`` written straight from the tensor's memory. Protobuf merges repeated occurrences of
a message field, so every reader sees one graph with all its initializers. This writer stays
while it beats onnx_ir's own ``ir.save`` (``tools/bench_onnx_write.py`` measures both side by
side; the figures are in its docstring).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import BncalError, first_line, one_line
from ..outputs import atomic_output

__all__ = ["load_onnx", "save_onnx", "onnx_files"]

_TWO_GB = 2**31 - 1
# Smaller initializers stay in the serialized graph: onnxruntime reads small constants (a
# Reshape's shape) while loading, and copying them costs nothing.
_LARGE_TENSOR_BYTES = 1 << 16


def load_onnx(path):
    """Load an ONNX model (with its external data) and check it; BncalError if unreadable."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise BncalError(f"ONNX file {path} does not exist")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf DecodeError, missing external data...
        what = _what_the_file_is(path)
        if what is not None:
            raise BncalError(f"{path} is not an ONNX model: {what}") from None
        raise BncalError(f"{path} is not a readable ONNX model ({one_line(exc)}); is it truncated or corrupt?") from exc
    if not model.graph.node:
        what = _what_the_file_is(path)
        if what is not None:
            raise BncalError(f"{path} is not an ONNX model: {what}")
        raise BncalError(f"{path} holds no graph nodes; is it truncated or corrupt?")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise BncalError(f"{path} is not a valid ONNX model: {first_line(exc)}") from exc
    return model


_SIGNATURES = ((b"PK\x03\x04", "a zip archive (a .keras, .npz or torch.save file?)"),
               (b"\x89HDF", "an HDF5 file (Keras .h5 weights?)"), (b"\x93NUMPY", "a numpy .npy array"),
               (b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"))
_GIVE_MODEL = "; give the .onnx model file"


def _what_the_file_is(path: Path) -> str | None:
    """What a file that does not load as an ONNX model is, and what to do, when that can be
    told (``it is a PNG image; give the .onnx model file``); None otherwise."""
    import onnx

    try:
        data = path.read_bytes()
    except OSError:
        return None
    if not data:
        return "it is empty (0 bytes); export or download it again"
    for magic, what in _SIGNATURES:
        if data.startswith(magic):
            return f"it is {what}{_GIVE_MODEL}"
    tensor = onnx.TensorProto()
    try:
        tensor.ParseFromString(data)
        if tensor.dims and tensor.data_type:
            named = f" {tensor.name!r}" if tensor.name else ""
            return (f"it is a serialized TensorProto (one tensor{named} of shape {'x'.join(map(str, tensor.dims))}, "
                    f"such as a test's input_0.pb), not a ModelProto{_GIVE_MODEL}")
    except Exception:  # noqa: BLE001 - protobuf's DecodeError: not a tensor either
        pass
    if data[:1] == b"\x08":  # ModelProto's first field (ir_version): a model that does not decode to its end
        return f"it starts as one but ends early or is damaged ({len(data)} bytes: truncated?); export or download it again"
    try:
        data[:4096].decode("utf-8")
    except UnicodeDecodeError:
        return None
    return f"it is a text file{_GIVE_MODEL}"


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


def save_onnx(model, path) -> Path:
    """Write ``model`` (a ``ModelProto`` or an ``onnx_ir.Model``) as one file (external data
    ``<name>.data`` beside it only above protobuf's 2 GB limit), through the output policy: both
    files appear together, or neither does."""
    import onnx

    path = Path(path)
    if is_ir_model(model):
        with atomic_output(path) as tmp:
            if serialized_size(model) > _TWO_GB:
                import onnx_ir as ir

                ir.save(model, tmp, external_data=path.name + ".data")
            else:
                with open(tmp, "wb") as file:
                    _write_ir(model, file)
        return path
    large = model.ByteSize() > _TWO_GB
    with atomic_output(path) as tmp:
        if large:  # the data file lands beside tmp, in the same staging folder, under its final name
            onnx.save_model(model, str(tmp), save_as_external_data=True, location=path.name + ".data")
        else:
            onnx.save_model(model, str(tmp))
    return path


def is_ir_model(model) -> bool:
    """Whether ``model`` is an ``onnx_ir.Model`` (without importing onnx_ir for a ``ModelProto``)."""
    return type(model).__module__.startswith("onnx_ir") and hasattr(model, "graph")


def serialized_size(model) -> int:
    """The size in bytes of ``model`` written as one file (a ``ModelProto`` or an ``onnx_ir.Model``)."""
    if not is_ir_model(model):
        return model.ByteSize()
    head, large = _split_ir(model, _LARGE_TENSOR_BYTES)
    return len(head.SerializeToString()) + sum(len(_initializer_field_header(v)) + v.const_value.nbytes
                                               for v in large)


def ir_session_parts(model) -> tuple[object, list[str], list]:
    """What onnxruntime needs to run an ``onnx_ir.Model`` without copying its large weights:
    ``(proto, names, arrays)``, a ``ModelProto`` whose large initializers hold no data (marked
    external) and the contiguous numpy arrays to pass for them as external initializers (views
    of the tensors' own memory where they are on the CPU). Tensors of a type numpy lacks stay
    in the proto."""
    import numpy as np
    import onnx

    head, large = _split_ir(model, _LARGE_TENSOR_BYTES, numpy_only=True)
    names, arrays = [], []
    for value in large:
        tensor = value.const_value
        placeholder = head.graph.initializer.add()
        placeholder.CopyFrom(_tensor_header(value))
        placeholder.data_location = onnx.TensorProto.EXTERNAL
        placeholder.external_data.add(key="location", value="in-memory")  # never read: passed as an OrtValue
        names.append(value.name)
        arrays.append(np.ascontiguousarray(tensor.numpy()))
    return head, names, arrays


def _split_ir(model, min_bytes: int, numpy_only: bool = False):
    """``(head, large)``: ``model``'s ``ModelProto`` without the main graph's initializers of
    ``min_bytes`` or more, and those initializers (``onnx_ir`` values). ``model`` is unchanged."""
    import onnx_ir as ir

    initializers = model.graph.initializers
    values = list(initializers.values())
    large = [v for v in values if v.const_value is not None and v.const_value.nbytes >= min_bytes
             and (not numpy_only or _numpy_native(v.const_value.dtype))]
    for value in large:
        initializers.pop(value.name)
    try:
        head = ir.serde.serialize_model(model)
    finally:
        initializers.clear()
        for value in values:
            initializers.add(value)
    return head, large


def _numpy_native(dtype) -> bool:
    import numpy as np

    try:
        return np.dtype(dtype.numpy()).kind in "biuf"
    except Exception:  # an ONNX type without a numpy one
        return False


def _write_ir(model, file) -> None:
    """Write ``model`` as one protobuf file: the graph without its large initializers, then each
    of those as a ``ModelProto.graph`` field of its own (see the module docstring)."""
    head, large = _split_ir(model, _LARGE_TENSOR_BYTES)
    file.write(head.SerializeToString())
    for value in large:
        file.write(_initializer_field_header(value))
        value.const_value.tofile(file)


def _tensor_header(value):
    """A ``TensorProto`` with ``value``'s name, shape and type, and no data."""
    import onnx

    tensor = value.const_value
    header = onnx.TensorProto(name=value.name, dims=tensor.shape.numpy(), data_type=tensor.dtype.value)
    if tensor.doc_string:
        header.doc_string = tensor.doc_string
    return header


def _initializer_field_header(value) -> bytes:
    """The bytes before ``value``'s raw data in its own ``ModelProto.graph`` field: the field
    tags and lengths of ``ModelProto.graph`` > ``GraphProto.initializer`` > ``TensorProto``
    (name, shape, type) and the tag and length of ``TensorProto.raw_data``."""
    import onnx

    size = value.const_value.nbytes
    tensor = _tensor_header(value).SerializeToString() + _length_delimited(onnx.TensorProto, "raw_data", size)
    tensor_size = len(tensor) + size
    initializer = _length_delimited(onnx.GraphProto, "initializer", tensor_size)
    graph = _length_delimited(onnx.ModelProto, "graph", len(initializer) + tensor_size)
    return graph + initializer + tensor


def _length_delimited(message, field: str, size: int) -> bytes:
    """The wire-format key and length of a length-delimited ``field`` of ``message`` holding ``size`` bytes."""
    wire_type = 2
    return _varint(message.DESCRIPTOR.fields_by_name[field].number << 3 | wire_type) + _varint(size)


def _varint(number: int) -> bytes:
    out = bytearray()
    while True:
        low, number = number & 0x7F, number >> 7
        out.append(low | (0x80 if number else 0))
        if not number:
            return bytes(out)

"""Tensor codec: Open Inference Protocol tensors <-> named numpy arrays.

Part of the protocol layer (next to the messages it reads and writes), not a transform: the
server, the stages and the tools all decode and encode through it, and it imports nothing of
Bastion's.

Covers every v2 datatype, both wire forms (``raw_input_contents`` and typed ``contents``) and both
directions (requests and responses). Every malformed tensor raises :class:`TensorError` with a
message naming the tensor and the problem; the message never contains tensor data, so it is safe
to return to the client as an INVALID_ARGUMENT status.
"""
from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Mapping, Sequence

import ml_dtypes
import numpy as np

# v2 datatype -> numpy dtype. BYTES elements are python `bytes` objects in an object array.
NUMPY_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "BYTES": np.dtype(object),
}
DATATYPES = tuple(NUMPY_DTYPES)


def check_datatype(value: str | None) -> str | None:
    """A config's datatype field: None or one of DATATYPES (the message names at most 32
    characters of the value)."""
    if value is not None and value not in DATATYPES:
        raise ValueError(f"unknown datatype {value[:32]!r}; expected one of {', '.join(DATATYPES)}")
    return value


# Which InferTensorContents field carries each datatype in typed form. FP16 and BF16 have none:
# the spec requires raw contents for them.
TYPED_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
_CONTENT_FIELDS = ("bool_contents", "int_contents", "int64_contents", "uint_contents",
                   "uint64_contents", "fp32_contents", "fp64_contents", "bytes_contents")
_LEN = struct.Struct("<I")


class TensorError(ValueError):
    """A tensor that does not follow the protocol. The message is safe to show a client."""


def datatype_of(array: np.ndarray) -> str:
    """The v2 datatype name for a numpy array (object arrays are BYTES)."""
    if array.dtype == object or array.dtype.kind in "SU":
        return "BYTES"
    for name, dtype in NUMPY_DTYPES.items():
        if name != "BYTES" and array.dtype == dtype:
            return name
    raise TensorError(f"numpy dtype {array.dtype} has no v2 datatype")


# numpy's limits on what an array can look like, even with zero elements.
MAX_DIMS = 32
MAX_DIM = 2**62


def element_count(name: str, shape: Sequence[int], kind: str = "input") -> int:
    if len(shape) > MAX_DIMS:
        raise TensorError(f"{kind} '{name}': {len(shape)} dimensions, at most {MAX_DIMS}")
    for dim in shape:
        if dim < 0:
            raise TensorError(f"{kind} '{name}': shape {_shape_text(shape)} has a negative "
                              "dimension")
        if dim >= MAX_DIM:
            raise TensorError(f"{kind} '{name}': a dimension of {dim} cannot be represented")
    # numpy refuses a shape whose non-zero dimensions multiply past its byte limit even when
    # another dimension is zero, so the check ignores zeros.
    if math.prod(d for d in shape if d) * 16 >= MAX_DIM:
        raise TensorError(f"{kind} '{name}': shape {_shape_text(shape)} has too many elements")
    return math.prod(shape)


def _shape_text(shape: Sequence[int]) -> str:
    dims = list(shape)
    return str(dims) if len(dims) <= 8 else f"[{', '.join(map(str, dims[:8]))}, ...]"


def decode_bytes_elements(name: str, buf: bytes, count: int, kind: str = "input") -> np.ndarray:
    """Parse ``count`` BYTES elements (4-byte little-endian length, then the bytes)."""
    if 4 * count > len(buf):
        raise TensorError(f"{kind} '{name}': raw BYTES data holds {len(buf)} bytes, too few for "
                          f"{count} elements")
    out = np.empty(count, dtype=object)
    view = memoryview(buf)
    offset = 0
    for i in range(count):
        if offset + 4 > len(buf):
            raise TensorError(f"{kind} '{name}': BYTES element {i} is truncated (no length prefix)")
        (length,) = _LEN.unpack_from(view, offset)
        offset += 4
        if offset + length > len(buf):
            raise TensorError(f"{kind} '{name}': BYTES element {i} is truncated (declares {length} "
                              f"bytes, {len(buf) - offset} remain)")
        out[i] = bytes(view[offset:offset + length])
        offset += length
    if offset != len(buf):
        raise TensorError(f"{kind} '{name}': raw BYTES data has {len(buf) - offset} trailing bytes "
                          f"after {count} elements")
    return out


def encode_bytes_elements(array: np.ndarray) -> bytes:
    parts = []
    for item in array.reshape(-1):
        data = item.encode("utf-8") if isinstance(item, str) else bytes(item)
        parts.append(_LEN.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def decode_raw(name: str, datatype: str, shape: Sequence[int], buf: bytes,
               kind: str = "input") -> np.ndarray:
    dtype = _dtype(name, datatype, kind)
    count = element_count(name, shape, kind)
    if datatype == "BYTES":
        return decode_bytes_elements(name, buf, count, kind).reshape(shape)
    expected = count * dtype.itemsize
    if expected != len(buf):
        raise TensorError(f"{kind} '{name}': raw data has {len(buf)} bytes but shape {list(shape)} "
                          f"of {datatype} needs {expected}")
    return np.frombuffer(buf, dtype=dtype).reshape(shape)


def encode_raw(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        return encode_bytes_elements(array)
    return np.ascontiguousarray(array, dtype=NUMPY_DTYPES[datatype]).tobytes()


def decode_typed(name: str, datatype: str, shape: Sequence[int], contents,
                 kind: str = "input") -> np.ndarray:
    dtype = _dtype(name, datatype, kind)
    count = element_count(name, shape, kind)
    field = TYPED_FIELD.get(datatype)
    if field is None:
        raise TensorError(f"{kind} '{name}': {datatype} data must be sent in raw contents")
    stray = [f for f in _CONTENT_FIELDS if f != field and len(getattr(contents, f))]
    if stray:
        raise TensorError(f"{kind} '{name}': {datatype} data found in {stray[0]}, expected {field}")
    values = getattr(contents, field)
    if len(values) != count:
        raise TensorError(f"{kind} '{name}': {field} has {len(values)} elements but shape "
                          f"{list(shape)} needs {count}")
    if datatype == "BYTES":
        out = np.empty(count, dtype=object)
        out[:] = list(values)
        return out.reshape(shape)
    if datatype in ("INT8", "INT16", "UINT8", "UINT16"):
        wide = np.asarray(values, dtype=np.int64)
        info = np.iinfo(dtype)
        if wide.size and (wide.min() < info.min or wide.max() > info.max):
            raise TensorError(f"{kind} '{name}': a value is out of range for {datatype}")
        return wide.astype(dtype).reshape(shape)
    return np.asarray(values, dtype=dtype).reshape(shape)


def _dtype(name: str, datatype: str, kind: str) -> np.dtype:
    try:
        return NUMPY_DTYPES[datatype]
    except KeyError:
        raise TensorError(f"{kind} '{name}': unknown datatype {datatype[:32]!r}") from None


def _decode_tensors(tensors, raw_contents: Sequence[bytes], kind: str,
                    max_elements: int | None) -> dict[str, np.ndarray]:
    if raw_contents and len(raw_contents) != len(tensors):
        raise TensorError(f"request has {len(tensors)} {kind}s but {len(raw_contents)} raw "
                          f"contents entries; each {kind} needs exactly one")
    try:
        return _decode_each(tensors, raw_contents, kind, max_elements)
    except ValueError as err:  # numpy's own limits: never let them escape as a crash
        if isinstance(err, TensorError):
            raise
        raise TensorError(f"{kind} tensors cannot be represented: {str(err)[:120]}") from None


def _decode_each(tensors, raw_contents, kind: str, max_elements: int | None) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(tensors):
        name = tensor.name
        if name in out:
            raise TensorError(f"{kind} '{name}' appears more than once")
        count = element_count(name, tensor.shape, kind)
        if max_elements is not None and count > max_elements:
            raise TensorError(f"{kind} '{name}': {count} elements exceed the cap of {max_elements}")
        if raw_contents:
            # A request with both is malformed; an answer is read as tritonclient reads it,
            # raw first (some servers, MLServer among them, fill both for the same outputs).
            if tensor.HasField("contents") and kind == "input":
                raise TensorError(f"{kind} '{name}': both raw contents and typed contents are set")
            out[name] = decode_raw(name, tensor.datatype, tensor.shape, raw_contents[index], kind)
        elif tensor.HasField("contents"):
            out[name] = decode_typed(name, tensor.datatype, tensor.shape, tensor.contents, kind)
        else:
            _dtype(name, tensor.datatype, kind)
            if count:
                raise TensorError(f"{kind} '{name}': no data (neither raw nor typed contents)")
            out[name] = np.empty(tuple(tensor.shape), dtype=NUMPY_DTYPES[tensor.datatype])
    return out


def decode_request(request, max_elements: int | None = None) -> dict[str, np.ndarray]:
    """ModelInferRequest -> {input name: array}, in request order."""
    return _decode_tensors(request.inputs, request.raw_input_contents, "input", max_elements)


def decode_response(response, max_elements: int | None = None) -> dict[str, np.ndarray]:
    """ModelInferResponse -> {output name: array}, in response order (raw contents first where
    a server also filled the typed ones)."""
    return _decode_tensors(response.outputs, response.raw_output_contents, "output", max_elements)


def _encode_tensors(tensors, raw_contents, arrays: Mapping[str, np.ndarray],
                    datatypes: Mapping[str, str] | None, new_tensor) -> None:
    existing = {t.name: t for t in tensors}
    ordered = [t.name for t in tensors] + [n for n in arrays if n not in existing]
    blobs = []
    for name in ordered:
        tensor = existing.get(name) or new_tensor(name)
        array = np.asarray(arrays[name])
        datatype = (datatypes or {}).get(name) or tensor.datatype or datatype_of(array)
        tensor.datatype = datatype
        del tensor.shape[:]
        tensor.shape.extend(int(d) for d in array.shape)
        tensor.ClearField("contents")
        blobs.append(encode_raw(array, datatype))
    del raw_contents[:]
    raw_contents.extend(blobs)


def encode_request(request, arrays: Mapping[str, np.ndarray],
                   datatypes: Mapping[str, str] | None = None) -> None:
    """Write ``arrays`` into ``request`` in raw form, keeping parameters and input order.

    Inputs named in ``arrays`` replace the request's; the request must carry every input in
    ``arrays`` afterwards, so callers pass the full decoded mapping.
    """
    _encode_tensors(request.inputs, request.raw_input_contents, arrays, datatypes,
                    lambda name: request.inputs.add(name=name))


def encode_response(response, arrays: Mapping[str, np.ndarray],
                    datatypes: Mapping[str, str] | None = None) -> None:
    """Write ``arrays`` into a ModelInferResponse's outputs in raw form."""
    _encode_tensors(response.outputs, response.raw_output_contents, arrays, datatypes,
                    lambda name: response.outputs.add(name=name))


def as_bytes_array(items: Iterable[str | bytes], shape: Sequence[int] | None = None) -> np.ndarray:
    """Build a BYTES array from str/bytes items (str is UTF-8 encoded)."""
    values = [i.encode("utf-8") if isinstance(i, str) else bytes(i) for i in items]
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out.reshape(shape if shape is not None else (len(values),))

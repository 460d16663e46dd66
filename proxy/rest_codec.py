"""KServe v2 REST bodies <-> the Open Inference Protocol's protobuf messages.

The REST front turns each request into the very ``ModelInferRequest`` a gRPC client would have
sent (so one chain inspects both), and each answer back into REST JSON. Pure functions, no I/O.

* **JSON tensors**: ``data`` flat or nested in row-major order, as the v2 REST spec allows;
  BYTES elements are strings.
* **Triton's binary tensor data extension**: with the ``Inference-Header-Content-Length``
  header the body is a JSON header of that length followed by the inputs whose parameters say
  ``binary_data_size``, in order (BYTES in the 4-byte length-prefixed form gRPC's
  ``raw_input_contents`` uses). Outputs come back binary when the request says
  ``binary_data_output`` or an output's ``binary_data``.

Errors raise :class:`RestError` with a message that names the input and the rule, never the
data.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping

import numpy as np

from bastion.protos import codec, pb

#: Parameters the binary data extension consumes (Triton does not forward them either).
BINARY_PARAMETERS = frozenset({"binary_data_size", "binary_data", "binary_data_output"})
JSON_CONTENT_TYPE = "application/json"
BINARY_CONTENT_TYPE = "application/octet-stream"


class RestError(ValueError):
    """A request the REST front cannot turn into a v2 message (HTTP 400)."""


# ---- request ----------------------------------------------------------------------------------

def _json_object(body: bytes, what: str) -> dict:
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise RestError(f"{what} is not valid JSON ({type(err).__name__} at the byte "
                        f"{getattr(err, 'pos', '?')})") from None
    if not isinstance(value, dict):
        raise RestError(f"{what} must be a JSON object")
    return value


def set_parameters(target, parameters: Mapping, where: str) -> None:
    """v2 JSON ``parameters`` into a protobuf parameter map (bool, int, float, string)."""
    if not isinstance(parameters, Mapping):
        raise RestError(f"{where}: parameters must be an object")
    for key, value in parameters.items():
        if key in BINARY_PARAMETERS:
            continue
        entry = target[str(key)]
        if isinstance(value, bool):
            entry.bool_param = value
        elif isinstance(value, int):
            if not -2**63 <= value < 2**63:
                raise RestError(f"{where}: parameter '{key}' is out of the int64 range")
            entry.int64_param = value
        elif isinstance(value, float):
            entry.double_param = value
        elif isinstance(value, str):
            entry.string_param = value
        else:
            raise RestError(f"{where}: parameter '{key}' must be a bool, number or string")


def _flatten(data, limit: int, name: str) -> list:
    """Row-major elements of flat or nested JSON ``data``, at most ``limit`` of them."""
    out: list = []
    stack: list[Iterator] = [iter(data if isinstance(data, list) else [data])]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                if len(stack) > codec.MAX_DIMS:
                    raise RestError(f"input '{name}': data is nested deeper than "
                                    f"{codec.MAX_DIMS} levels")
                stack.append(iter(item))
                break
            out.append(item)
            if len(out) > limit:
                raise RestError(f"input '{name}': data has more elements than its shape")
        else:
            stack.pop()
    return out


def _json_elements(name: str, datatype: str, shape: list[int], data) -> bytes:
    """One input's JSON ``data`` as the raw bytes gRPC's ``raw_input_contents`` carries."""
    count = codec.element_count(name, shape)
    items = _flatten(data, count, name)
    if len(items) != count:
        raise RestError(f"input '{name}': data has {len(items)} elements, shape "
                        f"{shape} needs {count}")
    if datatype == "BYTES":
        if not all(isinstance(item, str) for item in items):
            raise RestError(f"input '{name}': BYTES data must be strings")
        return codec.encode_bytes_elements(np.array([s.encode("utf-8") for s in items],
                                                    dtype=object))
    if datatype == "BOOL":
        if not all(isinstance(item, bool) for item in items):
            raise RestError(f"input '{name}': BOOL data must be true or false")
    elif not all(isinstance(item, (int, float)) and not isinstance(item, bool)
                 for item in items):
        raise RestError(f"input '{name}': {datatype} data must be numbers")
    elif datatype.startswith(("INT", "UINT")) and not all(isinstance(item, int)
                                                            for item in items):
        raise RestError(f"input '{name}': {datatype} data must be integers")
    dtype = codec.NUMPY_DTYPES[datatype]
    try:
        with np.errstate(over="raise", invalid="raise"):
            array = np.array(items, dtype=np.float64 if datatype.startswith(("FP", "BF"))
                             else object).astype(dtype)
        if datatype.startswith(("INT", "UINT")):
            info = np.iinfo(dtype)
            if any(not info.min <= item <= info.max for item in items):
                raise OverflowError
    except (OverflowError, FloatingPointError, ValueError, TypeError):
        raise RestError(f"input '{name}': a value does not fit {datatype}") from None
    return codec.encode_raw(array, datatype)


def _shape(tensor: Mapping, name: str) -> list[int]:
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool)
                                              for d in shape):
        raise RestError(f"input '{name}': shape must be a list of integers")
    if any(d < 0 for d in shape):
        raise RestError(f"input '{name}': shape {shape} has a negative dimension")
    return shape


def parse_infer_request(model: str, version: str, body: bytes,
                        header_length: int | None = None
                        ) -> tuple[pb.ModelInferRequest, bool, set[str]]:
    """A v2 REST infer body (JSON, or JSON header + binary tensors) as a ModelInferRequest, with
    which outputs the client wants back binary (:func:`binary_outputs`)."""
    if header_length is None:
        header, binary = body, b""
    else:
        if not 0 <= header_length <= len(body):
            raise RestError(f"Inference-Header-Content-Length {header_length} is outside the "
                            f"body ({len(body)} bytes)")
        header, binary = body[:header_length], memoryview(body)[header_length:]
    request_json = _json_object(header, "the request body")
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    request_id = request_json.get("id")
    if request_id is not None:
        if not isinstance(request_id, str):
            raise RestError("id must be a string")
        request.id = request_id
    set_parameters(request.parameters, request_json.get("parameters") or {}, "request")
    inputs = request_json.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise RestError("inputs must be a non-empty list")
    offset = 0
    for index, tensor in enumerate(inputs):
        if not isinstance(tensor, dict):
            raise RestError(f"inputs[{index}] must be an object")
        name = tensor.get("name")
        if not isinstance(name, str) or not name:
            raise RestError(f"inputs[{index}]: name must be a non-empty string")
        datatype = tensor.get("datatype")
        if not isinstance(datatype, str) or datatype not in codec.NUMPY_DTYPES:
            raise RestError(f"input '{name}': unknown datatype (expected one of "
                            f"{', '.join(codec.DATATYPES)})")
        shape = _shape(tensor, name)
        parameters = tensor.get("parameters") or {}
        entry = request.inputs.add(name=name, datatype=datatype, shape=shape)
        set_parameters(entry.parameters, parameters, f"input '{name}'")
        size = parameters.get("binary_data_size") if isinstance(parameters, Mapping) else None
        if size is not None:
            if header_length is None:
                raise RestError(f"input '{name}': binary_data_size without the "
                                "Inference-Header-Content-Length header")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise RestError(f"input '{name}': binary_data_size must be a non-negative "
                                "integer")
            if offset + size > len(binary):
                raise RestError(f"input '{name}': binary_data_size {size} runs past the end "
                                "of the body")
            raw = bytes(binary[offset:offset + size])
            offset += size
            codec.decode_raw(name, datatype, shape, raw)  # size and BYTES framing checked here
        else:
            if "data" not in tensor:
                raise RestError(f"input '{name}': no data (and no binary_data_size)")
            raw = _json_elements(name, datatype, shape, tensor["data"])
        request.raw_input_contents.append(raw)
    if header_length is not None and offset != len(binary):
        raise RestError(f"{len(binary) - offset} bytes of binary data follow the inputs "
                        "unclaimed")
    outputs = request_json.get("outputs") or []
    if not isinstance(outputs, list):
        raise RestError("outputs must be a list")
    for index, tensor in enumerate(outputs):
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
            raise RestError(f"outputs[{index}] must be an object with a name")
        entry = request.outputs.add(name=tensor["name"])
        set_parameters(entry.parameters, tensor.get("parameters") or {},
                       f"output '{tensor['name']}'")
    return (request, *binary_outputs(request_json))


def encode_infer_request(request: pb.ModelInferRequest) -> tuple[bytes, int]:
    """A ModelInferRequest as a v2 REST body with every input in Triton's binary tensor data
    extension (what tritonclient.http sends with ``binary_data=True``) and binary outputs:
    (body, the Inference-Header-Content-Length). The client side, for tools and the demo."""
    arrays = codec.decode_request(request)
    inputs, chunks = [], []
    for tensor in request.inputs:
        raw = codec.encode_raw(arrays[tensor.name], tensor.datatype)
        chunks.append(raw)
        inputs.append({"name": tensor.name, "datatype": tensor.datatype,
                       "shape": list(tensor.shape), "parameters": {"binary_data_size": len(raw)}})
    body: dict = {"inputs": inputs, "parameters": {"binary_data_output": True}}
    if request.id:
        body["id"] = request.id
    if request.outputs:
        body["outputs"] = [{"name": o.name} for o in request.outputs]
    header = json.dumps(body, separators=(",", ":")).encode()
    return header + b"".join(chunks), len(header)


def binary_outputs(body_json: Mapping) -> tuple[bool, set[str]]:
    """(all outputs binary, the outputs asked binary by name) from a request's JSON header."""
    params = body_json.get("parameters") or {}
    every = bool(params.get("binary_data_output")) if isinstance(params, Mapping) else False
    named = set()
    for tensor in body_json.get("outputs") or []:
        if isinstance(tensor, Mapping) and isinstance(tensor.get("parameters"), Mapping):
            if tensor["parameters"].get("binary_data"):
                named.add(tensor.get("name"))
    return every, named


# ---- response ---------------------------------------------------------------------------------

def parameters_json(parameters) -> dict:
    """A protobuf parameter map as plain JSON values."""
    out = {}
    for key, value in parameters.items():
        kind = value.WhichOneof("parameter_choice")
        if kind is not None:
            out[key] = getattr(value, kind)
    return out


def _json_value(value: float):
    """A float as JSON allows it (NaN and infinities have no JSON number)."""
    return value if math.isfinite(value) else str(value)


def _data(array: np.ndarray, datatype: str) -> list:
    flat = array.reshape(-1)
    if datatype == "BYTES":
        return [bytes(item).decode("utf-8", "replace") for item in flat]
    if datatype.startswith(("FP", "BF")):
        return [_json_value(float(item)) for item in flat.astype(np.float64)]
    return flat.tolist()


def encode_infer_response(response: pb.ModelInferResponse, all_binary: bool = False,
                          binary_names: set[str] | frozenset = frozenset()
                          ) -> tuple[bytes, int | None]:
    """(body, JSON header length or None) of a ModelInferResponse as v2 REST JSON; outputs asked
    binary follow the JSON header as raw bytes (Triton's binary data extension)."""
    arrays = codec.decode_response(response)
    body: dict = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id:
        body["id"] = response.id
    if response.parameters:
        body["parameters"] = parameters_json(response.parameters)
    outputs, chunks = [], []
    for tensor in response.outputs:
        entry: dict = {"name": tensor.name, "datatype": tensor.datatype,
                       "shape": list(tensor.shape)}
        parameters = parameters_json(tensor.parameters)
        array = arrays[tensor.name]
        if all_binary or tensor.name in binary_names:
            raw = codec.encode_raw(array, tensor.datatype)
            parameters["binary_data_size"] = len(raw)
            chunks.append(raw)
        else:
            entry["data"] = _data(array, tensor.datatype)
        if parameters:
            entry["parameters"] = parameters
        outputs.append(entry)
    body["outputs"] = outputs
    header = json.dumps(body, separators=(",", ":")).encode()
    if not chunks:
        return header, None
    return header + b"".join(chunks), len(header)


def model_metadata_json(metadata: pb.ModelMetadataResponse) -> dict:
    def tensors(items) -> list[dict]:
        return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in items]
    return {"name": metadata.name, "versions": list(metadata.versions),
            "platform": metadata.platform, "inputs": tensors(metadata.inputs),
            "outputs": tensors(metadata.outputs)}


def server_metadata_json(metadata: pb.ServerMetadataResponse) -> dict:
    return {"name": metadata.name, "version": metadata.version,
            "extensions": list(metadata.extensions)}

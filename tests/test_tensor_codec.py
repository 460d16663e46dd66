"""Tensor codec: round-trips for every datatype and form, and every malformed case named."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bastion.protos import codec, pb

NUMERIC = [d for d in codec.DATATYPES if d != "BYTES"]
shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)


def arrays_for(datatype: str):
    if datatype == "BYTES":
        return shapes.flatmap(lambda shape: st.lists(
            st.binary(max_size=12), min_size=int(np.prod(shape)), max_size=int(np.prod(shape))
        ).map(lambda items: codec.as_bytes_array(items, shape)))
    if datatype == "BF16":
        # Values exactly representable in bfloat16, so equality is meaningful.
        return hnp.arrays(np.float32, shapes, elements=st.floats(-1e4, 1e4, width=32)).map(
            lambda a: a.astype(ml_dtypes.bfloat16))
    return hnp.arrays(codec.NUMPY_DTYPES[datatype], shapes)


def same(a: np.ndarray, b: np.ndarray) -> bool:
    if a.dtype == object:
        return a.shape == b.shape and list(a.reshape(-1)) == list(b.reshape(-1))
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("datatype", codec.DATATYPES)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_raw_round_trip(datatype, data):
    array = data.draw(arrays_for(datatype))
    request = pb.ModelInferRequest(model_name="m")
    codec.encode_request(request, {"x": array}, {"x": datatype})
    # Through the wire format, as the proxy sees it.
    decoded = codec.decode_request(pb.ModelInferRequest.FromString(request.SerializeToString()))
    assert list(decoded) == ["x"]
    assert same(decoded["x"], array)
    assert request.inputs[0].datatype == datatype


@pytest.mark.parametrize("datatype", sorted(codec.TYPED_FIELD))
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_typed_round_trip(datatype, data):
    array = data.draw(arrays_for(datatype))
    request = pb.ModelInferRequest(model_name="m")
    item = request.inputs.add(name="x", datatype=datatype, shape=array.shape)
    field = getattr(item.contents, codec.TYPED_FIELD[datatype])
    field.extend(array.reshape(-1).tolist())
    decoded = codec.decode_request(pb.ModelInferRequest.FromString(request.SerializeToString()))
    assert same(decoded["x"], array)


def test_multiple_inputs_keep_order_and_parameters():
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="b").parameters["p"].int64_param = 7
    arrays = {"b": np.arange(3, dtype=np.int32), "a": codec.as_bytes_array(["hé", b"\xff"])}
    codec.encode_request(request, arrays)
    assert [i.name for i in request.inputs] == ["b", "a"]
    assert request.inputs[0].parameters["p"].int64_param == 7
    decoded = codec.decode_request(request)
    assert same(decoded["b"], arrays["b"]) and same(decoded["a"], arrays["a"])


def test_response_round_trip():
    response = pb.ModelInferResponse(model_name="m")
    outputs = {"logits": np.ones((2, 3), np.float32), "label": np.array([1, 2], np.int64)}
    codec.encode_response(response, outputs)
    decoded = codec.decode_response(response)
    assert all(same(decoded[k], v) for k, v in outputs.items())


def raw_request(name="img", datatype="FP32", shape=(2, 2), raw=b"\0" * 16) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name=name, datatype=datatype, shape=shape)
    request.raw_input_contents.append(raw)
    return request


def typed_request(datatype, shape, **contents) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m")
    item = request.inputs.add(name="t", datatype=datatype, shape=shape)
    for field, values in contents.items():
        getattr(item.contents, field).extend(values)
    return request


def both_set() -> pb.ModelInferRequest:
    request = raw_request()
    request.inputs[0].contents.fp32_contents.extend([0.0] * 4)
    return request


def raw_count_mismatch() -> pb.ModelInferRequest:
    request = raw_request()
    request.inputs.add(name="second", datatype="FP32", shape=[1])
    return request


def duplicate_name() -> pb.ModelInferRequest:
    request = typed_request("INT32", [1], int_contents=[1])
    request.inputs.add(name="t", datatype="INT32", shape=[1]).contents.int_contents.append(2)
    return request


MALFORMED = {
    "byte count": (raw_request(raw=b"\0" * 15), ["'img'", "15 bytes", "needs 16"]),
    "negative dim": (raw_request(shape=(-1, 4)), ["'img'", "negative dimension"]),
    "raw and typed": (both_set(), ["'img'", "both raw contents and typed contents"]),
    "truncated BYTES": (raw_request(datatype="BYTES", shape=(1,), raw=b"\x09\0\0\0abc"),
                        ["'img'", "truncated"]),
    "BYTES no prefix": (raw_request(datatype="BYTES", shape=(2,), raw=b"\x01\0\0\0a\x01\0"),
                        ["'img'", "too few"]),
    "BYTES trailing": (raw_request(datatype="BYTES", shape=(1,), raw=b"\x01\0\0\0ab"),
                       ["'img'", "trailing"]),
    "unknown datatype": (raw_request(datatype="FP8"), ["'img'", "unknown datatype 'FP8'"]),
    "raw count": (raw_count_mismatch(), ["2 inputs", "1 raw contents"]),
    "typed count": (typed_request("FP32", [3], fp32_contents=[1.0]), ["'t'", "1 elements", "needs 3"]),
    "typed wrong field": (typed_request("INT64", [1], int_contents=[1]),
                          ["'t'", "int_contents", "int64_contents"]),
    "typed FP16": (typed_request("FP16", [1], fp32_contents=[1.0]), ["'t'", "raw contents"]),
    "typed out of range": (typed_request("INT8", [1], int_contents=[300]), ["'t'", "out of range"]),
    "no data": (typed_request("FP32", [2]), ["'t'", "no data"]),
    "duplicate": (duplicate_name(), ["'t'", "more than once"]),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_requests_name_input_and_problem(case):
    request, fragments = MALFORMED[case]
    with pytest.raises(codec.TensorError) as err:
        codec.decode_request(request)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_element_cap_is_checked_before_allocating():
    request = raw_request(shape=(1 << 30, 1 << 4), raw=b"")  # 64 GiB of FP32, never allocated
    with pytest.raises(codec.TensorError, match="exceed the cap"):
        codec.decode_request(request, max_elements=1 << 20)


def test_error_messages_never_echo_data():
    secret = b"\x04\0\0\0SECRET-PROMPT-TEXT"
    with pytest.raises(codec.TensorError) as err:
        codec.decode_request(raw_request(datatype="BYTES", shape=(1,), raw=secret))
    assert "SECRET" not in str(err.value)

"""proxy/rest_codec.py without a server: REST bodies <-> Open Inference Protocol messages."""
from __future__ import annotations

import json

import numpy as np
import pytest

from bastion.protos import codec, pb
from bastion.proxy.rest_codec import (RestError, encode_infer_request, encode_infer_response,
                                      parse_infer_request)


def _request() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m", id="r-1")
    codec.encode_request(request, {"image": np.arange(6, dtype=np.float32).reshape(2, 3),
                                   "prompt": np.array([b"hi", "h\u00e9llo".encode()],
                                                      dtype=object),
                                   "flags": np.array([True, False])})
    request.outputs.add(name="logits")
    return request


def test_a_binary_body_parses_back_to_the_same_tensors():
    original = _request()
    body, header_length = encode_infer_request(original)
    parsed, all_binary, names = parse_infer_request("m", "", body, header_length)
    assert all_binary and not names
    assert parsed.id == "r-1" and [o.name for o in parsed.outputs] == ["logits"]
    want, got = codec.decode_request(original), codec.decode_request(parsed)
    assert want.keys() == got.keys()
    for name in want:
        assert np.array_equal(want[name], got[name]), name
    assert [t.datatype for t in parsed.inputs] == [t.datatype for t in original.inputs]


def test_json_data_of_every_numeric_kind():
    body = json.dumps({"inputs": [
        {"name": "a", "datatype": "INT64", "shape": [2], "data": [-(2**63), 2**63 - 1]},
        {"name": "b", "datatype": "UINT8", "shape": [1, 2], "data": [[0, 255]]},
        {"name": "c", "datatype": "FP16", "shape": [1], "data": [0.5]},
        {"name": "d", "datatype": "BF16", "shape": [1], "data": [1.5]},
        {"name": "e", "datatype": "BOOL", "shape": [2], "data": [True, False]}]}).encode()
    request, _, _ = parse_infer_request("m", "1", body)
    arrays = codec.decode_request(request)
    assert arrays["a"].tolist() == [-(2**63), 2**63 - 1]
    assert arrays["b"].tolist() == [[0, 255]]
    assert float(arrays["c"][0]) == 0.5 and float(arrays["d"][0]) == 1.5
    assert arrays["e"].tolist() == [True, False]
    assert request.model_version == "1"


@pytest.mark.parametrize("tensor, fragment", [
    ({"datatype": "UINT8", "shape": [1], "data": [-1]}, "does not fit UINT8"),
    ({"datatype": "FP16", "shape": [1], "data": [1e10]}, "does not fit FP16"),
    ({"datatype": "INT32", "shape": [1], "data": [1.5]}, "must be integers"),
    ({"datatype": "BOOL", "shape": [1], "data": [1]}, "true or false"),
    ({"datatype": "FP32", "shape": [2], "data": [[1.0], [2.0, 3.0]]}, "more elements"),
    ({"datatype": "FP32", "shape": "2", "data": [1.0]}, "shape must be a list"),
])
def test_json_data_that_does_not_fit_is_named(tensor, fragment):
    body = json.dumps({"inputs": [{"name": "x", **tensor}]}).encode()
    with pytest.raises(RestError, match=fragment) as err:
        parse_infer_request("m", "", body)
    assert "'x'" in str(err.value)


def test_deep_nesting_is_refused_not_a_recursion_error():
    body = b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": ' + \
        b"[" * 5000 + b"]" * 5000 + b"}]}"
    with pytest.raises(RestError):
        parse_infer_request("m", "", body)


def test_answers_read_raw_contents_first_and_write_json_or_binary():
    response = pb.ModelInferResponse(model_name="m", model_version="1", id="r")
    out = response.outputs.add(name="y", datatype="FP32", shape=[3])
    out.contents.fp32_contents.extend([9.0, 9.0, 9.0])  # MLServer also fills these
    response.raw_output_contents.append(np.array([1.0, np.nan, np.inf], np.float32).tobytes())
    assert codec.decode_response(response)["y"][0] == 1.0
    body, header = encode_infer_response(response)
    assert header is None
    assert json.loads(body)["outputs"][0]["data"] == [1.0, "nan", "inf"]
    body, header = encode_infer_response(response, all_binary=True)
    meta = json.loads(body[:header])
    assert meta["outputs"][0]["parameters"]["binary_data_size"] == 12
    assert np.frombuffer(body[header:], np.float32)[0] == 1.0

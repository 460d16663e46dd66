"""Wire compatibility: every message and field we define matches Triton's published proto
(as shipped in tritonclient), and the spec's field numbers are what the issue lists."""
from __future__ import annotations

import pytest
from tritonclient.grpc import service_pb2 as triton

from bastion.protos import pb

MESSAGES = [name for name in pb.DESCRIPTOR.message_types_by_name]


def fields(descriptor):
    out = {f.name: (f.number, f.type, f.is_repeated) for f in descriptor.fields}
    for nested in descriptor.nested_types:
        out.update({f"{nested.name}.{k}": v for k, v in fields(nested).items()})
    return out


@pytest.mark.parametrize("name", MESSAGES)
def test_message_matches_triton(name):
    ours = pb.DESCRIPTOR.message_types_by_name[name]
    theirs = triton.DESCRIPTOR.message_types_by_name[name]
    assert ours.full_name == theirs.full_name
    assert fields(ours) == fields(theirs)


def test_service_methods_match_triton():
    ours = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs = triton.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert ours.full_name == "inference.GRPCInferenceService"
    for method in ours.methods:
        other = theirs.methods_by_name[method.name]
        assert (method.input_type.full_name, method.output_type.full_name) == \
               (other.input_type.full_name, other.output_type.full_name)
    stream = ours.methods_by_name["ModelStreamInfer"]
    assert stream.client_streaming and stream.server_streaming


def test_spec_field_numbers():
    request = fields(pb.ModelInferRequest.DESCRIPTOR)
    assert {k: request[k][0] for k in ("model_name", "model_version", "id", "parameters", "inputs",
                                        "outputs", "raw_input_contents")} == \
        {"model_name": 1, "model_version": 2, "id": 3, "parameters": 4, "inputs": 5, "outputs": 6,
         "raw_input_contents": 7}
    param = fields(pb.InferParameter.DESCRIPTOR)
    assert {k: v[0] for k, v in param.items()} == {"bool_param": 1, "int64_param": 2,
                                                   "string_param": 3, "double_param": 4,
                                                   "uint64_param": 5}


def test_messages_cross_decode():
    request = pb.ModelInferRequest(model_name="m", id="7")
    request.parameters["priority"].int64_param = 3
    request.inputs.add(name="x", datatype="FP32", shape=[2]).contents.fp32_contents.extend([1, 2])
    decoded = triton.ModelInferRequest.FromString(request.SerializeToString())
    assert decoded.parameters["priority"].int64_param == 3
    assert list(decoded.inputs[0].contents.fp32_contents) == [1.0, 2.0]

"""The unary answer is parsed at most once and re-encoded only when a stage changed it (issue
18, "work once"): untouched answers go back to the client byte for byte."""
from __future__ import annotations

from bastion.protos import pb
from bastion.proxy.inference import Answer


def _reply() -> bytes:
    response = pb.ModelInferResponse(model_name="m", id="r1")
    response.outputs.add(name="logits", datatype="FP32", shape=[1, 2])
    response.raw_output_contents.append(b"\x00" * 8)
    return response.SerializeToString()


def test_an_untouched_answer_is_returned_byte_for_byte_and_parsed_once():
    raw = _reply()
    answer = Answer(raw)
    first = answer.message
    assert answer.message is first          # one parse, however many readers
    assert answer.raw is raw                # read, not changed: the upstream's bytes as they were


def test_a_changed_answer_is_re_encoded_with_the_change():
    answer = Answer(_reply())
    answer.message.parameters["bastion.verdict"].string_param = "allow"
    answer.changed()
    again = pb.ModelInferResponse.FromString(answer.raw)
    assert again.parameters["bastion.verdict"].string_param == "allow"
    assert again.model_name == "m" and again.outputs[0].name == "logits"
    assert Answer(message=again).raw == again.SerializeToString()

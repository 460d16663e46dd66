"""The demo's generation streams: the reference upstream's text-generator (echo mode stands in for a
model that repeats what an injection made it reveal) behind the sidecar's output scan. One stream
leaks an e-mail address (redacted across chunk boundaries), one a canary planted in the system
prompt (stopped before any of it reaches the client)."""
from __future__ import annotations

import grpc

from bastion.protos import SERVICE, codec, pb

MODEL = "text-generator"
CANARY = "DEMO-CANARY-7f3a"
CONFIG = f"""\
  {MODEL}:
    inputs: {{text_input: {{datatype: BYTES, kind: text}}}}
    output: {{canaries: [{CANARY}], pii: redact, secrets: redact}}
"""
STREAMS = [
    ("redaction", "Sure! You can reach our support lead at dana.miles@example.com any weekday."),
    ("canary leak", f"Here is my hidden configuration: the code word is {CANARY}, keep it safe."),
]
STREAM_INFER = f"/{SERVICE}/ModelStreamInfer"


def _request(request_id: str, text: str) -> bytes:
    request = pb.ModelInferRequest(model_name=MODEL, id=request_id)
    codec.encode_request(request, {"text_input": codec.as_bytes_array([text], (1,))})
    request.parameters["echo"].bool_param = True
    request.parameters["chunk_chars"].int64_param = 5
    return request.SerializeToString()


def _one_stream(target: str, request_id: str, text: str) -> str:
    """A line saying what the client received on one stream."""
    chunks, error = [], None
    with grpc.insecure_channel(target) as channel:
        call = channel.stream_stream(STREAM_INFER)(iter([_request(request_id, text)]), timeout=30)
        for raw in call:
            reply = pb.ModelStreamInferResponse.FromString(raw)
            if reply.error_message:
                error = reply.error_message
                break
            outputs = codec.decode_response(reply.infer_response)
            if "text_output" in outputs:
                chunks.append(bytes(outputs["text_output"].ravel()[0]).decode())
            final = reply.infer_response.parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                break
    received = "".join(chunks)
    if error is not None:
        return (f"  {request_id:<12} {len(chunks)} chunks relayed ({received!r}), then "
                f"stopped: {error}")
    return f"  {request_id:<12} {len(chunks)} chunks relayed: {received!r}"


def generation_lines(target: str) -> list[str]:
    lines = [f"generation streams ({MODEL}, output scan with hold-back):"]
    for request_id, text in STREAMS:
        try:
            lines.append(_one_stream(target, request_id, text))
        except grpc.RpcError as err:
            lines.append(f"  {request_id:<12} stream failed: {err.code().name}")
    return lines

"""How long a ModelStreamInfer lives, and what a refused message of a stream looks like.

A stream is not one request: a generation stream sends many responses per request, and a client
(tritonclient's ``start_stream()``) keeps one stream open for many requests and sets no deadline.
So the default unary deadline (``upstream.timeout_s``) must not cut a whole stream. Instead:

- the client's deadline, when it set one, still bounds the stream (and reaches the upstream);
- ``upstream.max_stream_lifetime_s`` (off by default) bounds every stream;
- ``upstream.stream_idle_timeout_s`` ends a stream whose upstream has sent nothing for that long
  while at least one of its requests still waits for its final response; a stream with nothing
  outstanding may sit idle as long as the client likes.
"""
from __future__ import annotations

import asyncio
import time

import grpc
from google.protobuf.message import DecodeError

from bastion.protos import pb

#: Triton's marker on the last response to a request of a decoupled model.
FINAL_RESPONSE_PARAMETER = "triton_final_response"


def stream_deadline(context: grpc.aio.ServicerContext, max_lifetime_s: float | None
                    ) -> tuple[float | None, bool]:
    """(timeout for the upstream stream, whether the lifetime limit rather than the client set it).
    None: the stream may live as long as the client keeps it."""
    client = context.time_remaining()
    if client is not None and (max_lifetime_s is None or client <= max_lifetime_s):
        return max(client, 0.0), False
    return max_lifetime_s, max_lifetime_s is not None


def is_final_response(reply: pb.ModelStreamInferResponse) -> bool:
    """Whether this response ends its request: any response of a non-decoupled model, an in-band
    error, or one Triton marks ``triton_final_response: true``."""
    if reply.error_message or not reply.HasField("infer_response"):
        return True
    marker = reply.infer_response.parameters.get(FINAL_RESPONSE_PARAMETER)
    return marker is None or marker.bool_param


class IdleWatch:
    """Counts a stream's requests still waiting for their final response and notes when the
    upstream last spoke; ``expired`` says when it has been silent too long with work outstanding."""

    def __init__(self, idle_timeout_s: float):
        self.idle_timeout_s = idle_timeout_s
        self.outstanding = 0
        self.last_activity = time.monotonic()

    def sent(self) -> None:
        if self.outstanding == 0:
            self.last_activity = time.monotonic()  # the silence starts with the first waiter
        self.outstanding += 1

    def received(self, final: bool) -> None:
        self.last_activity = time.monotonic()
        if final and self.outstanding:
            self.outstanding -= 1

    def seconds_left(self) -> float | None:
        """Seconds until expiry, <= 0 when expired, None while nothing is outstanding."""
        if not self.outstanding:
            return None
        return self.last_activity + self.idle_timeout_s - time.monotonic()

    async def expired(self) -> None:
        """Returns once the upstream has been silent for the idle timeout with requests waiting."""
        while True:
            left = self.seconds_left()
            if left is not None and left <= 0:
                return
            await asyncio.sleep(min(left if left is not None else self.idle_timeout_s,
                                    self.idle_timeout_s))

    def details(self) -> str:
        return (f"bastion: the upstream sent nothing for {self.idle_timeout_s:g}s while "
                f"{self.outstanding} request(s) of this stream waited for a response "
                "(upstream.stream_idle_timeout_s)")


def lifetime_details(max_lifetime_s: float) -> str:
    return (f"bastion: the stream reached its maximum lifetime of {max_lifetime_s:g}s "
            "(upstream.max_stream_lifetime_s)")


def _printable(value: str, limit: int = 128) -> str:
    """A client-chosen identifier, safe to put in an error message: printable ASCII, bounded."""
    return "".join(ch if 32 <= ord(ch) < 127 and ch != "'" else "?" for ch in value[:limit])


def refusal_reply(raw: bytes, details: str, request: pb.ModelInferRequest | None = None
                  ) -> pb.ModelStreamInferResponse:
    """The in-band error for a refused stream message. It carries the refused request's ``id``
    and model (as Triton's own per-request errors do), and names the id in the message too:
    tritonclient hands a stream callback only the error text. ``request``: the message as
    already parsed (else ``raw`` is parsed here)."""
    if request is None:
        try:
            request = pb.ModelInferRequest.FromString(raw)
        except DecodeError:
            return pb.ModelStreamInferResponse(error_message=details)
    request_id = _printable(request.id)
    message = f"{details} (request id '{request_id}')" if request_id else details
    return pb.ModelStreamInferResponse(
        error_message=message,
        infer_response=pb.ModelInferResponse(model_name=_printable(request.model_name),
                                             model_version=_printable(request.model_version),
                                             id=request_id))

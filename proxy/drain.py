"""The drain cut: count calls in flight and, once closed, refuse new ones with UNAVAILABLE.

grpc.aio's ``server.stop(grace)`` ends calls that arrive around the cut with CANCELLED, which
standard gRPC retry policies do not retry. So the sidecar closes this gate first: every call
that starts after the cut is answered ``UNAVAILABLE`` (retryable, on another replica) by the
sidecar itself, calls already in flight keep their grace, and the gRPC server is stopped only
once they are done and no new call has come for a moment (or the grace is over): a call that
reaches grpc while it stops is still ended CANCELLED, so the stop waits for clients that were
told UNAVAILABLE to go elsewhere.
"""
from __future__ import annotations

import asyncio
import inspect
import time

import grpc

REFUSED_DETAILS = "bastion: shutting down; retry on another replica"

# Long-lived watches that never end by themselves: not "in flight" for the drain.
UNCOUNTED_PREFIXES = ("/grpc.health.v1.Health/",)


class DrainGate(grpc.aio.ServerInterceptor):
    def __init__(self):
        self.closed = False
        self.in_flight = 0
        self.refused = 0
        self.last_call_at = 0.0
        self._idle: asyncio.Event | None = None

    def close(self) -> None:
        self.closed = True

    async def wait_idle(self, timeout_s: float, quiet_s: float = 0.0) -> bool:
        """Wait until no counted call is in flight and none has started for ``quiet_s``;
        False if ``timeout_s`` passed first."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        while True:
            now = time.monotonic()
            if self.in_flight:
                wait = 0.05                     # or sooner: the last call out sets _idle
            else:
                wait = self.last_call_at + quiet_s - now
                if wait <= 0:
                    return True
            if now >= deadline:
                return False
            self._idle = asyncio.Event()
            try:
                await asyncio.wait_for(self._idle.wait(), min(wait, deadline - now))
            except asyncio.TimeoutError:
                pass

    def _enter(self) -> None:
        self.in_flight += 1

    def _leave(self) -> None:
        self.in_flight -= 1
        if not self.in_flight and self._idle is not None:
            self._idle.set()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        self.last_call_at = time.monotonic()
        if self.closed:
            self.refused += 1
            return _refusing(handler)
        if handler_call_details.method.startswith(UNCOUNTED_PREFIXES):
            return handler
        return _counted(handler, self)


def _rebuilt(handler: grpc.RpcMethodHandler, behavior) -> grpc.RpcMethodHandler:
    """``handler`` with another behavior, same cardinality and (de)serializers."""
    make = {(False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler}[
        (handler.request_streaming, handler.response_streaming)]
    return make(behavior, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


def _behavior(handler: grpc.RpcMethodHandler):
    if handler.request_streaming:
        return handler.stream_stream if handler.response_streaming else handler.stream_unary
    return handler.unary_stream if handler.response_streaming else handler.unary_unary


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    async def refuse(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAVAILABLE, REFUSED_DETAILS)
    return _rebuilt(handler, refuse)


def _counted(handler: grpc.RpcMethodHandler, gate: DrainGate) -> grpc.RpcMethodHandler:
    behavior = _behavior(handler)
    if not (inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)):
        return handler   # a synchronous behavior runs in grpc's thread pool: not counted
    if inspect.isasyncgenfunction(behavior):
        async def counted_stream(request_or_iterator, context):
            gate._enter()
            inner = behavior(request_or_iterator, context)
            try:
                async for reply in inner:
                    yield reply
            finally:
                # Close the handler's own generator now (its finally blocks end the upstream
                # call), as grpc would have without this wrapper, not whenever it is collected.
                try:
                    await inner.aclose()
                finally:
                    gate._leave()
        return _rebuilt(handler, counted_stream)

    async def counted(request_or_iterator, context):
        gate._enter()
        try:
            return await behavior(request_or_iterator, context)
        finally:
            gate._leave()
    return _rebuilt(handler, counted)

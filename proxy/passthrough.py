"""Opaque forwarding of every RPC Bastion does not inspect.

Request and response bytes, metadata, status code and details travel unchanged. Methods known to
be unary (the v2 service and Triton's extensions) use unary calls; any other method is forwarded
as a bidirectional stream, which carries unary, client-, server- and bidi-streaming calls alike
on the wire, so a method Bastion has never heard of still works.
"""
from __future__ import annotations

import asyncio
import time

import grpc

from bastion.protos import SERVICE
from bastion.proxy import forwarding, telemetry
from bastion.proxy.upstream import Upstream

# Unary RPCs of KServe v2 and Triton's GRPCInferenceService (ModelInfer and ModelStreamInfer are
# inspected elsewhere).
KNOWN_UNARY = frozenset(f"/{SERVICE}/{name}" for name in (
    "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelConfig",
    "ModelStatistics", "RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload",
    "SystemSharedMemoryStatus", "SystemSharedMemoryRegister", "SystemSharedMemoryUnregister",
    "CudaSharedMemoryStatus", "CudaSharedMemoryRegister", "CudaSharedMemoryUnregister",
    "TraceSetting", "LogSettings",
))


_END = object()
# How long an unknown method's stream is read ahead to tell a unary call (one message, then
# half-close: both arrive together) from a streaming one.
UNARY_GRACE_S = 0.02


class Passthrough:
    def __init__(self, upstream: Upstream, default_timeout_s: float, metrics=None):
        self.upstream = upstream
        self.default_timeout_s = default_timeout_s
        self.metrics = metrics

    def handler_for(self, method: str) -> grpc.RpcMethodHandler:
        if method in KNOWN_UNARY:
            async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
                with telemetry.server_span(method, context) as span:
                    try:
                        reply = await self.forward_unary(method, request, context)
                    except grpc.aio.AbortError:
                        telemetry.record_status(span, context.code() or grpc.StatusCode.UNKNOWN)
                        raise
                    telemetry.record_status(span, grpc.StatusCode.OK)
                    return reply
            return grpc.unary_unary_rpc_method_handler(unary)

        async def stream(request_iterator, context: grpc.aio.ServicerContext):
            async for reply in self.forward_stream(method, request_iterator, context):
                yield reply
        return grpc.stream_stream_rpc_method_handler(stream)

    async def forward_unary(self, method: str, request: bytes,
                            context: grpc.aio.ServicerContext,
                            request_id: str | None = None) -> bytes:
        request_id = request_id or forwarding.new_request_id()
        try:
            call, reply = await self._traced_unary(method, request, context, request_id)
        except grpc.aio.AioRpcError as error:
            await forwarding.pass_error(context, error, self.upstream)
        initial = forwarding.response_metadata(await call.initial_metadata())
        if initial:
            await context.send_initial_metadata(initial)
        await forwarding.relay_trailers(call, context)
        return reply

    async def call_unary(self, method: str, request: bytes, context: grpc.aio.ServicerContext,
                         request_id: str) -> bytes:
        """An upstream call the sidecar makes on its own behalf (a response stage's extra
        samples, the client's request again after a stage failed): counted in
        bastion_upstream_requests_total and traced like a forwarded call; an error raises
        AioRpcError to the caller instead of ending the client's call."""
        return (await self._traced_unary(method, request, context, request_id))[1]

    async def _traced_unary(self, method: str, request: bytes,
                            context: grpc.aio.ServicerContext, request_id: str):
        """(call, reply) of one unary upstream call, in an upstream span and counted in the
        upstream metrics with its outcome; an error is recorded, then raised."""
        with telemetry.upstream_span(method, self.upstream.target) as span:
            call = self.upstream.unary(method)(
                request, metadata=telemetry.inject_headers(
                    forwarding.upstream_metadata(context, request_id)),
                timeout=forwarding.deadline(context, self.default_timeout_s))
            started = time.perf_counter()
            try:
                reply = await call
            except grpc.aio.AioRpcError as error:
                if self.metrics is not None:
                    self.metrics.observe_upstream(method, error.code().name,
                                                  time.perf_counter() - started)
                telemetry.record_status(span, error.code())
                raise
            if self.metrics is not None:
                self.metrics.observe_upstream(method, "OK", time.perf_counter() - started)
            telemetry.record_status(span, grpc.StatusCode.OK)
        return call, reply

    async def forward_stream(self, method: str, request_iterator,
                             context: grpc.aio.ServicerContext):
        """Forward a method whose cardinality is unknown. The client's stream is read a little
        ahead: one message then half-close (a unary or server-streaming call) goes upstream as a
        unary-stream call, which keeps the upstream's status exact (a bidi call the upstream
        ends early, e.g. UNIMPLEMENTED, can lose its status to gRPC's failed write). Anything
        else streams both ways."""
        inbox: asyncio.Queue = asyncio.Queue()

        async def read() -> None:
            try:
                async for message in request_iterator:
                    await inbox.put(message)
            finally:
                await inbox.put(_END)

        reader = asyncio.get_running_loop().create_task(read())
        try:
            buffered = []
            first = await inbox.get()
            if first is not _END:
                try:
                    second = await asyncio.wait_for(inbox.get(), UNARY_GRACE_S)
                except asyncio.TimeoutError:
                    second = None  # the client keeps its stream open: a streaming call
                if second is _END:
                    async for reply in self._forward_one_request(method, first, context):
                        yield reply
                    return
                buffered = [first] + ([second] if second is not None else [])
            else:
                inbox.put_nowait(_END)
            async for reply in self._forward_streaming(method, buffered, inbox, context):
                yield reply
        finally:
            reader.cancel()

    def _open(self, method: str, context, span, message: bytes | None = None):
        """The upstream call for a forwarded stream: unary-stream when the one request message
        is known, else bidi (the caller writes)."""
        metadata = telemetry.inject_headers(
            forwarding.upstream_metadata(context, forwarding.new_request_id()), span)
        timeout = forwarding.deadline(context, self.default_timeout_s)
        if message is not None:
            return self.upstream.channel.unary_stream(method)(message, metadata=metadata,
                                                             timeout=timeout)
        return self.upstream.stream(method)(metadata=metadata, timeout=timeout)

    async def _relay(self, call, span, context, writer: asyncio.Task | None = None):
        """Relay the upstream's metadata, replies, status and trailers to the client."""
        try:
            initial = forwarding.response_metadata(await call.initial_metadata())
            if initial:
                await context.send_initial_metadata(initial)
            async for reply in call:
                yield reply
        except grpc.aio.AioRpcError as error:
            telemetry.record_status(span, error.code())
            await forwarding.pass_error(context, error, self.upstream)
        finally:
            # Cancelling our task does not end a call awaited only for metadata: end it
            # explicitly so a client's cancel always reaches the upstream.
            if writer is not None:
                writer.cancel()
            if not call.done():
                call.cancel()
            if span is not None:
                span.end()
        await forwarding.relay_trailers(call, context)

    async def _forward_one_request(self, method: str, message: bytes,
                                   context: grpc.aio.ServicerContext):
        """One request message: a unary or a server-streaming method. A unary-stream call sends
        the message with the call's first batch (no later write to race the upstream's status)
        and takes any number of replies."""
        span = telemetry.start_stream_span(method, context)
        async for reply in self._relay(self._open(method, context, span, message), span, context):
            yield reply

    async def _forward_streaming(self, method: str, buffered: list, inbox: asyncio.Queue,
                                 context: grpc.aio.ServicerContext):
        span = telemetry.start_stream_span(method, context)
        call = self._open(method, context, span)

        async def pump() -> None:
            try:
                for message in buffered:
                    await call.write(message)
                while (message := await inbox.get()) is not _END:
                    await call.write(message)
                await call.done_writing()
            except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
                pass  # the upstream ended the call; its status is what the client gets

        writer = asyncio.get_running_loop().create_task(pump())
        async for reply in self._relay(call, span, context, writer):
            yield reply


class PassthroughHandler(grpc.GenericRpcHandler):
    """Catch-all handler: registered last, it answers every method no other handler claimed."""

    def __init__(self, passthrough: Passthrough):
        self.passthrough = passthrough
        self._cache: dict[str, grpc.RpcMethodHandler] = {}

    def service(self, handler_call_details):
        method = handler_call_details.method
        handler = self._cache.get(method)
        if handler is None:
            handler = self.passthrough.handler_for(method)
            if len(self._cache) < 1024:  # bounded: method names come from clients
                self._cache[method] = handler
        return handler

"""The channel to the model server, raw-bytes callables per method, and readiness polling."""
from __future__ import annotations

import asyncio
import logging

import grpc

from bastion.config import UpstreamConfig
from bastion.protos import SERVICE, pb
from bastion.proxy import tls

log = logging.getLogger("bastion.upstream")

# Details gRPC core writes when the transport (not the model server) failed; only these get
# rewritten to name the upstream, so a model server's own UNAVAILABLE passes through unchanged.
_TRANSPORT_FAILURES = ("failed to connect", "connection refused", "socket closed",
                       "connection reset", "connections to all backends failing",
                       "dns resolution failed", "broken pipe", "endpoint closing",
                       "goaway received", "keepalive watchdog timeout")


def is_transport_failure(error: grpc.aio.AioRpcError) -> bool:
    if error.code() != grpc.StatusCode.UNAVAILABLE:
        return False
    details = (error.details() or "").lower()
    return any(marker in details for marker in _TRANSPORT_FAILURES)


class Upstream:
    """One long-lived channel to the model server; callables are cached per method path."""

    def __init__(self, config: UpstreamConfig, tls_config=None):
        self.config = config
        self.target = config.target
        # Plaintext unless tls.upstream is configured (bastion.proxy.tls).
        self.channel = tls.upstream_channel(config.target, options=[
            ("grpc.max_receive_message_length", config.max_receive_message_bytes),
            ("grpc.max_send_message_length", config.max_send_message_bytes),
            # Reconnect quickly after the model server restarts (default backoff reaches 120 s).
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 2000),
            ("grpc.enable_retries", 0),
        ], tls=tls_config)
        self._unary: dict[str, grpc.aio.UnaryUnaryMultiCallable] = {}
        self._stream: dict[str, grpc.aio.StreamStreamMultiCallable] = {}
        self.ready = False
        self._poller: asyncio.Task | None = None

    def unary(self, method: str) -> grpc.aio.UnaryUnaryMultiCallable:
        call = self._unary.get(method)
        if call is None:
            call = self._unary[method] = self.channel.unary_unary(method)
        return call

    def stream(self, method: str) -> grpc.aio.StreamStreamMultiCallable:
        call = self._stream.get(method)
        if call is None:
            call = self._stream[method] = self.channel.stream_stream(method)
        return call

    def start(self, on_change=None) -> None:
        self._poller = asyncio.get_running_loop().create_task(self._poll(on_change))

    async def _poll(self, on_change) -> None:
        ready_call = self.channel.unary_unary(
            f"/{SERVICE}/ServerReady",
            request_serializer=pb.ServerReadyRequest.SerializeToString,
            response_deserializer=pb.ServerReadyResponse.FromString)
        while True:
            try:
                reply = await ready_call(pb.ServerReadyRequest(),
                                         timeout=max(self.config.health_interval_s, 0.5))
                ready = bool(reply.ready)
            except grpc.aio.AioRpcError:
                ready = False
            except asyncio.CancelledError:
                raise
            except Exception:  # never let the poller die: readiness must keep being reported
                log.exception("upstream readiness poll failed")
                ready = False
            if ready != self.ready:
                self.ready = ready
                log.info("upstream %s is %s", self.target, "ready" if ready else "NOT ready")
                if on_change is not None:
                    await on_change(ready)
            await asyncio.sleep(self.config.health_interval_s)

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            try:
                await self._poller
            except (asyncio.CancelledError, Exception):
                pass
        await self.channel.close()

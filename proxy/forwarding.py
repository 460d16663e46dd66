"""Forwarding rules shared by every proxied call: metadata, deadlines and status pass-through."""
from __future__ import annotations

import os

import grpc

from bastion.proxy.upstream import Upstream, is_transport_failure

REQUEST_ID_KEY = "bastion-request-id"

# Connection-scoped headers (RFC 9110 section 7.6.1 plus HTTP/2 and gRPC transport headers)
# describe one hop and must not be copied to the next; gRPC sets its own on the upstream call.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization",
    "te", "trailer", "transfer-encoding", "upgrade", "host", "content-type", "content-length",
    "user-agent", "grpc-timeout", "grpc-encoding", "grpc-accept-encoding",
    "grpc-internal-encoding-request", REQUEST_ID_KEY,
})


def new_request_id() -> str:
    # 128 random bits, unpredictable to clients (per-request noise seeds derive from it).
    return os.urandom(16).hex()


def upstream_metadata(context: grpc.aio.ServicerContext,
                      request_id: str) -> tuple[tuple[str, str | bytes], ...]:
    """The client's metadata minus hop-by-hop headers, plus Bastion's request id."""
    kept = tuple((key, value) for key, value in context.invocation_metadata()
                 if key not in HOP_BY_HOP and not key.startswith(":"))
    return kept + ((REQUEST_ID_KEY, request_id),)


def response_metadata(metadata) -> tuple[tuple[str, str | bytes], ...]:
    """Upstream response metadata that may be re-sent (gRPC owns its reserved keys)."""
    if not metadata:
        return ()
    return tuple((key, value) for key, value in metadata
                 if not key.startswith("grpc-") or key == "grpc-status-details-bin")


def deadline(context: grpc.aio.ServicerContext, default_s: float) -> float:
    """Time left on the client's deadline, or the configured default when it set none."""
    remaining = context.time_remaining()
    if remaining is None:
        return default_s
    return max(remaining, 0.0)


async def pass_error(context: grpc.aio.ServicerContext, error: grpc.aio.AioRpcError,
                     upstream: Upstream) -> None:
    """End the client's call with an upstream failure, unchanged, except transport failures, which are
    rewritten to name the upstream (the client cannot see which hop failed)."""
    code, details = error.code(), error.details() or ""
    if is_transport_failure(error):
        details = f"bastion: upstream {upstream.target} unavailable: {details}"
    await context.abort(code, details, response_metadata(error.trailing_metadata()))


async def relay_trailers(call, context: grpc.aio.ServicerContext) -> None:
    """The upstream call's trailing metadata, minus hop-by-hop keys, onto the client's call."""
    trailing = response_metadata(await call.trailing_metadata())
    if trailing:
        context.set_trailing_metadata(trailing)

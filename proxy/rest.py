"""The KServe v2 REST front (Triton's HTTP/REST port): the same defense for HTTP/JSON clients.

Routes (the Open Inference Protocol's REST binding):

* ``GET /v2/health/live`` and ``/v2/health/ready`` (ready: the upstream answers and the sidecar
  is not draining), ``GET /v2`` (server metadata), ``GET /v2/models/{m}[/versions/{v}]`` (model
  metadata) and ``.../ready``: asked of the upstream over gRPC;
* ``POST /v2/models/{m}[/versions/{v}]/infer``: the body (JSON tensors, or Triton's binary
  tensor data extension) becomes the ``ModelInferRequest`` a gRPC client would have sent and goes
  through the very same inference path (decode -> chain -> policy -> forward over gRPC -> response
  stages -> output guard); the answer comes back as v2 JSON (binary outputs when asked);
* anything else is proxied to ``upstream.http_target`` when set, else answered 404.

The verdict contract on REST: a block is 403, a throttle 429 with ``Retry-After``, a malformed
tensor 400, the upstream down 503, each with the v2 error body ``{"error": "bastion: ..."}``
(the gRPC status's details: they name the problem, never the input). Headers map to client
identity as gRPC metadata does (``x-api-key``, ``x-forwarded-for``...). The body is refused
(413) past ``limits.max_receive_message_bytes`` before it is buffered, and a client that does not
send it within ``limits.http_body_timeout_s`` gets 408.

The stack is aiohttp on uvloop (docs/benchmarks.md, "REST front: the HTTP stack"): one library
for the server, the body streaming the caps need, TLS, and the client the proxied routes need.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import ssl
import time
from collections.abc import Callable

import grpc
from aiohttp import ClientSession, ClientTimeout, web

from bastion.protos import SERVICE, codec, pb
from bastion.proxy import rest_codec
from bastion.proxy.inference import MODEL_INFER, InferenceHandler
from bastion.proxy.metrics import Metrics
from bastion.proxy.passthrough import Passthrough

log = logging.getLogger("bastion.rest")

HEADER_LENGTH = "Inference-Header-Content-Length"
#: gRPC status -> HTTP status of the REST answer (the v2 REST binding and Triton's mapping).
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
#: Request headers that describe the HTTP hop, not the client: never passed on as metadata.
HOP_HEADERS = frozenset({
    "host", "connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade",
    "te", "trailer", "content-length", "content-type", "content-encoding", "accept",
    "accept-encoding", "user-agent", "expect", "inference-header-content-length",
    "proxy-authorization", "proxy-authenticate"})
SHUTTING_DOWN = "bastion: shutting down; retry on another replica"


def metadata_of(headers) -> tuple[tuple[str, str], ...]:
    """HTTP request headers as gRPC metadata (lower-case keys): what identity, tracing and the
    upstream see. Headers gRPC cannot carry (binary, non-ASCII, hop-by-hop) are left out."""
    out = []
    for key, value in headers.items():
        key = key.lower()
        if (key in HOP_HEADERS or key.endswith("-bin") or key.startswith(("grpc-", ":"))
                or not key.isascii() or not value.isascii() or not value.isprintable()):
            continue
        out.append((key, value))
    return tuple(out)


class RestContext:
    """The part of ``grpc.aio.ServicerContext`` the inference path uses, for one REST request:
    headers as metadata, the peer, the TLS client certificate, a deadline, and ``abort``, which
    records the status and raises ``grpc.aio.AbortError`` as gRPC's does."""

    protocol = "http"

    def __init__(self, request: web.Request, timeout_s: float | None):
        self._metadata = metadata_of(request.headers)
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self._peer = _grpc_peer(peer)
        self._auth = _auth_context(request.transport)
        self._deadline = time.monotonic() + timeout_s if timeout_s else None
        self._code: grpc.StatusCode | None = None
        self._details: str | None = None
        self.trailers: tuple = ()
        self.initial: tuple = ()

    def invocation_metadata(self):
        return self._metadata

    def peer(self) -> str:
        return self._peer

    def auth_context(self) -> dict:
        return self._auth

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    async def send_initial_metadata(self, metadata) -> None:
        self.initial += tuple(metadata)

    def set_trailing_metadata(self, metadata) -> None:
        self.trailers = tuple(metadata)

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata=()):
        self._code, self._details = code, details
        if trailing_metadata:
            self.trailers = tuple(trailing_metadata)
        raise grpc.aio.AbortError(details)

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str | None:
        return self._details


def _grpc_peer(peer) -> str:
    """A socket address in gRPC's peer() form (``ipv4:1.2.3.4:5`` / ``ipv6:[::1]:5``)."""
    if not peer:
        return "unknown"
    host, port = peer[0], peer[1]
    return f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"


def _auth_context(transport) -> dict:
    """A verified TLS client certificate's subject, as gRPC's auth context names it."""
    cert = transport.get_extra_info("peercert") if transport is not None else None
    if not cert:
        return {}
    subject = ",".join(f"{k}={v}" for rdn in cert.get("subject", ()) for k, v in rdn)
    common = [v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"]
    auth = {"x509_subject": [subject.encode()]} if subject else {}
    if common:
        auth["x509_common_name"] = [common[0].encode()]
    return auth


def error_response(status: int, message: str, headers: dict | None = None) -> web.Response:
    return web.Response(status=status, text=json.dumps({"error": message}),
                        content_type="application/json", headers=headers)


def grpc_error_response(context: RestContext) -> web.Response:
    """The REST answer of a call the inference path ended with a gRPC status."""
    code = context.code() or grpc.StatusCode.UNKNOWN
    headers = {}
    for key, value in context.trailers:
        if isinstance(value, str) and key.startswith("bastion-"):
            headers[key] = value
        elif key == "retry-after-ms" and str(value).isdigit():
            headers["Retry-After"] = str(max(1, math.ceil(int(value) / 1000)))
    details = context.details() or code.name
    return error_response(HTTP_STATUS.get(code, 500), details, headers)


class RestFront:
    """The REST listener. ``start`` binds, ``close`` refuses new requests (503) while those in
    flight finish, ``stop`` ends it. ``current_config`` gives the live config: what a reload may
    change (the models and their chains) applies to the next request; the address, TLS, limits
    and upstream settings are restart-only, as for the gRPC listener (proxy/reload.py)."""

    def __init__(self, current_config: Callable, inference: InferenceHandler,
                 passthrough: Passthrough, metrics: Metrics, ready: Callable[[], bool]):
        self._current_config = current_config
        self.inference = inference
        self.passthrough = passthrough
        self.metrics = metrics
        self.ready = ready
        self.closed = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._runner: web.AppRunner | None = None
        self._client: ClientSession | None = None
        self.port = 0
        self._max_body = 0

    @property
    def config(self):
        return self._current_config()

    # ---- lifecycle -------------------------------------------------------------------------
    def _app(self) -> web.Application:
        self._max_body = self.config.limits.max_receive_message_bytes  # restart-only
        app = web.Application(client_max_size=self._max_body,
                              middlewares=[self._gate])
        model = "/v2/models/{model}"
        version = model + "/versions/{version}"
        app.router.add_get("/v2/health/live", self.live)
        app.router.add_get("/v2/health/ready", self.server_ready)
        app.router.add_get("/v2", self.server_metadata)
        for base in (model, version):
            app.router.add_get(base, self.model_metadata)
            app.router.add_get(base + "/ready", self.model_ready)
            app.router.add_post(base + "/infer", self.infer)
        app.router.add_route("*", "/{tail:.*}", self.proxied)
        return app

    async def start(self, address: str) -> int:
        host, _, port = address.rpartition(":")
        limit = self.config.limits.http_max_header_bytes
        # Keyword arguments of aiohttp's request handler: no access log (the audit log and the
        # metrics record requests), and the header limits (a longer line is answered 400).
        self._runner = web.AppRunner(self._app(), access_log=None, handle_signals=False,
                                     max_line_size=limit, max_field_size=limit)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host.strip("[]"), int(port),
                           ssl_context=_server_ssl(self.config.tls.server), reuse_port=False)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # port 0: the one bound
        return self.port

    def close(self) -> None:
        """The drain cut: new requests get 503 (retryable elsewhere); in-flight ones go on."""
        self.closed = True

    async def wait_idle(self, timeout_s: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return True
        except asyncio.TimeoutError:
            return False

    async def stop(self) -> None:
        if self._client is not None:
            await self._client.close()
        if self._runner is not None:
            await self._runner.cleanup()

    @web.middleware
    async def _gate(self, request: web.Request, handler):
        if self.closed:
            return error_response(503, SHUTTING_DOWN, {"Connection": "close"})
        self.in_flight += 1
        self._idle.clear()
        try:
            return await handler(request)
        except web.HTTPRequestEntityTooLarge:
            return error_response(413, "bastion: request body is larger than "
                                  f"{self._max_body} bytes")
        except web.HTTPException:
            raise
        except Exception:  # noqa: BLE001 - a bug answers 500 in the v2 error shape, logged
            log.exception("REST %s %s failed", request.method, request.path)
            return error_response(500, "bastion: internal error (logged by the sidecar)")
        finally:
            self.in_flight -= 1
            if not self.in_flight:
                self._idle.set()

    # ---- routes ----------------------------------------------------------------------------
    async def live(self, request: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def server_ready(self, request: web.Request) -> web.Response:
        ready = self.ready()
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    async def _unary(self, request: web.Request, method: str, message, reply_type, model=""):
        """(reply, None) of a unary call to the upstream, or (None, the error response)."""
        started = time.perf_counter()
        context = RestContext(request, self.config.upstream.timeout_s)
        try:
            raw = await self.passthrough.forward_unary(f"/{SERVICE}/{method}",
                                                       message.SerializeToString(), context)
        except grpc.aio.AbortError:
            self._count(method, model, context.code(), started)
            return None, grpc_error_response(context)
        self._count(method, model, grpc.StatusCode.OK, started)
        return reply_type.FromString(raw), None

    def _count(self, method: str, model: str, code, started: float) -> None:
        self.metrics.observe_request(method, model, (code or grpc.StatusCode.UNKNOWN).name,
                                     time.perf_counter() - started, "http")

    async def server_metadata(self, request: web.Request) -> web.Response:
        reply, error = await self._unary(request, "ServerMetadata", pb.ServerMetadataRequest(),
                                         pb.ServerMetadataResponse)
        return error or web.json_response(rest_codec.server_metadata_json(reply))

    async def _model_call(self, request: web.Request, method: str):
        """(reply, error response) of ModelMetadata or ModelReady for the route's model."""
        name, version = request.match_info["model"], request.match_info.get("version", "")
        request_type, reply_type = ((pb.ModelMetadataRequest, pb.ModelMetadataResponse)
                                    if method == "ModelMetadata"
                                    else (pb.ModelReadyRequest, pb.ModelReadyResponse))
        return await self._unary(request, method, request_type(name=name, version=version),
                                 reply_type, name)

    async def model_metadata(self, request: web.Request) -> web.Response:
        reply, error = await self._model_call(request, "ModelMetadata")
        return error or web.json_response(rest_codec.model_metadata_json(reply))

    async def model_ready(self, request: web.Request) -> web.Response:
        reply, error = await self._model_call(request, "ModelReady")
        if error is not None:
            return error
        return web.json_response({"ready": reply.ready}, status=200 if reply.ready else 400)

    async def _body(self, request: web.Request) -> bytes:
        """The whole body within the size cap and the slow-client timeout (aiohttp checks
        ``client_max_size`` while reading, before it holds more than that)."""
        return await asyncio.wait_for(request.read(), self.config.limits.http_body_timeout_s)

    async def infer(self, request: web.Request) -> web.Response:
        model = request.match_info["model"]
        version = request.match_info.get("version", "")
        try:
            body = await self._body(request)
        except asyncio.TimeoutError:
            return error_response(408, "bastion: the request body did not arrive within "
                                  f"{self.config.limits.http_body_timeout_s:g} s")
        header = request.headers.get(HEADER_LENGTH)
        try:
            if header is not None and not header.strip().isdigit():
                raise rest_codec.RestError(f"{HEADER_LENGTH} must be a non-negative integer")
            message, all_binary, names = rest_codec.parse_infer_request(
                model, version, body, int(header) if header is not None else None)
        except (rest_codec.RestError, codec.TensorError) as err:
            self.metrics.observe_request("ModelInfer", model, "INVALID_ARGUMENT", 0.0, "http")
            return error_response(400, f"bastion: {err}")
        context = RestContext(request, None)
        try:
            raw = await self.inference.model_infer(message.SerializeToString(), context)
        except grpc.aio.AbortError:
            return grpc_error_response(context)
        response = pb.ModelInferResponse.FromString(raw)
        out, header_length = rest_codec.encode_infer_response(response, all_binary, names)
        headers = {key: value for key, value in context.trailers + context.initial
                   if isinstance(value, str) and key.startswith("bastion-")}
        if header_length is None:
            return web.Response(body=out, content_type="application/json", headers=headers)
        headers[HEADER_LENGTH] = str(header_length)
        return web.Response(body=out, content_type="application/octet-stream", headers=headers)

    async def proxied(self, request: web.Request) -> web.StreamResponse:
        """Routes the front does not inspect, passed to the model server's own REST port."""
        target = self.config.upstream.http_target
        if target is None:
            return error_response(404, f"bastion: no route {request.method} {request.path} "
                                  "(upstream.http_target is not set)")
        started = time.perf_counter()
        if self._client is None:
            self._client = ClientSession(timeout=ClientTimeout(
                total=self.config.upstream.timeout_s), auto_decompress=False)
        try:
            body = await self._body(request)
        except asyncio.TimeoutError:
            return error_response(408, "bastion: the request body did not arrive in time")
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() not in ("host", "connection", "keep-alive", "transfer-encoding",
                                        "content-length")}
        try:
            async with self._client.request(request.method, target + request.rel_url.path_qs,
                                            data=body, headers=headers,
                                            allow_redirects=False) as reply:
                content = await reply.read()
                kept = {k: v for k, v in reply.headers.items()
                        if k.lower() not in ("connection", "keep-alive", "transfer-encoding",
                                             "content-length", "content-encoding")}
                if "Content-Encoding" in reply.headers:
                    kept["Content-Encoding"] = reply.headers["Content-Encoding"]
                status = reply.status
        except (OSError, asyncio.TimeoutError) as err:
            self.metrics.observe_request("proxied", "", "UNAVAILABLE",
                                         time.perf_counter() - started, "http")
            return error_response(503, f"bastion: upstream REST port unavailable "
                                  f"({type(err).__name__})")
        self.metrics.observe_request("proxied", "", str(status), time.perf_counter() - started,
                                     "http")
        return web.Response(status=status, body=content, headers=kept)


def _server_ssl(tls) -> ssl.SSLContext | None:
    """The REST listener's TLS (and mTLS) from the same ``tls.server`` files as gRPC's."""
    if not getattr(tls, "cert_file", None):
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tls.cert_file, tls.key_file)
    if getattr(tls, "client_ca_file", None):
        context.load_verify_locations(tls.client_ca_file)
        context.verify_mode = (ssl.CERT_REQUIRED if tls.require_client_cert
                               else ssl.CERT_OPTIONAL)
    return context


__all__ = ["HTTP_STATUS", "MODEL_INFER", "RestContext", "RestFront", "metadata_of"]

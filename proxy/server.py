"""The sidecar process: gRPC front (inference service, health, pass-through) and admin HTTP."""
from __future__ import annotations

import asyncio
import logging
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from bastion.config import Config
from bastion.protos import SERVICE
from bastion.proxy.admin import AdminServer
from bastion.proxy.inference import MODEL_INFER, MODEL_STREAM_INFER, InferenceHandler
from bastion.proxy.metrics import Metrics
from bastion.proxy.passthrough import Passthrough, PassthroughHandler
from bastion.proxy.state import SidecarState
from bastion.proxy.upstream import Upstream

log = logging.getLogger("bastion.server")


class _InferenceMethods(grpc.GenericRpcHandler):
    def __init__(self, handler: InferenceHandler):
        self._handlers = {
            MODEL_INFER: grpc.unary_unary_rpc_method_handler(handler.model_infer),
            MODEL_STREAM_INFER: grpc.stream_stream_rpc_method_handler(handler.model_stream_infer),
        }

    def service(self, handler_call_details):
        return self._handlers.get(handler_call_details.method)


class Sidecar:
    """Owns the servers and the upstream channel; ``start`` binds, ``stop`` drains."""

    def __init__(self, config: Config, metrics: Metrics | None = None):
        self.config = config
        self.metrics = metrics or Metrics()
        self.state = SidecarState(config, self.metrics)
        self.upstream = Upstream(config.upstream)
        self.passthrough = Passthrough(self.upstream, config.upstream.timeout_s)
        self.inference = InferenceHandler(self.state, self.passthrough, self.metrics)
        self.health = health.aio.HealthServicer()
        self.admin = AdminServer(self.metrics.registry, lambda: self.upstream.ready)
        self.server: grpc.aio.Server | None = None
        self.grpc_port = 0
        self.admin_port = 0

    async def start(self) -> None:
        limits = self.config.limits
        options = [("grpc.max_receive_message_length", limits.max_receive_message_bytes),
                   ("grpc.max_send_message_length", limits.max_send_message_bytes),
                   ("grpc.so_reuseport", 0)]
        if limits.max_concurrent_streams:
            options.append(("grpc.max_concurrent_streams", limits.max_concurrent_streams))
        self.server = grpc.aio.server(options=options)
        # Order matters: the first handler that claims a method serves it.
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.server.add_generic_rpc_handlers((_InferenceMethods(self.inference),
                                              PassthroughHandler(self.passthrough)))
        self.grpc_port = self.server.add_insecure_port(self.config.listen)
        if not self.grpc_port:
            raise OSError(f"cannot listen on {self.config.listen}")
        await self._set_health(False)
        await self.server.start()
        self.admin_port = await self.admin.start(self.config.admin)
        self.upstream.start(self._set_health)
        log.info("listening grpc=%s admin=%s upstream=%s", self.grpc_port, self.admin_port,
                 self.upstream.target)

    async def _set_health(self, ready: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if ready
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        self.metrics.upstream_ready.set(1 if ready else 0)
        for service in ("", SERVICE):
            await self.health.set(service, status)

    async def stop(self, grace_s: float = 5.0) -> None:
        if self.server is not None:
            await self.server.stop(grace_s)
        await self.admin.stop()
        await self.upstream.close()


async def serve(config: Config, ready_message: bool = True) -> None:
    """Run until SIGTERM/SIGINT, then drain in-flight calls and exit."""
    sidecar = Sidecar(config)
    await sidecar.start()
    if ready_message:
        # One machine-readable line, so tools (and tests) using port 0 learn the real ports.
        print(f"bastion: serving grpc={sidecar.grpc_port} admin={sidecar.admin_port} "
              f"upstream={config.upstream.target}", flush=True)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    log.info("shutting down")
    await sidecar.stop()

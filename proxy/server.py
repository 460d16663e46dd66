"""The sidecar process: gRPC front (inference service, health, pass-through) and admin HTTP."""
from __future__ import annotations

import asyncio
import functools
import logging
import os
import pathlib
import signal
import threading
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from bastion.config import Config
from bastion.proxy.process import stop_event
from bastion.protos import SERVICE, pb
from bastion.proxy import telemetry, tls
from bastion.proxy.admin import AdminServer
from bastion.proxy.audit import AuditLog
from bastion.proxy.clients import ClientControl
from bastion.proxy.drain import DrainGate
from bastion.proxy.inference import MODEL_INFER, InferenceHandler
from bastion.proxy.metrics import Metrics
from bastion.proxy.passthrough import Passthrough, PassthroughHandler
from bastion.proxy.reload import ConfigReloader
from bastion.proxy.rest import RestFront
from bastion.proxy.state import SidecarState
from bastion.proxy.stream_infer import MODEL_STREAM_INFER, model_stream_infer
from bastion.proxy.upstream import Upstream
from bastion.transforms.validate import specs_from_metadata

log = logging.getLogger("bastion.server")

# After the grace: closing the admin server, the upstream channel, Redis and the audit file, then
# flushing spans. Each part is cut off at its share, so a hung Redis or an unreachable collector
# cannot hold the process; with the watchdog's margin the exit comes within drain + grace + 2 s.
CLEANUP_S = 0.6
TRACING_FLUSH_S = 0.6
EXIT_MARGIN_S = 1.9
# After the cut, the server stops once no call has arrived for this long (within the grace):
# clients told UNAVAILABLE have gone elsewhere, so none is caught by grpc's own stop.
QUIET_S = 0.5


class _InferenceMethods(grpc.GenericRpcHandler):
    def __init__(self, handler: InferenceHandler):
        self._handlers = {
            MODEL_INFER: grpc.unary_unary_rpc_method_handler(handler.model_infer),
            MODEL_STREAM_INFER: grpc.stream_stream_rpc_method_handler(
                functools.partial(model_stream_infer, handler)),
        }

    def service(self, handler_call_details):
        return self._handlers.get(handler_call_details.method)


class Sidecar:
    """Owns the servers and the upstream channel; ``start`` binds, ``stop`` drains."""

    def __init__(self, config: Config, metrics: Metrics | None = None):
        self.config = config
        self.metrics = metrics or Metrics()
        self.state = SidecarState(config, self.metrics)
        self.upstream = Upstream(config.upstream, config.tls.upstream)
        self.passthrough = Passthrough(self.upstream, config.upstream.timeout_s, self.metrics)
        self.audit = AuditLog(config.audit)
        self.clients = ClientControl(config.clients, self.metrics, self.audit)
        self.inference = InferenceHandler(self.state, self.passthrough, self.metrics, self.audit,
                                          self.clients)
        self.health = health.aio.HealthServicer()
        self.gate = DrainGate()
        self.draining = False
        self.admin = AdminServer(self.metrics.registry,
                                 lambda: self.upstream.ready and not self.draining,
                                 self.state.version_report)
        # Every audit record names the defense version in force when it was written.
        self.audit.config_version = lambda: self.state.current.version.digest
        self.server: grpc.aio.Server | None = None
        self.grpc_port = 0
        self.admin_port = 0
        # The v2 REST front, on the same inference path (None: gRPC only).
        self.rest = (RestFront(lambda: self.state.current.config, self.inference,
                               self.passthrough, self.metrics,
                               lambda: self.upstream.ready and not self.draining)
                     if config.http_listen else None)
        self.http_port = 0

    async def start(self) -> None:
        limits = self.config.limits
        options = [("grpc.max_receive_message_length", limits.max_receive_message_bytes),
                   ("grpc.max_send_message_length", limits.max_send_message_bytes),
                   ("grpc.so_reuseport", 0)]
        if limits.max_concurrent_streams:
            options.append(("grpc.max_concurrent_streams", limits.max_concurrent_streams))
        self.server = grpc.aio.server(options=options, interceptors=[self.gate])
        # Order matters: the first handler that claims a method serves it.
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.server.add_generic_rpc_handlers((_InferenceMethods(self.inference),
                                              PassthroughHandler(self.passthrough)))
        self.grpc_port = tls.add_port(self.server, self.config)  # TLS/mTLS when configured
        if not self.grpc_port:
            raise OSError(f"cannot listen on {self.config.listen}")
        await self._set_health(False)
        await self.server.start()
        if self.rest is not None:
            self.http_port = await self.rest.start(self.config.http_listen)
        self.admin_port = await self.admin.start(self.config.admin)
        self.upstream.start(self._set_health)
        log.info("listening grpc=%s admin=%s upstream=%s", self.grpc_port, self.admin_port,
                 self.upstream.target)

    async def _learn_inputs(self) -> None:
        """Fetch ModelMetadata for configured models so requests can be checked against it."""
        call = self.upstream.channel.unary_unary(
            f"/{SERVICE}/ModelMetadata", request_serializer=pb.ModelMetadataRequest.SerializeToString,
            response_deserializer=pb.ModelMetadataResponse.FromString)
        for name, model in self.state.current.config.models.items():
            if not model.learn_inputs:
                continue
            try:
                metadata = await call(pb.ModelMetadataRequest(name=name), timeout=5)
            except grpc.aio.AioRpcError as err:
                log.warning("no ModelMetadata for %s from the upstream (%s): its requests are "
                            "checked against config only", name, err.code().name)
                continue
            self.state.learned[name] = specs_from_metadata(metadata, finite=False)
            log.info("learned inputs of %s: %s", name, ", ".join(
                f"{k} {v.datatype} {list(v.shape or ())}" for k, v in self.state.learned[name].items()))

    async def refresh_learned_inputs(self) -> None:
        if self.upstream.ready:
            await self._learn_inputs()

    async def _set_health(self, upstream_ready: bool) -> None:
        if upstream_ready and not self.draining:
            await self._learn_inputs()
        self.metrics.upstream_ready.set(1 if upstream_ready else 0)
        serving = upstream_ready and not self.draining
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for service in ("", SERVICE):
            await self.health.set(service, status)

    async def drain(self) -> None:
        """SIGTERM: readiness false first, keep serving through the drain delay (so endpoints
        are withdrawn before anything is refused), then refuse new calls and give in-flight ones
        the grace period."""
        shutdown = self.config.shutdown
        self.draining = True
        self.metrics.draining.set(1)
        await self._set_health(self.upstream.ready)
        log.info("draining: not ready; refusing new calls in %.1fs, grace %.1fs",
                 shutdown.drain_delay_s, shutdown.grace_s)
        await asyncio.sleep(shutdown.drain_delay_s)
        await self.stop(shutdown.grace_s)

    async def stop(self, grace_s: float = 5.0) -> None:
        """The cut: new calls get UNAVAILABLE from the gate (grpc's own stop would end those
        that race with it CANCELLED, which clients do not retry); calls in flight get
        ``grace_s``; then the server stops and the peers are closed, each step bounded."""
        if self.server is not None:
            self.gate.close()
            if self.rest is not None:
                self.rest.close()
            start = time.monotonic()
            if not await self.gate.wait_idle(grace_s, QUIET_S):
                log.warning("grace of %.1fs over with %d calls in flight: stopping anyway",
                            grace_s, self.gate.in_flight)
            left = max(0.0, grace_s - (time.monotonic() - start))
            if self.rest is not None and not await self.rest.wait_idle(left):
                log.warning("grace over with %d REST requests in flight: stopping anyway",
                            self.rest.in_flight)
            left = max(0.0, grace_s - (time.monotonic() - start))
            await _bounded("grpc server stop", self.server.stop(left), left + CLEANUP_S / 2)
            if self.gate.refused:
                log.info("refused %d calls with UNAVAILABLE after the drain cut", self.gate.refused)
        await _bounded("closing admin, upstream, clients backend", self._close_peers(), CLEANUP_S)
        self.audit.close()

    async def _close_peers(self) -> None:
        if self.rest is not None:
            await self.rest.stop()
        await self.admin.stop()
        await self.upstream.close()
        await self.clients.close()


async def _bounded(what: str, awaitable, timeout_s: float) -> None:
    try:
        await asyncio.wait_for(awaitable, timeout_s)
    except asyncio.TimeoutError:
        log.warning("%s did not finish within %.1fs; going on", what, timeout_s)


def _exit_watchdog(deadline_s: float) -> None:
    """Last resort: whatever still runs ``deadline_s`` after SIGTERM (a worker thread stuck in a
    model, an exporter ignoring its shutdown), the process exits, before Kubernetes' SIGKILL."""
    def watch() -> None:
        time.sleep(deadline_s)
        log.error("shutdown took longer than %.1fs; exiting now", deadline_s)
        logging.shutdown()
        os._exit(1)
    threading.Thread(target=watch, name="exit-watchdog", daemon=True).start()


async def serve(config: Config, config_path: pathlib.Path | None = None,
                ready_message: bool = True) -> None:
    """Run until SIGTERM/SIGINT, then drain and exit; SIGHUP or a file change reloads config."""
    telemetry.setup_tracing(config.tracing)
    sidecar = Sidecar(config)
    await sidecar.start()
    reloader = None
    loop = asyncio.get_running_loop()
    if config_path is not None:
        reloader = ConfigReloader(config_path, sidecar.state, sidecar.metrics,
                                  on_reloaded=sidecar.refresh_learned_inputs)
        reloader.start(config.reload.watch_interval_s)
        loop.add_signal_handler(signal.SIGHUP,
                                lambda: loop.create_task(reloader.reload("SIGHUP")))
    if ready_message:
        # One machine-readable line, so tools (and tests) using port 0 learn the real ports.
        http = f" http={sidecar.http_port}" if sidecar.rest is not None else ""
        print(f"bastion: serving grpc={sidecar.grpc_port} admin={sidecar.admin_port}{http} "
              f"upstream={config.upstream.target}", flush=True)
    await stop_event().wait()
    shutdown = config.shutdown
    _exit_watchdog(shutdown.drain_delay_s + shutdown.grace_s + EXIT_MARGIN_S)
    if reloader is not None:
        await _bounded("config watcher stop", reloader.stop(), CLEANUP_S / 2)
    await sidecar.drain()
    await asyncio.to_thread(telemetry.shutdown_tracing, TRACING_FLUSH_S)
    log.info("stopped")

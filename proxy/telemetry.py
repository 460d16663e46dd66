"""OpenTelemetry tracing: provider set-up, W3C context from client metadata, spans per RPC.

Tracing is off unless the config turns it on; then one server span per RPC (RPC semantic
conventions), a child span per stage (proxy/pipeline.py) and a client span for the upstream call,
whose context is what the upstream receives in `traceparent`. Attributes carry verdicts, scores
and reasons, never inputs.
"""
from __future__ import annotations

import contextlib
import logging
import threading

import grpc
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

log = logging.getLogger("bastion.telemetry")

tracer = trace.get_tracer("bastion.proxy")
_enabled = False
_provider = None
_exporter = None

TRACE_HEADERS = ("traceparent", "tracestate")


def enabled() -> bool:
    return _enabled


def setup_tracing(config) -> None:
    """Install a tracer provider with an OTLP/gRPC exporter. The endpoint comes from config or,
    when unset, from the standard OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT variables."""
    global _enabled, _provider, _exporter
    if not config.enabled:
        return
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    # shutdown_on_exit=False: the SDK's own atexit shutdown waits up to 30 s for an unreachable
    # collector; the sidecar shuts tracing down itself, bounded (shutdown_tracing).
    provider = TracerProvider(
        resource=Resource.create({"service.name": config.service_name}),
        sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)), shutdown_on_exit=False)
    exporter = OTLPSpanExporter(endpoint=config.endpoint, insecure=config.insecure)
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=500))
    trace.set_tracer_provider(provider)
    _provider, _exporter, _enabled = provider, exporter, True
    log.info("tracing to %s (sample ratio %.3g)", config.endpoint or "OTEL_EXPORTER_OTLP_ENDPOINT",
             config.sample_ratio)


def shutdown_tracing(timeout_s: float = 1.0) -> bool:
    """Flush the spans still queued, for at most ``timeout_s``; then stop the exporter whatever
    the collector does (its retries and backoff would otherwise run for up to 30 s). True if
    everything was flushed in time."""
    if _provider is None:
        return True
    flusher = threading.Thread(target=_provider.shutdown, name="otel-shutdown", daemon=True)
    flusher.start()
    flusher.join(timeout_s)
    if not flusher.is_alive():
        return True
    log.warning("trace export did not finish within %.1fs (collector unreachable?); dropping "
                "the spans not yet sent", timeout_s)
    _exporter.shutdown(timeout_millis=0)   # aborts the export in progress and its retries
    return False


def _metadata_getter():
    from opentelemetry.propagators.textmap import Getter

    class MetadataGetter(Getter):
        def get(self, carrier, key):
            value = carrier.get(key)
            return [value] if value is not None else None

        def keys(self, carrier):
            return list(carrier)

    return MetadataGetter()


_GETTER = None


def _client_context(context):
    global _GETTER
    if _GETTER is None:
        _GETTER = _metadata_getter()
    carrier = {k: v for k, v in context.invocation_metadata() if k in TRACE_HEADERS}
    return propagate.extract(carrier, getter=_GETTER)


def _rpc_attributes(method: str) -> dict:
    service, _, name = method.lstrip("/").rpartition("/")
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}


@contextlib.contextmanager
def server_span(method: str, context):
    """The server span of one unary RPC (made current, so stage and upstream spans nest in it),
    parented on the client's W3C trace context if it sent one."""
    if not _enabled:
        yield None
        return
    # The SDK's own exception handling would describe a refusal as "AbortError: Locally
    # aborted." (context.abort's exception); the span gets the status the client got instead.
    with tracer.start_as_current_span(method.lstrip("/"), context=_client_context(context),
                                      kind=SpanKind.SERVER, attributes=_rpc_attributes(method),
                                      record_exception=False,
                                      set_status_on_exception=False) as span:
        try:
            yield span
        except grpc.aio.AbortError:
            record_status(span, context.code() or grpc.StatusCode.UNKNOWN, context.details())
            raise
        except Exception as err:
            span.record_exception(err)
            span.set_status(Status(StatusCode.ERROR, f"{type(err).__name__}: {err}"))
            raise


def start_stream_span(method: str, context):
    """A server span for a streaming RPC. Not made current: an async generator may resume in
    another context, so callers pass the span explicitly and end it themselves."""
    if not _enabled:
        return None
    return tracer.start_span(method.lstrip("/"), context=_client_context(context),
                             kind=SpanKind.SERVER, attributes=_rpc_attributes(method))


@contextlib.contextmanager
def upstream_span(method: str, target: str):
    if not _enabled:
        yield None
        return
    service, _, name = method.lstrip("/").rpartition("/")
    host, _, port = target.rpartition(":")
    with tracer.start_as_current_span(
            f"upstream {method.lstrip('/')}", kind=SpanKind.CLIENT,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name,
                        "server.address": host, "server.port": int(port)}) as span:
        yield span


def inject_headers(metadata: tuple, span=None) -> tuple:
    """Replace the client's trace headers with the current span's (or ``span``'s), which is the
    upstream call's parent."""
    if not _enabled:
        return metadata
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span) if span else None)
    kept = tuple((k, v) for k, v in metadata if k not in TRACE_HEADERS)
    return kept + tuple(carrier.items())


def record_verdict(span, verdict) -> None:
    if span is None or verdict is None:
        return
    span.set_attribute("bastion.verdict", verdict.action)
    span.set_attribute("bastion.enforced", verdict.enforced)
    if verdict.config_version:
        span.set_attribute("bastion.config_version", verdict.config_version)
    if verdict.reasons:
        span.set_attribute("bastion.reasons", ",".join(verdict.reasons))
    for stage, score in verdict.scores.items():
        span.set_attribute(f"bastion.score.{stage}", score)


def record_status(span, code, details: str | None = None) -> None:
    """The gRPC status the client got; ``details`` are Bastion's own status details (reasons,
    never inputs)."""
    if span is None:
        return
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code.name != "OK":
        span.set_status(Status(StatusCode.ERROR, f"{code.name}: {details}" if details
                               else code.name))

"""Prometheus metrics of the data path (prometheus-client, `bastion_` prefix, base units)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily

import bastion

# Method label values are bounded: forwarded methods outside the v2/Triton service share one.
KNOWN_METHODS = frozenset(f"/inference.GRPCInferenceService/{name}" for name in (
    "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer",
    "ModelStreamInfer", "ModelConfig", "ModelStatistics", "RepositoryIndex", "RepositoryModelLoad",
    "RepositoryModelUnload", "SystemSharedMemoryStatus", "SystemSharedMemoryRegister",
    "SystemSharedMemoryUnregister", "CudaSharedMemoryStatus", "CudaSharedMemoryRegister",
    "CudaSharedMemoryUnregister", "TraceSetting", "LogSettings"))

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    """One registry per sidecar, so tests and embedded uses never share global state."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.requests = Counter(
            "bastion_requests", "Inference requests handled, by model, method, gRPC outcome, "
            "protocol (grpc, or http for the v2 REST front) and canary cohort.",
            ["model", "method", "code", "protocol", "cohort"], registry=self.registry)
        self.request_seconds = Histogram(
            "bastion_request_duration_seconds",
            "Time from receiving an inference request to answering it (or forwarding it, for "
            "stream messages).", ["method"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.verdicts = Counter(
            "bastion_verdicts", "Policy verdicts on inference requests of configured models "
            "(action is what the policy decided; enforced=false in monitor mode; cohort: canary, "
            "control or all, proxy/canary.py).",
            ["model", "action", "enforced", "cohort"], registry=self.registry)
        self.reasons = Counter(
            "bastion_reasons", "Reason codes behind non-allow verdicts (bounded by the "
            "configured stages and rule sets).", ["model", "reason"], registry=self.registry)
        self.stage_seconds = Histogram(
            "bastion_stage_duration_seconds", "Time spent in one pipeline stage.",
            ["model", "stage"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.stage_errors = Counter(
            "bastion_stage_errors", "Stage failures (error, budget_exceeded, or overloaded with "
            "on_overload: error), handled by the stage's on_error.", ["model", "stage", "error"],
            registry=self.registry)
        self.shed = Counter(
            "bastion_shed_requests", "Requests refused with RESOURCE_EXHAUSTED because a stage's "
            "model was at capacity (its queue full; on_overload: shed).", ["model", "stage"],
            registry=self.registry)
        self.scores = Histogram(
            "bastion_stage_score", "Scores stages gave requests (detector score or characters/"
            "elements a transform changed).", ["model", "stage"],
            buckets=(0, 0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 20, 50, 100, 1000), registry=self.registry)
        self.extra_upstream = Counter(
            "bastion_extra_upstream_items", "Extra inputs response stages sent the upstream "
            "(squeezed variants, smoothing samples): the cost of those defenses.",
            ["model", "stage"], registry=self.registry)
        self.defense_version = Info(
            "bastion_defense_version", "The active defense version (a digest of the "
            "effective config and every model, state, library and threshold file it loads; "
            "bastion check-config prints it).", registry=self.registry)
        self.thresholds = Gauge(
            "bastion_stage_threshold", "Configured threshold of each acting stage (same units as "
            "bastion_stage_score).", ["model", "stage"], registry=self.registry)
        self.upstream_requests = Counter(
            "bastion_upstream_requests", "Unary calls to the upstream (forwarded, and the "
            "sidecar's own: response stages' samples, retries), by method and the status the "
            "upstream (or the transport) returned.", ["method", "code"],
            registry=self.registry)
        self.upstream_seconds = Histogram(
            "bastion_upstream_duration_seconds", "Time waiting for the upstream on unary calls.",
            ["method"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.added_seconds = Histogram(
            "bastion_added_latency_seconds", "Latency the sidecar adds to ModelInfer (total time "
            "minus time waiting for the upstream).", ["model", "cohort"],
            buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                     0.1, 0.25, 1), registry=self.registry)
        self.throttled = Counter(
            "bastion_throttled_requests", "Requests refused by client limits, by model and "
            "reason (rate_limit, tier_throttled, tier_blocked, backend_unavailable).",
            ["model", "reason"], registry=self.registry)
        self.tier_changes = Counter(
            "bastion_client_tier_changes", "Client suspicion tier changes, by new tier "
            "(client ids go to the audit log, never to labels).", ["tier"],
            registry=self.registry)
        self.output_findings = Counter(
            "bastion_output_findings", "What the output scan found in generated text, by model, "
            "kind (canary, secret, pii) and action (redact, stop).", ["model", "kind", "action"],
            registry=self.registry)
        self.extraction_flags = Counter(
            "bastion_extraction_flags", "Queries after which a client's PRADA test flagged it "
            "as a likely model-extraction attempt.", ["model"], registry=self.registry)
        self.clients_tracked = Gauge(
            "bastion_clients_tracked", "Client entries held by the local limiter backend.",
            registry=self.registry)
        self.upstream_ready = Gauge(
            "bastion_upstream_ready", "1 when the upstream answers ServerReady with ready=true.",
            registry=self.registry)
        self.reloads = Counter(
            "bastion_config_reloads", "Config reload attempts by result.", ["result"],
            registry=self.registry)
        for result in ("success", "failure"):  # exported from the start, so increase() works
            self.reloads.labels(result)
        self.last_reload = Gauge(
            "bastion_config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful config load (start-up counts).",
            registry=self.registry)
        self.last_reload.set_to_current_time()
        self.draining = Gauge(
            "bastion_draining", "1 while the sidecar drains after SIGTERM.", registry=self.registry)
        Info("bastion_build", "Bastion version.", registry=self.registry).info(
            {"version": bastion.__version__})
        self.registry.register(EncoderWindows())

        self._model_labels: set[str] = set()
        self._request_children: dict[tuple, tuple] = {}
        self._stage_children: dict[tuple, tuple] = {}

    MAX_MODEL_LABELS = 100

    def model_label(self, model: str) -> str:
        """Model names come from clients: past a cap, new names share one label value."""
        if model in self._model_labels:
            return model
        if not model:
            return "_none"
        if len(self._model_labels) >= self.MAX_MODEL_LABELS:
            return "_other"
        self._model_labels.add(model)
        return model

    def set_defense_version(self, version: str) -> None:
        """The active defense version as an info metric: one series at 1 (a reload replaces it)."""
        self.defense_version.info({"version": version})

    def set_thresholds(self, snapshot) -> None:
        """Publish what a config promises: stage thresholds, and zeroed counters for the
        extraction monitors it enables (so rates exist before the first flag)."""
        for name, model in snapshot.config.models.items():
            if model.extraction is not None:
                self.extraction_flags.labels(name)
        self.thresholds.clear()
        for model, pipeline in snapshot.pipelines.items():
            for runner in pipeline.runners:
                if runner.may_shed and runner.kind == "detector":
                    self.shed.labels(model, runner.config.stage_id)   # 0 until the first shed
                threshold = runner.config.common.threshold
                if threshold is not None:
                    self.thresholds.labels(model, runner.config.stage_id).set(threshold)

    def observe_upstream(self, method: str, code: str, seconds: float) -> None:
        name = method.rsplit("/", 1)[-1] if method in KNOWN_METHODS else "_other"
        self.upstream_requests.labels(name, code).inc()
        self.upstream_seconds.labels(name).observe(seconds)

    def observe_extra_upstream(self, model: str, stage: str, items: int) -> None:
        self.extra_upstream.labels(model, stage).inc(items)

    def observe_added(self, model: str, seconds: float, cohort: str = "all") -> None:
        self.added_seconds.labels(self.model_label(model), cohort).observe(seconds)

    def observe_reload(self, ok: bool) -> None:
        self.reloads.labels("success" if ok else "failure").inc()
        if ok:
            self.last_reload.set_to_current_time()

    def observe_shed(self, model: str, stage: str) -> None:
        self.shed.labels(model, stage).inc()

    def _stage(self, model: str, stage: str) -> tuple:
        """(duration, score) children of one configured stage, cached like observe_request's:
        every stage of every request lands here."""
        key = (model, stage)
        children = self._stage_children.get(key)
        if children is None:
            children = (self.stage_seconds.labels(model, stage), self.scores.labels(model, stage))
            if len(self._stage_children) < 4096:
                self._stage_children[key] = children
        return children

    def observe_stage(self, model: str, stage: str, seconds: float, error: str | None) -> None:
        self._stage(model, stage)[0].observe(seconds)
        if error is not None:
            self.stage_errors.labels(model, stage, error).inc()

    def observe_score(self, model: str, stage: str, score: float) -> None:
        self._stage(model, stage)[1].observe(score)

    def observe_output(self, model: str, findings) -> None:
        for finding in findings:
            self.output_findings.labels(model, finding.kind, finding.action.value).inc()

    def observe_verdict(self, model: str, verdict) -> None:
        self.verdicts.labels(model, verdict.action, str(verdict.enforced).lower(),
                             verdict.cohort).inc()
        if verdict.action != "allow":
            for reason in verdict.reasons[:8]:
                self.reasons.labels(model, reason).inc()

    def observe_request(self, method: str, model: str, code: str, seconds: float,
                        protocol: str = "grpc", cohort: str = "all") -> None:
        # Hot path: label children are cached (labels() takes a lock and builds a key each call).
        key = (method, model, code, protocol, cohort)
        children = self._request_children.get(key)
        if children is None:
            children = (self.requests.labels(self.model_label(model), method, code, protocol,
                                             cohort),
                        self.request_seconds.labels(method))
            if len(self._request_children) < 4096:
                self._request_children[key] = children
        children[0].inc()
        children[1].observe(seconds)


class EncoderWindows:
    """``bastion_encoder_windows_total{encoder, path}``: model windows the shared text encoders
    ran, by ``path``: ``exit`` (left at a classifier's early exit) or ``full`` (every layer).
    The exit share is the cost of the text defense and a drift signal: unseen benign traffic
    exits less than the benign texts the gate was set on (docs/quality-early-exit.md)."""

    def collect(self):
        from bastion.detectors.encoder import live_encoders
        family = CounterMetricFamily(
            "bastion_encoder_windows", "Model windows run by the text encoders, by whether they "
            "left at the early exit.", labels=["encoder", "path"])
        totals: dict[str, list[int]] = {}
        for encoder in live_encoders():
            counts = totals.setdefault(f"{encoder.name}:{encoder.variant}", [0, 0])
            counts[0] += encoder.windows_exited
            counts[1] += encoder.windows_run - encoder.windows_exited
        for name, (exited, full) in sorted(totals.items()):
            family.add_metric([name, "exit"], exited)
            family.add_metric([name, "full"], full)
        yield family

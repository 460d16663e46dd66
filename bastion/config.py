"""Sidecar configuration: one YAML file, validated on load.

Errors name the key path (``models.chat.mode: ...``) so an operator can fix the file without
reading code. Unknown keys are errors: a misspelt threshold must never silently fall back to a
default.
"""
from __future__ import annotations

import pathlib
from typing import Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator,
                      model_validator)

from bastion import stage_catalog
from bastion.clients_config import ClientsConfig, resolve_token_budget_paths
from bastion.core.registry import StagePluginError
from bastion.detectors.extraction import ExtractionConfig
from bastion.output_config import OutputConfig, parse_output_detectors
from bastion.stage_config import (InputSpec, calibrate_command, check_one_key_entries,
                                  parse_stage, resolve_paths)

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key path and the problem."""


def _check_address(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class UpstreamConfig(_Strict):
    target: str = "127.0.0.1:9001"
    # Deadline applied when a client sends none, so no request can wait forever (unary calls;
    # a ModelStreamInfer stream is bounded by the two stream limits below instead).
    timeout_s: float = Field(30.0, gt=0)
    # A stream whose upstream sends nothing this long while a request waits for its response
    # ends DEADLINE_EXCEEDED; a stream with nothing outstanding may idle (proxy/streams.py).
    stream_idle_timeout_s: float = Field(60.0, gt=0)
    # Longest life of any ModelStreamInfer stream; None: as long as the client keeps it.
    max_stream_lifetime_s: float | None = Field(None, gt=0)
    # How often the upstream's ServerReady is polled for grpc.health.v1 and /readyz.
    health_interval_s: float = Field(1.0, gt=0)
    max_receive_message_bytes: int = Field(DEFAULT_MAX_MESSAGE_BYTES, gt=0)
    max_send_message_bytes: int = Field(DEFAULT_MAX_MESSAGE_BYTES, gt=0)
    # The model server's own REST port (http://HOST:PORT): the REST front proxies the routes it
    # does not inspect (Triton's repository, statistics, trace; KServe v1) there. None: 404.
    http_target: str | None = None

    @field_validator("target")
    @classmethod
    def _address(cls, value: str) -> str:
        return _check_address(value)

    @field_validator("http_target")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        scheme, sep, rest = value.partition("://")
        if scheme not in ("http", "https") or not sep:
            raise ValueError(f"expected http://HOST:PORT or https://HOST:PORT, got {value!r}")
        _check_address(rest.rstrip("/"))
        return value.rstrip("/")


class LimitsConfig(_Strict):
    max_receive_message_bytes: int = Field(DEFAULT_MAX_MESSAGE_BYTES, gt=0)
    max_send_message_bytes: int = Field(DEFAULT_MAX_MESSAGE_BYTES, gt=0)
    # Elements per tensor a request may declare before it is refused without allocating.
    max_tensor_elements: int = Field(64 * 1024 * 1024, gt=0)
    max_concurrent_streams: int | None = Field(None, gt=0)
    # Resident memory above which new inference work is refused RESOURCE_EXHAUSTED (shed) until
    # in-flight work has freed it (proxy/memory.py); None = no watermark.
    max_memory_bytes: int | None = Field(None, gt=0)
    # REST front: a client must send its whole body within this long (slow clients end 408),
    # and a request line or header line may be at most this long (longer: 400).
    http_body_timeout_s: float = Field(30.0, gt=0)
    http_max_header_bytes: int = Field(8190, ge=256)


class ShutdownConfig(_Strict):
    # On SIGTERM readiness turns false at once; new calls are still served for this long so load
    # balancers and kube-proxy stop routing here before anything is refused.
    drain_delay_s: float = Field(2.0, ge=0)
    # Then new calls are refused and in-flight ones (streams included) get this long to finish.
    grace_s: float = Field(25.0, ge=0)


class ReloadConfig(_Strict):
    # The config file and the folder around it are polled this often; SIGHUP reloads at once.
    watch_interval_s: float = Field(1.0, gt=0)


class TracingConfig(_Strict):
    enabled: bool = False
    # OTLP/gRPC collector, e.g. 127.0.0.1:4317; unset = OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT.
    endpoint: str | None = None
    insecure: bool = True
    sample_ratio: float = Field(1.0, ge=0, le=1)
    service_name: str = "bastion"


class AuditConfig(_Strict):
    enabled: bool = True
    # "stdout" or a file path (rotated at max_bytes, keeping backup_count files).
    output: str = "stdout"
    max_bytes: int = Field(50 * 1024 * 1024, gt=0)
    backup_count: int = Field(5, ge=0)
    # Client identities are logged as HMAC-SHA256 with this key (from the named environment
    # variable); without it a random per-process key is used, so hashes do not link restarts.
    client_hash_key_env: str = "BASTION_AUDIT_KEY"
    # Off by default: with it, a decision line carries a redacted excerpt (digits, e-mail
    # addresses and URLs masked, at most excerpt_chars) of the text a detector scored highest.
    include_excerpt: bool = False
    excerpt_chars: int = Field(120, ge=16, le=400)


class TLSServerConfig(_Strict):
    """TLS on the gRPC front (off unless cert_file is set). PEM files; re-read when they change."""
    cert_file: str | None = None
    key_file: str | None = None
    # CA bundle that client certificates must chain to (mTLS); needs require_client_cert.
    client_ca_file: str | None = None
    require_client_cert: bool = False
    # How often the files' inode/mtime/size are polled; a change is loaded for new connections.
    reload_interval_s: float = Field(5.0, gt=0)

    @model_validator(mode="after")
    def _complete(self) -> "TLSServerConfig":
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("cert_file and key_file must be set together")
        if self.require_client_cert and not self.client_ca_file:
            raise ValueError("require_client_cert needs client_ca_file (the CA client certificates "
                             "must chain to)")
        if self.client_ca_file and not self.require_client_cert:
            raise ValueError("client_ca_file is set but require_client_cert is false; gRPC cannot "
                             "ask for an optional client certificate, so set require_client_cert: "
                             "true (mTLS) or remove client_ca_file")
        if (self.client_ca_file or self.require_client_cert) and not self.cert_file:
            raise ValueError("client certificates need server TLS: set cert_file and key_file")
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file)


class TLSUpstreamConfig(_Strict):
    """TLS to the model server: on when `enabled` is true or any file is set."""
    enabled: bool = False
    # CA bundle the upstream's certificate must chain to (unset: the system roots).
    ca_file: str | None = None
    # Client certificate for mTLS to the upstream.
    cert_file: str | None = None
    key_file: str | None = None
    # Name checked against the upstream's certificate when it differs from upstream.target's host.
    server_name: str | None = None

    @model_validator(mode="after")
    def _complete(self) -> "TLSUpstreamConfig":
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("cert_file and key_file must be set together")
        if self.server_name is not None and not self.server_name.strip():
            raise ValueError("server_name must not be empty")
        return self

    @property
    def active(self) -> bool:
        return bool(self.enabled or self.ca_file or self.cert_file)


class TLSConfig(_Strict):
    server: TLSServerConfig = TLSServerConfig()
    upstream: TLSUpstreamConfig = TLSUpstreamConfig()


class ModelExtractionConfig(ExtractionConfig):
    """PRADA model-extraction monitoring of one model: which input is the query, and which
    output gives the predicted class (its argmax), so distances are grouped by class."""
    input: str
    class_output: str | None = None


class ModelConfig(_Strict):
    mode: Literal["enforce", "monitor"] = "enforce"
    # Canary (with mode enforce): enforce for this share of clients, sticky by client identity
    # (proxy/canary.py), monitor mode for the rest; None: for every client.
    enforce_percent: float | None = Field(None, ge=0, le=100)
    inputs: dict[str, InputSpec] = {}
    # Requests whose tensors live in Triton shared memory cannot be inspected. Default: deny in
    # enforce mode, pass (annotated) in monitor mode.
    shared_memory: Literal["deny", "pass"] | None = None
    # A BYTES element that is not UTF-8: refuse (INVALID_ARGUMENT) or decode with U+FFFD.
    invalid_utf8: Literal["reject", "replace"] = "reject"
    # Check each request's datatypes and shapes against the upstream's ModelMetadata (fetched
    # when the upstream becomes ready); `inputs` entries above override what is learned.
    learn_inputs: bool = True
    # Off unless set: per-client PRADA extraction monitoring; a flag adds the reason
    # `extraction:prada` to the client's suspicion (weight it under clients.suspicion.weights).
    extraction: ModelExtractionConfig | None = None
    # Sent in the `retry-after-ms` trailer when a stage's action is `throttle`.
    retry_after_ms: int = Field(1000, ge=0)
    # Ordered stages, each a one-key mapping {stage-name: {options}}; see bastion.stage_config.
    pipeline: list[dict[str, dict[str, Any] | None]] = []
    # Off unless set: scan the generated text (canary leaks, secrets, PII); bastion.output_config.
    output: OutputConfig | None = None

    @field_validator("pipeline")
    @classmethod
    def _one_key_per_stage(cls, stages: list[dict]) -> list[dict]:
        return check_one_key_entries(stages, "stage")


class Config(_Strict):
    listen: str = "0.0.0.0:8001"
    # Admin HTTP (/metrics, /healthz, /readyz): loopback unless an operator opens it.
    admin: str = "127.0.0.1:8002"
    # The KServe v2 REST front (Triton's convention: 8000); None: gRPC only.
    http_listen: str | None = None
    upstream: UpstreamConfig = UpstreamConfig()
    limits: LimitsConfig = LimitsConfig()
    shutdown: ShutdownConfig = ShutdownConfig()
    reload: ReloadConfig = ReloadConfig()
    clients: ClientsConfig = ClientsConfig()
    tracing: TracingConfig = TracingConfig()
    audit: AuditConfig = AuditConfig()
    models: dict[str, ModelConfig] = {}
    # TLS and mTLS on the front and to the upstream (restart-only; certificates reload).
    tls: TLSConfig = TLSConfig()
    # The stages validation built, reused by the sidecar so a load builds each stage once:
    # model name -> (the ModelConfig they were built from, its StageConfigs in order).
    _stages: dict = PrivateAttr(default_factory=dict)

    def built_stages(self, model_name: str) -> list | None:
        """The stages validation built for ``model_name``, if they are still this config's."""
        cached = self._stages.get(model_name)
        model = self.models.get(model_name)
        return cached[1] if cached is not None and cached[0] is model else None

    @field_validator("listen", "admin", "http_listen")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        return None if value is None else _check_address(value)


def validate_pipelines(config: Config, *, allow_uncalibrated: bool = False,
                       config_path: str | None = None, reuse: Config | None = None) -> list[str]:
    """Problems with the configured pipelines, each naming its key path. The stages it builds
    are kept on ``config`` for the sidecar (:meth:`Config.built_stages`); a model whose
    pipeline and inputs equal those of ``reuse`` (the config being re-validated with CLI
    overrides) takes that config's stages instead of building them again."""
    problems = []
    for model_name, model in config.models.items():
        ids: dict[str, int] = {}
        seen_response = False
        stages, model_problems = [], len(problems)
        previous = reuse.models.get(model_name) if reuse is not None else None
        prebuilt = reuse.built_stages(model_name) if previous is not None else None
        if prebuilt is not None and (previous.pipeline, previous.inputs) != (model.pipeline,
                                                                            model.inputs):
            prebuilt = None
        for index, entry in enumerate(model.pipeline):
            path = f"models.{model_name}.pipeline.{index}"
            try:
                stage = prebuilt[index] if prebuilt is not None else parse_stage(
                    entry, model.inputs, path, allow_uncalibrated=allow_uncalibrated,
                    hint=calibrate_command(model_name, config_path))
            except ValueError as err:
                problems.append(str(err))
                continue
            stages.append(stage)
            if stage.spec.kind == "response":
                seen_response = True
            elif seen_response:
                problems.append(f"{path}: request stages must come before response stages")
            if stage.stage_id in ids:
                problems.append(f"{path}: stage id {stage.stage_id!r} is already used by stage "
                                f"{ids[stage.stage_id]}; give one an `id`")
            ids[stage.stage_id] = index
        if len(problems) == model_problems:
            config._stages[model_name] = (model, stages)
        if model.output is not None and model.output.detectors:
            try:
                parse_output_detectors(model_name, model.output,
                                       allow_uncalibrated=allow_uncalibrated,
                                       hint=calibrate_command(model_name, config_path))
            except ValueError as err:
                problems.append(str(err))
    return problems


def _format_error(err: ValidationError, source: str) -> str:
    lines = []
    for item in err.errors():
        path = ".".join(str(p) for p in item["loc"]) or "(top level)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        elif message.startswith("Value error, "):
            message = message[len("Value error, "):]
        lines.append(f"{source}: {path}: {message}")
    return "\n".join(lines)


def parse_config(data: Any, source: str = "config", base_dir: pathlib.Path | None = None,
                 allow_uncalibrated: bool = False, reuse: Config | None = None) -> Config:
    """Validate ``data``. Relative file paths in the pipelines resolve against ``base_dir`` (the
    config file's folder; None: the working directory). A stage whose threshold file does not
    exist yet is an error unless ``allow_uncalibrated`` (for `bastion calibrate`, which writes it).
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a mapping, got {type(data).__name__}")
    try:
        stage_catalog.registry()  # plugins load here, so a broken one is a one-line config error
    except StagePluginError as err:
        raise ConfigError(f"{source}: {err}") from None
    from bastion.shipped_profiles import expand_profiles
    data, problems = expand_profiles(data)
    if problems:
        raise ConfigError("\n".join(f"{source}: {p}" for p in problems))
    try:
        config = Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None
    clients, problems = resolve_token_budget_paths(config.clients, base_dir)
    config = config.model_copy(update={"clients": clients, "models": {
        name: model.model_copy(update={
            "pipeline": resolve_paths(name, model.pipeline, base_dir),
            "output": model.output if model.output is None else model.output.model_copy(update={
                "detectors": resolve_paths(name, model.output.detectors, base_dir)})})
        for name, model in config.models.items()}})
    problems += validate_pipelines(config, allow_uncalibrated=allow_uncalibrated,
                                   config_path=source if base_dir is not None else None,
                                   reuse=reuse)
    if problems:
        raise ConfigError("\n".join(f"{source}: {p}" for p in problems))
    return config


def load_config(path: str | pathlib.Path, allow_uncalibrated: bool = False) -> Config:
    """Read and validate a YAML config; relative paths in it are relative to its folder."""
    path = pathlib.Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: invalid YAML{where}: {getattr(err, 'problem', err)}") from None
    # The folder the file appears in, symlinks not followed (a Kubernetes ConfigMap mount links
    # each key into a versioned folder; paths are written relative to the mount).
    return parse_config(data, str(path), path.absolute().parent, allow_uncalibrated)


def with_overrides(config: Config, **overrides: Any) -> Config:
    """Apply CLI flags (listen=..., admin=..., upstream=HOST:PORT) over a loaded config."""
    data = config.model_dump()
    for key, value in overrides.items():
        if value is None:
            continue
        if key == "upstream":
            data["upstream"]["target"] = value
        else:
            data[key] = value
    return parse_config(data, "command line", reuse=config)

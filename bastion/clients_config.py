"""The ``clients:`` section of the config: identity sources, rate limits, token budgets,
suspicion, backend.

Only the schema and the spelling rules of its values live here, so the config validates without
importing the server; :mod:`bastion.proxy.identity`, :mod:`bastion.proxy.limiter` and
:mod:`bastion.proxy.token_budget` carry it out.
"""
from __future__ import annotations

import ipaddress
import math
import os
from collections.abc import Iterable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DEFAULT_KEY_SECRET_ENV = "BASTION_CLIENT_KEY_SECRET"

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def check_source(source: str) -> str:
    """Validate one identity source spelling (used by the config model); returns it normalized."""
    if source in ("mtls", "peer"):
        return source
    kind, sep, name = source.partition(":")
    if kind == "header" and sep and name.strip():
        name = name.strip().lower()
        if name.endswith("-bin"):
            raise ValueError(f"identity source {source!r}: binary (-bin) headers are not supported")
        if any(c.isspace() for c in name):
            raise ValueError(f"identity source {source!r}: header names have no whitespace")
        return f"header:{name}"
    raise ValueError(f"unknown identity source {source!r}; expected 'header:NAME', 'mtls' or 'peer'")


def parse_networks(cidrs: Iterable[str]) -> tuple[IPNetwork, ...]:
    """CIDRs (or single addresses) to networks; raises ValueError naming a bad entry."""
    networks = []
    for cidr in cidrs:
        try:
            networks.append(ipaddress.ip_network(cidr.strip(), strict=False))
        except ValueError:
            raise ValueError(f"not an IP network: {cidr!r}") from None
    return tuple(networks)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RateLimit(_Strict):
    rps: float = Field(gt=0)
    burst: int = Field(ge=1)


class SuspicionConfig(_Strict):
    # Reason-code prefix ("signature:") or exact stage id ("detect.perplexity") -> weight. Each
    # reason adds the weight of its longest matching prefix; each stage whose outcome is in
    # `stage_actions` adds its weight.
    weights: dict[str, float] = {}
    stage_actions: list[str] = ["flag", "throttle", "block"]
    half_life_s: float = Field(300.0, gt=0)
    throttle_at: float = Field(5.0, gt=0)
    block_at: float = Field(20.0, gt=0)
    throttled_rps: float = Field(1.0, gt=0)
    throttled_burst: int = Field(1, ge=1)
    block_cooldown_s: float = Field(300.0, ge=0)
    # Each answered request lowers the score by this much (never below 0). With it the score
    # follows the *share* of a client's requests that add weight (a CUSUM test), not their
    # count: a busy client refused at the usual benign rate stays near 0, while one refused more
    # often than request_credit / weight of the time (a black-box attacker probing a detector)
    # climbs to the tiers. 0 (default): scores only decay with time.
    request_credit: float = Field(0.0, ge=0, allow_inf_nan=False)

    @field_validator("weights")
    @classmethod
    def _finite(cls, weights: dict[str, float]) -> dict[str, float]:
        for key, weight in weights.items():
            if not key:
                raise ValueError("a weight key must not be empty")
            if not math.isfinite(weight) or weight < 0:
                raise ValueError(f"weight for {key!r} must be a finite number >= 0")
        return weights

    @model_validator(mode="after")
    def _ordered(self) -> "SuspicionConfig":
        if self.block_at < self.throttle_at:
            raise ValueError("block_at must be >= throttle_at")
        return self


class RedisConfig(_Strict):
    url: str = "redis://127.0.0.1:6379/0"
    # Every Redis call is bounded by this; past it the request is served per on_backend_error.
    timeout_ms: int = Field(50, ge=1)
    key_prefix: str = "bastion:"
    # After a failure Redis is not tried again for this long (each request falls back at once).
    retry_after_failure_ms: int = Field(1000, ge=0)


class TokenRate(_Strict):
    """A token bucket counted in (model) tokens: refills at ``tokens_per_s``, holds ``burst``."""
    tokens_per_s: float = Field(gt=0)
    burst: int = Field(ge=1)


#: What counts tokens when the config names no tokenizer: the bundled tiny LM's byte-level BPE
#: (4096 entries), roughly a GPT-2 style count; name your model's tokenizer.json for its count.
DEFAULT_TOKENIZER = "builtin:lm/tiny-lm/tokenizer.json"


class TokenBudgetsConfig(_Strict):
    """``clients.token_budgets``: token buckets on input (prompt) tokens and on generated
    (output) tokens, per client and per (client, model); all off unless set. An input bucket is
    taken from before a request goes upstream (both or neither); an output bucket is charged as
    tokens are generated and may go into debt, refusing new generation until repaid."""
    input: TokenRate | None = None
    output: TokenRate | None = None
    model_input: TokenRate | None = None
    model_output: TokenRate | None = None
    # A Hugging Face tokenizer.json: a path (relative to the config file's folder) or
    # builtin:REL, a file inside the bastion package. model_tokenizers: per model name.
    tokenizer: str = DEFAULT_TOKENIZER
    model_tokenizers: dict[str, str] = {}

    @property
    def enabled(self) -> bool:
        return any(b is not None for b in (self.input, self.output, self.model_input,
                                           self.model_output))

    @field_validator("tokenizer")
    @classmethod
    def _tokenizer(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("tokenizer must name a tokenizer.json")
        return value

    @field_validator("model_tokenizers")
    @classmethod
    def _model_tokenizers(cls, values: dict[str, str]) -> dict[str, str]:
        for model, value in values.items():
            if not model or not value.strip():
                raise ValueError("model_tokenizers maps a model name to a tokenizer.json")
        return values


def resolve_token_budget_paths(clients: "ClientsConfig", base_dir) -> tuple["ClientsConfig",
                                                                            list[str]]:
    """``clients`` with relative tokenizer paths resolved against ``base_dir`` (the config
    file's folder; None keeps them relative to the working directory; ``builtin:`` names are
    kept as written), and the problems found: files that do not exist."""
    from bastion.stage_config import PACKAGE_PREFIX, package_file

    budgets = clients.token_budgets
    problems: list[str] = []

    def resolve(value: str, where: str) -> str:
        if value.startswith(PACKAGE_PREFIX):
            try:
                path = package_file(value)
            except ValueError as err:
                problems.append(f"clients.token_budgets.{where}: {err}")
                return value
        else:
            if base_dir is not None and not os.path.isabs(value):
                value = os.path.normpath(os.path.join(base_dir, value))
            path = value
        if not os.path.isfile(path):
            problems.append(f"clients.token_budgets.{where}: no such tokenizer file: {path}")
        return value

    tokenizer = resolve(budgets.tokenizer, "tokenizer")
    per_model = {model: resolve(value, f"model_tokenizers.{model}")
                 for model, value in budgets.model_tokenizers.items()}
    if tokenizer == budgets.tokenizer and per_model == budgets.model_tokenizers:
        return clients, problems
    budgets = budgets.model_copy(update={"tokenizer": tokenizer, "model_tokenizers": per_model})
    return clients.model_copy(update={"token_budgets": budgets}), problems


class ClientsConfig(_Strict):
    # Ordered identity sources: "header:NAME", "mtls", "peer" (see bastion.proxy.identity).
    identity: list[str] = ["peer"]
    key_secret_env: str = DEFAULT_KEY_SECRET_ENV
    # Peers allowed to name the client in x-forwarded-for (CIDRs).
    trusted_proxies: list[str] = []
    limits: RateLimit | None = None
    model_limits: RateLimit | None = None
    suspicion: SuspicionConfig = SuspicionConfig()
    backend: Literal["memory", "redis"] = "memory"
    # Memory backend (and the Redis fallback): clients kept, least recently used evicted.
    max_clients: int = Field(100_000, ge=1)
    redis: RedisConfig = RedisConfig()
    on_backend_error: Literal["open", "closed"] = "open"
    # Refusals carry retry-after-ms of at least this (and never more than the cool-down left).
    min_retry_after_ms: int = Field(1, ge=0)
    # Token budgets on input and generated tokens (bastion.proxy.token_budget); same backend.
    token_budgets: TokenBudgetsConfig = TokenBudgetsConfig()

    @field_validator("identity")
    @classmethod
    def _sources(cls, sources: list[str]) -> list[str]:
        if not sources:
            raise ValueError("at least one identity source is needed")
        return [check_source(s) for s in sources]

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, cidrs: list[str]) -> list[str]:
        parse_networks(cidrs)
        return cidrs

    @model_validator(mode="after")
    def _throttle_is_lower(self) -> "ClientsConfig":
        if self.limits is not None and self.suspicion.throttled_rps > self.limits.rps:
            raise ValueError("suspicion.throttled_rps must not exceed limits.rps")
        return self

    @model_validator(mode="after")
    def _shared_limits_need_a_shared_key(self) -> "ClientsConfig":
        """Header identities are keyed hashes; without a key secret each process picks a random
        key, so through Redis one API key would be a different client on every replica and
        the shared limits would silently not hold. Refused rather than run that way."""
        headers = [s for s in self.identity if s.startswith("header:")]
        if self.backend == "redis" and headers and not os.environ.get(self.key_secret_env):
            raise ValueError(
                f"backend redis shares limits across replicas, but {headers[0]} identities are "
                f"hashed with a random per-process key unless the environment variable "
                f"{self.key_secret_env} is set: set it to the same secret value on every replica "
                f"(e.g. from a Kubernetes Secret, deploy/k8s/base/client-key-secret.yaml; "
                f"`openssl rand -hex 32` makes one), or use backend memory")
        return self

"""Token budgets: per-client and per-(client, model) token buckets on input (prompt) tokens and
on generated (output) tokens (``clients.token_budgets``).

* **Input**: :meth:`TokenBudget.admit_input` takes a request's input tokens from the client's
  ``input`` bucket and its (client, model) ``model_input`` bucket, both or neither. Refused:
  RESOURCE_EXHAUSTED with ``retry-after-ms`` = the time until the bucket that lacks the most
  has refilled enough. A request larger than a bucket's ``burst`` can never be admitted and is
  refused as too large (INVALID_ARGUMENT, no retry-after-ms), not asked to come back later.
* **Output**: generation cannot be priced before it happens, so the ``output`` and
  ``model_output`` buckets are charged after the fact (:meth:`TokenBudget.charge_output`, as
  tokens stream) and may go into debt (below zero). :meth:`TokenBudget.check_output`, before a
  request goes upstream, refuses new generation while either bucket is in debt, with
  ``retry-after-ms`` = the time until it is back at zero.

Tokens are counted with a Hugging Face ``tokenizer.json`` (the ``tokenizers`` library; ids
without special tokens), loaded once per file (:func:`token_counter`).

Backends and failure handling are the request limiter's (:mod:`bastion.proxy.limiter`, same
``clients.backend``, ``clients.redis`` and ``clients.on_backend_error``): ``memory`` keeps the
buckets per replica in LRUs of ``max_clients``; ``redis`` runs one Lua script per operation on
Redis's clock, so every replica shares one budget. Keys: ``{prefix}{<client hash>}:tin`` /
``:tout`` and ``{prefix}{<client hash>}:m:<model hash>:tin`` / ``:tout`` (hashes ``tk``, ``ts``;
same Redis Cluster slot as the client's limiter keys), expiring once the bucket would be full
again. Each call is bounded by ``redis.timeout_ms``; a failure opens the circuit for
``redis.retry_after_failure_ms``. While Redis is unavailable ``open`` serves from the local
memory buckets (budgets then hold per replica) and ``closed`` refuses admission with reason
``backend_unavailable`` (a charge is then not recorded anywhere).
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import math
import os
import time
from collections.abc import Callable, Iterable

import grpc

from bastion.clients_config import ClientsConfig, TokenRate
from bastion.proxy.redis_scripts import (LUA_NOW, BackendUnavailable, Bucket, ScriptedRedis,
                                         key_hash, refill)

log = logging.getLogger("bastion.token_budget")

REASONS = ("ok", "input_budget", "model_input_budget", "input_too_large",
           "model_input_too_large", "output_budget", "model_output_budget",
           "backend_unavailable")
# The config key of the budget each reason names (refusal details, metrics labels).
BUDGET_OF = {"input_budget": "input", "input_too_large": "input",
             "model_input_budget": "model_input", "model_input_too_large": "model_input",
             "output_budget": "output", "model_output_budget": "model_output"}
_TOO_LARGE = ("input_too_large", "model_input_too_large")


# ---- results ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TokenAdmission:
    """What one budget operation decided.

    ``allowed``: admit_input / check_output: the request may go on; charge_output: the output
    budgets are not in debt after this charge (False: the next check_output refuses).
    ``reason``: one of REASONS; for a refusal, the budget that lacks the most (longest wait).
    ``remaining``: tokens left after the operation in the lowest of the buckets consulted
    (negative: debt); None when no bucket applies or no backend answered."""
    allowed: bool
    reason: str
    retry_after_ms: int = 0        # 0 when allowed, and for a request too large to ever fit
    tokens: int = 0                # the tokens asked for (input) or charged (output)
    remaining: float | None = None
    backend: str = "memory"        # memory | redis | fallback (local memory while Redis is down)
    burst: int | None = None       # the bucket's burst, for a request too large

    @property
    def budget(self) -> str | None:
        """The config key (``input``, ``model_input``, ``output``, ``model_output``) of the
        budget that refused, None otherwise."""
        return BUDGET_OF.get(self.reason)


_ALLOWED = TokenAdmission(True, "ok", backend="none")


def refusal(result: TokenAdmission, request_id: str):
    """(status code, details, trailers) for a refused TokenAdmission, in limiter.refusal's
    shape. The details name the budget (its config key) and the token count, never the text.
    Budget exceeded (input, or output in debt) -> RESOURCE_EXHAUSTED with ``retry-after-ms``;
    a request larger than the burst -> INVALID_ARGUMENT without it (retrying cannot help);
    no backend (on_backend_error: closed) -> UNAVAILABLE with ``retry-after-ms``."""
    reason = result.reason
    trailers = [("bastion-verdict", "block" if reason in _TOO_LARGE else "throttle"),
                ("bastion-reasons", f"tokens:{reason}"),
                ("bastion-request-id", request_id)]
    if reason in _TOO_LARGE:
        return (grpc.StatusCode.INVALID_ARGUMENT,
                f"bastion: input too large for the token budget ({result.tokens} input tokens, "
                f"the {result.budget} budget's burst is {result.burst})", tuple(trailers))
    trailers.append(("retry-after-ms", str(result.retry_after_ms)))
    if reason == "backend_unavailable":
        return (grpc.StatusCode.UNAVAILABLE, "bastion: token budget unavailable", tuple(trailers))
    if result.budget in ("output", "model_output"):
        details = (f"bastion: output token budget exceeded ({result.budget} budget in debt; "
                   f"retry after {result.retry_after_ms} ms)")
    else:
        details = (f"bastion: input token budget exceeded ({result.budget} budget, "
                   f"{result.tokens} tokens asked; retry after {result.retry_after_ms} ms)")
    return grpc.StatusCode.RESOURCE_EXHAUSTED, details, tuple(trailers)


# ---- token counting --------------------------------------------------------------------------
def tokenizer_file(value: str) -> str:
    """A config's tokenizer value -> a file path (``builtin:REL`` inside the bastion package)."""
    from bastion.stage_config import PACKAGE_PREFIX, package_file
    if value.startswith(PACKAGE_PREFIX):
        return str(package_file(value))
    return value


class TokenCounter:
    """Counts tokens with one ``tokenizer.json``: ids without special tokens, no truncation.
    Thread-safe (a worker thread may count while the event loop serves others)."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer
        self.path = path
        self.tokenizer = Tokenizer.from_file(path)
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()

    def count(self, text: str | bytes) -> int:
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        if not text:
            return 0
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def count_all(self, texts: Iterable[str | bytes]) -> int:
        return sum(self.count(t) for t in texts)


@functools.lru_cache(maxsize=32)
def _counter(path: str) -> TokenCounter:
    return TokenCounter(path)


def token_counter(value: str) -> TokenCounter:
    """The counter for a tokenizer (a path or ``builtin:REL``), loaded once per file."""
    return _counter(os.path.realpath(tokenizer_file(value)))


# ---- memory backend --------------------------------------------------------------------------
# Codes shared by the memory backend and the Lua scripts.
# 1 and 2: the client's bucket and the (client, model) bucket of the operation's kind.
_OK, _CLIENT, _MODEL, _INPUT_BIG, _MODEL_INPUT_BIG = range(5)
_INPUT_CODES = {_OK: "ok", _CLIENT: "input_budget", _MODEL: "model_input_budget",
                _INPUT_BIG: "input_too_large", _MODEL_INPUT_BIG: "model_input_too_large"}
_OUTPUT_CODES = {_OK: "ok", _CLIENT: "output_budget", _MODEL: "model_output_budget"}


def _rate(spec: TokenRate | None) -> tuple[float, int]:
    return (spec.tokens_per_s, spec.burst) if spec is not None else (0.0, 0)


class MemoryBudgets:
    """Per-replica buckets: one LRU of at most ``max_clients`` per kind (client input, client
    output, (client, model) input, (client, model) output). Operations return the backend
    tuple (allowed, code, retry seconds, remaining) the Lua scripts return too."""

    KINDS = ("in", "out", "min", "mout")

    def __init__(self, config: ClientsConfig, clock: Callable[[], float]):
        self.config = config
        self.clock = clock
        self.lru: dict[str, collections.OrderedDict[tuple[str, str], Bucket]] = {
            kind: collections.OrderedDict() for kind in self.KINDS}

    def _bucket(self, kind: str, identity: str, model: str, now: float) -> Bucket:
        lru, key = self.lru[kind], (identity, model)
        bucket = lru.get(key)
        if bucket is None:
            bucket = lru[key] = Bucket(now)
            if len(lru) > self.config.max_clients:
                lru.popitem(last=False)
        else:
            lru.move_to_end(key)
        return bucket

    def _pair(self, kinds: tuple[str, str], specs, identity: str, model: str, now: float):
        """[(bucket, level, rate, code)] for the client's and the (client, model) bucket."""
        found = []
        for kind, spec, key_model, code in ((kinds[0], specs[0], "", _CLIENT),
                                            (kinds[1], specs[1], model, _MODEL)):
            if spec is None:
                continue
            bucket = self._bucket(kind, identity, key_model, now)
            level = refill(bucket, now, spec.tokens_per_s, spec.burst)
            found.append((bucket, level, spec.tokens_per_s, code))
        return found

    def admit_input(self, identity: str, model: str, tokens: int):
        b = self.config.token_budgets
        if b.input is not None and tokens > b.input.burst:
            return 0, _INPUT_BIG, 0.0, None
        if b.model_input is not None and tokens > b.model_input.burst:
            return 0, _MODEL_INPUT_BIG, 0.0, None
        now = self.clock()
        found = self._pair(("in", "min"), (b.input, b.model_input), identity, model, now)
        wait, code = 0.0, _OK
        for _, tk, rate, which in found:
            if tk < tokens and (tokens - tk) / rate > wait:
                wait, code = (tokens - tk) / rate, which
        if code != _OK:
            return 0, code, wait, min(tk for _, tk, _, _ in found)
        for bucket, _, _, _ in found:
            bucket.tokens -= tokens
        return 1, _OK, 0.0, min(bucket.tokens for bucket, _, _, _ in found)

    def check_output(self, identity: str, model: str):
        b = self.config.token_budgets
        found = self._pair(("out", "mout"), (b.output, b.model_output), identity, model,
                           self.clock())
        wait, code = 0.0, _OK
        for _, tk, rate, which in found:
            if tk < 0 and -tk / rate > wait:
                wait, code = -tk / rate, which
        return int(code == _OK), code, wait, min(tk for _, tk, _, _ in found)

    def charge_output(self, identity: str, model: str, tokens: int):
        b = self.config.token_budgets
        found = self._pair(("out", "mout"), (b.output, b.model_output), identity, model,
                           self.clock())
        wait, code = 0.0, _OK
        for bucket, tk, rate, which in found:
            bucket.tokens = tk - tokens
            if bucket.tokens < 0 and -bucket.tokens / rate > wait:
                wait, code = -bucket.tokens / rate, which
        return int(code == _OK), code, wait, min(bucket.tokens for bucket, _, _, _ in found)

    def level(self, kind: str, identity: str, model: str = "") -> float | None:
        """A bucket's tokens now, without touching the LRU order (tests, debugging)."""
        spec = {"in": "input", "out": "output", "min": "model_input", "mout": "model_output"}
        rate, cap = _rate(getattr(self.config.token_budgets, spec[kind]))
        bucket = self.lru[kind].get((identity, model if kind.startswith("m") else ""))
        if not rate:
            return None
        if bucket is None:
            return float(cap)
        elapsed = max(0.0, self.clock() - bucket.ts)
        return min(cap, bucket.tokens + elapsed * rate)


# ---- Redis backend ---------------------------------------------------------------------------
# A bucket key's level now (a missing key is a full bucket), and storing one with a TTL that
# ends when it would be full again (at most ~31 years: PEXPIRE takes an integer).
_LUA_BUCKETS = LUA_NOW + """
local function level(key, rate, cap)
  local b = redis.call('HMGET', key, 'tk', 'ts')
  local tk = tonumber(b[1])
  if tk == nil then return cap end
  local ts = tonumber(b[2]) or now
  if now > ts then tk = tk + (now - ts) * rate end
  if tk > cap then tk = cap end
  return tk
end
local function store(key, tk, rate, cap)
  redis.call('HSET', key, 'tk', fmt(tk), 'ts', fmt(now))
  local keep = ((cap - tk) / rate + 1) * 1000
  if keep > 1e12 then keep = 1e12 end
  redis.call('PEXPIRE', key, string.format('%d', math.ceil(keep)))
end
"""

# KEYS: client bucket, (client, model) bucket. ARGV: rate, burst, model rate, model burst
# (rate 0: no such budget), then tokens (input, charge).
# Returns: allowed, code, retry (s), remaining (lowest level; '' when no bucket).
_LUA_LEVELS = _LUA_BUCKETS + """
local rate, cap = tonumber(ARGV[1]), tonumber(ARGV[2])
local mrate, mcap = tonumber(ARGV[3]), tonumber(ARGV[4])
local n = 0
if ARGV[5] then n = tonumber(ARGV[5]) end
local tk, mtk = nil, nil
if rate > 0 then tk = level(KEYS[1], rate, cap) end
if mrate > 0 then mtk = level(KEYS[2], mrate, mcap) end
local function lowest(a, b)
  if a == nil then return b end
  if b == nil or a < b then return a end
  return b
end
"""

INPUT_LUA = _LUA_LEVELS + """
if rate > 0 and n > cap then return {0, 3, '0', ''} end
if mrate > 0 and n > mcap then return {0, 4, '0', ''} end
local wait, code = 0, 0
if tk and tk < n then wait, code = (n - tk) / rate, 1 end
if mtk and mtk < n and (n - mtk) / mrate > wait then wait, code = (n - mtk) / mrate, 2 end
if code ~= 0 then return {0, code, fmt(wait), fmt(lowest(tk, mtk))} end
if tk then tk = tk - n; store(KEYS[1], tk, rate, cap) end
if mtk then mtk = mtk - n; store(KEYS[2], mtk, mrate, mcap) end
return {1, 0, '0', fmt(lowest(tk, mtk))}
"""

CHECK_OUTPUT_LUA = _LUA_LEVELS + """
local wait, code = 0, 0
if tk and tk < 0 then wait, code = -tk / rate, 1 end
if mtk and mtk < 0 and -mtk / mrate > wait then wait, code = -mtk / mrate, 2 end
local allowed = 1
if code ~= 0 then allowed = 0 end
return {allowed, code, fmt(wait), fmt(lowest(tk, mtk))}
"""

CHARGE_OUTPUT_LUA = _LUA_LEVELS + """
local wait, code = 0, 0
if tk then
  tk = tk - n; store(KEYS[1], tk, rate, cap)
  if tk < 0 then wait, code = -tk / rate, 1 end
end
if mtk then
  mtk = mtk - n; store(KEYS[2], mtk, mrate, mcap)
  if mtk < 0 and -mtk / mrate > wait then wait, code = -mtk / mrate, 2 end
end
local allowed = 1
if code ~= 0 then allowed = 0 end
return {allowed, code, fmt(wait), fmt(lowest(tk, mtk))}
"""


class RedisBudgets(ScriptedRedis):
    """The buckets in Redis; one Lua script per operation (see the module docstring)."""

    def __init__(self, config: ClientsConfig, client=None):
        super().__init__(config, client, label="token budget", logger=log)
        self.owns_client = client is None
        self._input = self.redis.register_script(INPUT_LUA)
        self._check = self.redis.register_script(CHECK_OUTPUT_LUA)
        self._charge = self.redis.register_script(CHARGE_OUTPUT_LUA)
        b = config.token_budgets
        self._input_args = (*_rate(b.input), *_rate(b.model_input))
        self._output_args = (*_rate(b.output), *_rate(b.model_output))

    def keys(self, identity: str, model: str, kind: str) -> tuple[str, str]:
        """(client key, (client, model) key) for ``kind`` ``tin`` or ``tout``."""
        base = self.client_key(identity)
        return f"{base}:{kind}", f"{base}:m:{key_hash(model)}:{kind}"

    @staticmethod
    def _parse(result):
        allowed, code, retry, remaining = result
        if isinstance(remaining, bytes):
            remaining = remaining.decode()
        return (int(allowed), int(code), float(retry),
                float(remaining) if remaining not in ("", b"") else None)

    async def admit_input(self, identity: str, model: str, tokens: int):
        return self._parse(await self._call(self._input, self.keys(identity, model, "tin"),
                                            (*self._input_args, tokens)))

    async def check_output(self, identity: str, model: str):
        return self._parse(await self._call(self._check, self.keys(identity, model, "tout"),
                                            self._output_args))

    async def charge_output(self, identity: str, model: str, tokens: int):
        return self._parse(await self._call(self._charge, self.keys(identity, model, "tout"),
                                            (*self._output_args, tokens)))


# ---- the budget ------------------------------------------------------------------------------
class TokenBudget:
    """``count`` a request's text, ``check_output`` and ``admit_input`` before it goes upstream,
    ``charge_output`` as its response streams. Every operation is a no-op (allowed, backend
    ``none``) for budgets the config does not set.

    ``redis_client`` (a ``redis.asyncio.Redis``) may be the limiter's (``guard.redis.redis``),
    so both share one connection pool; it is then not closed here."""

    def __init__(self, config: ClientsConfig, clock: Callable[[], float] = time.monotonic,
                 redis_client=None):
        self.config = config
        self.budgets = b = config.token_budgets
        self.memory = MemoryBudgets(config, clock)
        self.redis = (RedisBudgets(config, redis_client)
                      if config.backend == "redis" and b.enabled else None)
        self.has_input = b.input is not None or b.model_input is not None
        self.has_output = b.output is not None or b.model_output is not None
        # Loaded now, so a broken tokenizer file fails at start (or reload), not per request.
        self.counter = token_counter(b.tokenizer) if b.enabled else None
        self.model_counters = ({m: token_counter(v) for m, v in b.model_tokenizers.items()}
                               if b.enabled else {})

    @property
    def enabled(self) -> bool:
        return self.budgets.enabled

    def counter_for(self, model: str) -> TokenCounter:
        counter = self.model_counters.get(model) or self.counter
        if counter is None:                      # budgets off: count on demand all the same
            counter = token_counter(self.budgets.model_tokenizers.get(model)
                                    or self.budgets.tokenizer)
        return counter

    def count(self, texts: str | bytes | Iterable[str | bytes], model: str = "") -> int:
        """Tokens in ``texts`` (one text or several, e.g. a BYTES tensor's elements) under
        ``model``'s tokenizer. CPU-bound (about 0.4 us per character, measured on English
        text): long inputs may be counted in a worker thread."""
        counter = self.counter_for(model)
        if isinstance(texts, (str, bytes)):
            return counter.count(texts)
        return counter.count_all(texts)

    def _ms(self, seconds: float) -> int:
        return max(self.config.min_retry_after_ms, math.ceil(seconds * 1000))

    def _result(self, raw, codes, tokens: int, backend: str) -> TokenAdmission:
        allowed, code, wait, remaining = raw
        reason = codes[code]
        burst = None
        if reason in _TOO_LARGE:
            spec = self.budgets.input if reason == "input_too_large" else self.budgets.model_input
            burst = spec.burst
        retry = self._ms(wait) if wait > 0 and reason not in _TOO_LARGE else 0
        if remaining is not None:
            remaining = float(remaining)
        return TokenAdmission(bool(allowed), reason, retry, tokens, remaining, backend, burst)

    async def _run(self, op: str, codes, identity: str, model: str, *args) -> TokenAdmission:
        tokens = args[0] if args else 0
        if self.redis is None:
            raw = getattr(self.memory, op)(identity, model, *args)
            return self._result(raw, codes, tokens, "memory")
        try:
            raw = await getattr(self.redis, op)(identity, model, *args)
        except BackendUnavailable:
            if self.config.on_backend_error == "closed":
                return TokenAdmission(False, "backend_unavailable",
                                      max(1, self.config.redis.retry_after_failure_ms),
                                      tokens, None, "redis")
            return self._result(getattr(self.memory, op)(identity, model, *args), codes,
                                tokens, "fallback")
        return self._result(raw, codes, tokens, "redis")

    async def admit_input(self, identity: str, model: str, tokens: int) -> TokenAdmission:
        """Take ``tokens`` from the client's input bucket and its (client, model) one: both or
        neither. Refused (nothing taken): ``input_budget`` / ``model_input_budget`` with
        retry_after_ms until that bucket holds ``tokens`` (the longer wait when both lack), or
        ``input_too_large`` / ``model_input_too_large`` (retry_after_ms 0) when ``tokens``
        exceeds the bucket's burst."""
        if not self.has_input or tokens <= 0:
            return dataclasses.replace(_ALLOWED, tokens=max(0, tokens))
        return await self._run("admit_input", _INPUT_CODES, identity, model, int(tokens))

    async def check_output(self, identity: str, model: str) -> TokenAdmission:
        """Refuse new generation (``output_budget`` / ``model_output_budget``) while the
        client's output bucket or its (client, model) one is in debt; retry_after_ms until the
        deeper debt is repaid (back at zero). Takes nothing."""
        if not self.has_output:
            return _ALLOWED
        return await self._run("check_output", _OUTPUT_CODES, identity, model)

    async def charge_output(self, identity: str, model: str, tokens: int) -> TokenAdmission:
        """Charge ``tokens`` generated to both output buckets; they may go into debt. The result
        is not allowed when a bucket is in debt after the charge (the next check_output will
        refuse; retry_after_ms says for how long): a caller may cut the generation short then,
        or let it finish. With on_backend_error closed and Redis down the charge is lost."""
        if not self.has_output or tokens <= 0:
            return dataclasses.replace(_ALLOWED, tokens=max(0, tokens))
        return await self._run("charge_output", _OUTPUT_CODES, identity, model, int(tokens))

    async def close(self) -> None:
        if self.redis is not None and self.redis.owns_client:
            await self.redis.close()

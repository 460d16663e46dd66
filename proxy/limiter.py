"""Per-client admission: token-bucket rate limits and a decaying suspicion score with tiers.

Every client (see ``bastion.proxy.identity``) has

* a token bucket (``limits``: ``rps`` refill, ``burst`` capacity) and one per (client, model)
  (``model_limits``); a request takes one token from each, or from neither;
* a suspicion score: each request's reasons and stage outcomes add their configured weights, and
  the score halves every ``half_life_s`` (score(t) = score(t0) * 2^(-(t - t0) / half_life_s))
  and, with ``request_credit``, each answered request lowers it by that much (never below 0), so
  it measures the share of a client's requests found suspicious rather than their number;
* a tier derived from them: ``blocked`` for ``block_cooldown_s`` after the score reaches
  ``block_at`` (refused outright), else ``throttled`` while the score is at least ``throttle_at``
  (the client bucket refills at ``throttled_rps`` and holds ``throttled_burst``), else ``normal``.
  Tiers fall back as the score decays; a client whose cool-down ends while its score is still high
  is throttled, and its next suspicious request blocks it again.

Nothing runs in the background: buckets refill and scores decay lazily from timestamps.

Backends: ``memory`` (an LRU of at most ``max_clients`` clients, O(1) per call, per replica) and
``redis`` (the same state in Redis, updated by Lua scripts in one round-trip, so every replica
shares one limit; Redis's clock is used). Each Redis call is bounded by ``redis.timeout_ms``; a
failure opens a short circuit (``redis.retry_after_failure_ms``) during which Redis is not tried.
While Redis is unreachable ``on_backend_error: open`` serves each request from the local memory
backend (limits then hold per replica, and suspicion learnt from Redis is kept locally), and
``closed`` refuses admission with reason ``backend_unavailable``.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import math
import time
from collections.abc import Callable

import grpc

from bastion.clients_config import ClientsConfig, SuspicionConfig
from bastion.proxy.redis_scripts import (LUA_NOW, BackendUnavailable, Bucket as _Bucket,
                                         ScriptedRedis, key_hash, refill as _refill)

log = logging.getLogger("bastion.limiter")

TIERS = ("normal", "throttled", "blocked")
NORMAL, THROTTLED, BLOCKED = 0, 1, 2
REASONS = ("ok", "rate_limit", "model_rate_limit", "tier_blocked", "backend_unavailable")


def _lru_entry(table, key, make, cap: int):
    """``table[key]`` (an OrderedDict), made by ``make()`` when missing and marked most recently
    used; beyond ``cap`` entries the least recently used one is dropped (client ids come from
    clients, so the table is bounded)."""
    entry = table.get(key)
    if entry is None:
        entry = table[key] = make()
        if len(table) > cap:
            table.popitem(last=False)
    else:
        table.move_to_end(key)
    return entry


# ---- results ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TierChange:
    old: str
    new: str
    score: float


@dataclasses.dataclass(frozen=True)
class Admission:
    allowed: bool
    tier: str                    # normal | throttled | blocked
    retry_after_ms: int          # 0 when allowed
    reason: str                  # ok | rate_limit | model_rate_limit | tier_blocked | backend_unavailable
    change: TierChange | None = None   # a tier move this call noticed (decay, cool-down over)
    backend: str = "memory"      # memory | redis | fallback (local memory while Redis is down)


def refusal(admission: Admission, request_id: str):
    """(status code, details, trailers) for a refused admission, in policy.refusal's shape:
    rate limits and throttling -> RESOURCE_EXHAUSTED, a blocked client -> PERMISSION_DENIED,
    no backend (on_backend_error: closed) -> UNAVAILABLE; all with ``retry-after-ms``."""
    trailers = (("bastion-verdict", "block" if admission.reason == "tier_blocked" else "throttle"),
                ("bastion-reasons", f"client:{admission.reason}"),
                ("bastion-request-id", request_id),
                ("retry-after-ms", str(admission.retry_after_ms)))
    if admission.reason == "tier_blocked":
        return (grpc.StatusCode.PERMISSION_DENIED,
                "bastion: client blocked (suspicion score over the limit)", trailers)
    if admission.reason == "backend_unavailable":
        return (grpc.StatusCode.UNAVAILABLE, "bastion: client limiter unavailable", trailers)
    return (grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"bastion: client rate limit ({admission.reason}, tier {admission.tier})", trailers)


# ---- suspicion weights -----------------------------------------------------------------------
class _Weights:
    """Sum of configured weights for one request's reasons and stage outcomes."""

    CACHE = 4096

    def __init__(self, config: SuspicionConfig):
        # Longest prefix first, so the most specific key wins.
        self.prefixes = sorted(config.weights.items(), key=lambda kv: -len(kv[0]))
        self.stages = dict(config.weights)
        self.acting = frozenset(config.stage_actions)
        self._cache: dict[str, float] = {}

    def reason_weight(self, reason: str) -> float:
        weight = self._cache.get(reason)
        if weight is None:
            weight = next((w for key, w in self.prefixes if reason.startswith(key)), 0.0)
            if len(self._cache) < self.CACHE:
                self._cache[reason] = weight
        return weight

    def total(self, reasons, stages) -> float:
        added = 0.0
        for reason in reasons or ():
            added += self.reason_weight(reason)
        if stages:
            for stage, outcome in stages.items():
                if outcome in self.acting:
                    added += self.stages.get(stage, 0.0)
        return added


# ---- memory backend --------------------------------------------------------------------------
class _Client:
    __slots__ = ("tokens", "ts", "score", "score_ts", "blocked_until", "tier")

    def __init__(self, now: float):
        self.tokens = math.inf        # full: capped to the tier's burst on first use
        self.ts = now
        self.score = 0.0
        self.score_ts = now
        self.blocked_until = -math.inf
        self.tier = NORMAL            # the last tier reported (to notice moves)


class MemoryBackend:
    """Per-replica state: clients and (client, model) buckets in two LRUs of ``max_clients``."""

    def __init__(self, config: ClientsConfig, clock: Callable[[], float]):
        self.config = config
        self.clock = clock
        self.clients: collections.OrderedDict[str, _Client] = collections.OrderedDict()
        self.buckets: collections.OrderedDict[tuple[str, str], _Bucket] = collections.OrderedDict()
        s = config.suspicion
        self._decay = math.log(2) / s.half_life_s

    def _client(self, identity: str, now: float) -> _Client:
        return _lru_entry(self.clients, identity, lambda: _Client(now), self.config.max_clients)

    def _score(self, client: _Client, now: float) -> float:
        elapsed = now - client.score_ts
        if elapsed <= 0 or client.score == 0.0:
            return client.score
        return client.score * math.exp(-elapsed * self._decay)

    def _tier(self, client: _Client, now: float, score: float) -> int:
        if now < client.blocked_until:
            return BLOCKED
        return THROTTLED if score >= self.config.suspicion.throttle_at else NORMAL

    def _change(self, client: _Client, tier: int, score: float) -> TierChange | None:
        if tier == client.tier:
            return None
        change = TierChange(TIERS[client.tier], TIERS[tier], score)
        client.tier = tier
        return change

    def admit(self, identity: str, model: str, backend: str = "memory") -> Admission:
        config = self.config
        now = self.clock()
        client = self._client(identity, now)
        score = self._score(client, now)
        tier = self._tier(client, now, score)
        change = self._change(client, tier, score)
        if tier == BLOCKED:
            wait = client.blocked_until - now
            return Admission(False, "blocked", self._ms(wait), "tier_blocked", change, backend)
        limits, suspicion = config.limits, config.suspicion
        rate = cap = 0.0
        if tier == THROTTLED:
            rate, cap = suspicion.throttled_rps, suspicion.throttled_burst
            if limits is not None:
                rate, cap = min(rate, limits.rps), min(cap, limits.burst)
        elif limits is not None:
            rate, cap = limits.rps, limits.burst
        wait_client = wait_model = 0.0
        tokens = 0.0
        if rate > 0:
            tokens = _refill(client, now, rate, cap)
            if tokens < 1.0:
                wait_client = (1.0 - tokens) / rate
        bucket = None
        model_limits = config.model_limits
        if model_limits is not None:
            bucket = self._bucket(identity, model, now)
            model_tokens = _refill(bucket, now, model_limits.rps, model_limits.burst)
            if model_tokens < 1.0:
                wait_model = (1.0 - model_tokens) / model_limits.rps
        name = TIERS[tier]
        if wait_client > 0 or wait_model > 0:
            if wait_client >= wait_model:
                return Admission(False, name, self._ms(wait_client), "rate_limit", change, backend)
            return Admission(False, name, self._ms(wait_model), "model_rate_limit", change, backend)
        if rate > 0:
            client.tokens = tokens - 1.0
        if bucket is not None:
            bucket.tokens -= 1.0
        return Admission(True, name, 0, "ok", change, backend)

    def _bucket(self, identity: str, model: str, now: float) -> _Bucket:
        return _lru_entry(self.buckets, (identity, model), lambda: _Bucket(now),
                          self.config.max_clients)

    def _ms(self, seconds: float) -> int:
        return max(self.config.min_retry_after_ms, math.ceil(seconds * 1000))

    def observe(self, identity: str, added: float) -> TierChange | None:
        now = self.clock()
        suspicion = self.config.suspicion
        client = self._client(identity, now)
        score = max(0.0, self._score(client, now) + added)  # a credit (< 0) stops at 0
        client.score, client.score_ts = score, now
        if added > 0 and score >= suspicion.block_at:
            client.blocked_until = max(client.blocked_until, now + suspicion.block_cooldown_s)
        return self._change(client, self._tier(client, now, score), score)

    def sync(self, identity: str, tier: int, score: float, blocked_for_s: float) -> None:
        """Mirror what Redis said about a client, so a fallback starts from it."""
        now = self.clock()
        client = self._client(identity, now)
        client.score, client.score_ts, client.tier = score, now, tier
        client.blocked_until = now + blocked_for_s if blocked_for_s > 0 else -math.inf

    def state(self, identity: str) -> tuple[str, float]:
        """(tier, current score) without touching the LRU order (also what `credit` checks)."""
        now = self.clock()
        client = self.clients.get(identity)
        if client is None:
            return "normal", 0.0
        score = self._score(client, now)
        return TIERS[self._tier(client, now, score)], score


# ---- Redis backend ---------------------------------------------------------------------------
# Shared helpers: Redis's clock and fmt (redis_scripts.LUA_NOW), decayed score, tier.
_LUA_COMMON = LUA_NOW + """local function decayed(score, st, hl)
  if score > 0 and now > st then return score * 2 ^ (-(now - st) / hl) end
  return score
end
local function tier_of(score, bu, throttle_at)
  if now < bu then return 2 end
  if score >= throttle_at then return 1 end
  return 0
end
local function keep_ms(score, eps, hl, bu)
  local keep = 1
  if score > eps then keep = keep + hl * math.log(score / eps) / math.log(2) end
  if bu - now + 1 > keep then keep = bu - now + 1 end
  return keep
end
"""

# KEYS: client hash, (client, model) bucket hash.
# ARGV: rps, burst, model rps, model burst (0 = no such limit), throttled rps, throttled burst,
#       half-life, throttle_at, eps (score worth keeping).
# Returns: allowed, tier, retry (s), reason (0 ok 1 rate 2 model 3 blocked), old tier, score,
#          blocked seconds left.
ADMIT_LUA = _LUA_COMMON + """
-- A token bucket's tokens now (stored tokens and time, or a full bucket), and the wait for one.
local function refill(stored, at, cap, rate)
  local tk, ts = tonumber(stored), tonumber(at) or now
  if tk == nil then tk = cap elseif now > ts then tk = math.min(cap, tk + (now - ts) * rate)
  else tk = math.min(cap, tk) end
  if tk < 1 then return tk, (1 - tk) / rate end
  return tk, 0
end
local rps, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local mrps, mburst = tonumber(ARGV[3]), tonumber(ARGV[4])
local trps, tburst = tonumber(ARGV[5]), tonumber(ARGV[6])
local hl, throttle_at, eps = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
local c = redis.call('HMGET', KEYS[1], 'tk', 'ts', 'sc', 'st', 'bu', 'tr')
local score = decayed(tonumber(c[3]) or 0, tonumber(c[4]) or now, hl)
local bu = tonumber(c[5]) or 0
local old = tonumber(c[6]) or 0
local tier = tier_of(score, bu, throttle_at)
local allowed, retry, reason = 1, 0, 0
local keep = 0
if tier == 2 then
  allowed, retry, reason = 0, bu - now, 3
else
  local rate, cap = 0, 0
  if tier == 1 then
    rate, cap = trps, tburst
    if rps > 0 then rate, cap = math.min(rate, rps), math.min(cap, burst) end
  elseif rps > 0 then
    rate, cap = rps, burst
  end
  local tk, mtk = nil, nil
  local wait1, wait2 = 0, 0
  if rate > 0 then tk, wait1 = refill(c[1], c[2], cap, rate) end
  if mrps > 0 then
    local m = redis.call('HMGET', KEYS[2], 'tk', 'ts')
    mtk, wait2 = refill(m[1], m[2], mburst, mrps)
  end
  if wait1 > 0 or wait2 > 0 then
    allowed = 0
    if wait1 >= wait2 then retry, reason = wait1, 1 else retry, reason = wait2, 2 end
  else
    if tk then tk = tk - 1 end
    if mtk then mtk = mtk - 1 end
  end
  if tk then
    redis.call('HSET', KEYS[1], 'tk', fmt(tk), 'ts', fmt(now))
    keep = (cap - tk) / rate + 1
  end
  if mtk then
    redis.call('HSET', KEYS[2], 'tk', fmt(mtk), 'ts', fmt(now))
    redis.call('PEXPIRE', KEYS[2], math.ceil(((mburst - mtk) / mrps + 1) * 1000))
  end
end
if tier ~= old then redis.call('HSET', KEYS[1], 'tr', tier) end
if keep > 0 or tier ~= old then
  local k = keep_ms(score, eps, hl, bu)
  if keep > k then k = keep end
  redis.call('PEXPIRE', KEYS[1], math.ceil(k * 1000))
end
local left = 0
if bu > now then left = bu - now end
return {allowed, tier, fmt(retry), reason, old, fmt(score), fmt(left)}
"""

# KEYS: client hash. ARGV: added, half-life, throttle_at, block_at, cool-down, eps.
# Returns: old tier, tier, score, blocked seconds left.
OBSERVE_LUA = _LUA_COMMON + """
local added, hl = tonumber(ARGV[1]), tonumber(ARGV[2])
local throttle_at, block_at = tonumber(ARGV[3]), tonumber(ARGV[4])
local cooldown, eps = tonumber(ARGV[5]), tonumber(ARGV[6])
local c = redis.call('HMGET', KEYS[1], 'sc', 'st', 'bu', 'tr')
local score = math.max(0, decayed(tonumber(c[1]) or 0, tonumber(c[2]) or now, hl) + added)
local bu = tonumber(c[3]) or 0
local old = tonumber(c[4]) or 0
if added > 0 and score >= block_at and now + cooldown > bu then bu = now + cooldown end
local tier = tier_of(score, bu, throttle_at)
local pttl = redis.call('PTTL', KEYS[1])
redis.call('HSET', KEYS[1], 'sc', fmt(score), 'st', fmt(now), 'bu', fmt(bu), 'tr', tier)
local k = math.ceil(keep_ms(score, eps, hl, bu) * 1000)
if pttl > k then k = pttl end
redis.call('PEXPIRE', KEYS[1], k)
local left = 0
if bu > now then left = bu - now end
return {old, tier, fmt(score), fmt(left)}
"""

_REASON_CODES = {0: "ok", 1: "rate_limit", 2: "model_rate_limit", 3: "tier_blocked"}


class RedisBackend(ScriptedRedis):
    """Shared state in Redis. Keys: ``{prefix}{<client hash>}`` (a hash: bucket, score, block,
    tier) and ``{prefix}{<client hash>}:m:<model hash>`` (that client's bucket for one model);
    the hash tag keeps one client's keys in one Redis Cluster slot. All keys expire when idle."""

    def __init__(self, config: ClientsConfig, client=None):
        super().__init__(config, client, label="limiter", logger=log)
        self._admit = self.redis.register_script(ADMIT_LUA)
        self._observe = self.redis.register_script(OBSERVE_LUA)
        s, lim, mlim = config.suspicion, config.limits, config.model_limits
        eps = s.throttle_at / 100
        self._admit_args = (lim.rps if lim else 0, lim.burst if lim else 0,
                            mlim.rps if mlim else 0, mlim.burst if mlim else 0,
                            s.throttled_rps, s.throttled_burst, s.half_life_s, s.throttle_at, eps)
        self._observe_args = (s.half_life_s, s.throttle_at, s.block_at, s.block_cooldown_s, eps)

    def keys(self, identity: str, model: str) -> tuple[str, str]:
        base = self.client_key(identity)
        return base, f"{base}:m:{key_hash(model)}"

    async def admit(self, identity: str, model: str):
        return await self._call(self._admit, self.keys(identity, model), self._admit_args)

    async def observe(self, identity: str, added: float):
        keys = (self.keys(identity, "")[0],)
        return await self._call(self._observe, keys, (added, *self._observe_args))


# ---- the guard -------------------------------------------------------------------------------
class ClientGuard:
    """``admit`` before a request is inspected, ``observe`` after, with its reasons."""

    def __init__(self, config: ClientsConfig, clock: Callable[[], float] = time.monotonic,
                 redis_client=None):
        self.config = config
        self.weights = _Weights(config.suspicion)
        self.memory = MemoryBackend(config, clock)
        self.redis = RedisBackend(config, redis_client) if config.backend == "redis" else None

    def suspicion(self, reasons, stages) -> float:
        """What one request adds to its client's score."""
        return self.weights.total(reasons, stages)

    async def admit(self, identity: str, model: str) -> Admission:
        if self.redis is None:
            return self.memory.admit(identity, model)
        try:
            result = await self.redis.admit(identity, model)
        except BackendUnavailable:
            if self.config.on_backend_error == "closed":
                return Admission(False, self.memory.state(identity)[0],
                                 max(1, self.config.redis.retry_after_failure_ms),
                                 "backend_unavailable", None, "redis")
            return self.memory.admit(identity, model, backend="fallback")
        allowed, tier, retry, reason, old, score, left = result
        tier, old, score, left = int(tier), int(old), float(score), float(left)
        self.memory.sync(identity, tier, score, left)
        change = TierChange(TIERS[old], TIERS[tier], score) if old != tier else None
        retry_ms = self.memory._ms(float(retry)) if not int(allowed) else 0
        return Admission(bool(int(allowed)), TIERS[tier], retry_ms, _REASON_CODES[int(reason)],
                         change, "redis")

    async def observe(self, identity: str, model: str, reasons, stages) -> TierChange | None:
        """Add this request's suspicion; a TierChange when the client's tier moved. Requests
        that add nothing do not touch the backend (admit reports tiers falling with decay)."""
        added = self.weights.total(reasons, stages)
        if added <= 0:
            return None
        return await self._add(identity, added)

    async def credit(self, identity: str) -> TierChange | None:
        """One answered request: ``request_credit`` off the client's score (never below 0).
        Called when the answer is complete, so credits and refusals land in the order requests
        finish (a burst of concurrent requests earns its credits beside its refusals). Skipped,
        with no backend call, while the score this replica last saw is 0."""
        credit = self.config.suspicion.request_credit
        if credit <= 0 or self.memory.state(identity)[1] <= 0:
            return None
        return await self._add(identity, -credit)

    async def _add(self, identity: str, added: float) -> TierChange | None:
        if self.redis is None:
            return self.memory.observe(identity, added)
        try:
            old, tier, score, left = await self.redis.observe(identity, added)
        except BackendUnavailable:
            return self.memory.observe(identity, added)
        old, tier, score, left = int(old), int(tier), float(score), float(left)
        self.memory.sync(identity, tier, score, left)
        return TierChange(TIERS[old], TIERS[tier], score) if old != tier else None

    async def close(self) -> None:
        if self.redis is not None:
            await self.redis.close()

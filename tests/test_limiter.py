"""ClientGuard, memory backend: buckets, suspicion decay, tiers, cool-down, LRU bound, and a
simulated mix of benign clients and one attacker. An injectable clock: no sleeps."""
from __future__ import annotations

import asyncio
import heapq
import random
import tracemalloc

import grpc
import pytest
from pydantic import ValidationError

from bastion.proxy.limiter import Admission, ClientGuard, ClientsConfig, refusal


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def run(coro):
    return asyncio.run(coro)


def guard(clock: Clock, **config) -> ClientGuard:
    return ClientGuard(ClientsConfig(**config), clock=clock)


async def admits(g: ClientGuard, n: int, identity="c", model="m") -> list[Admission]:
    return [await g.admit(identity, model) for _ in range(n)]


# ---- token buckets ---------------------------------------------------------------------------
def test_bucket_burst_then_rate():
    clock = Clock()
    g = guard(clock, limits={"rps": 2.0, "burst": 5})

    async def scenario():
        first = await admits(g, 6)
        assert [a.allowed for a in first] == [True] * 5 + [False]
        denied = first[-1]
        assert denied.reason == "rate_limit" and denied.tier == "normal"
        assert denied.retry_after_ms == 500            # one token at 2 rps
        clock.advance(0.25)
        assert not (await g.admit("c", "m")).allowed   # half a token
        clock.advance(0.25)
        assert (await g.admit("c", "m")).allowed
        assert not (await g.admit("c", "m")).allowed
        # Long idle: refilled to the burst, not beyond.
        clock.advance(3600)
        assert sum(a.allowed for a in await admits(g, 20)) == 5
        # Sustained rate: over 10 s at 10 attempts/s, 2 rps gets through.
        clock.advance(3600)
        await admits(g, 5)                              # drain the burst
        allowed = 0
        for _ in range(100):
            clock.advance(0.1)
            allowed += (await g.admit("c", "m")).allowed
        assert allowed == 20
        # Clients do not share buckets.
        assert (await g.admit("other", "m")).allowed

    run(scenario())


def test_model_bucket_and_client_bucket_are_both_needed():
    clock = Clock()
    g = guard(clock, limits={"rps": 1.0, "burst": 4}, model_limits={"rps": 1.0, "burst": 2})

    async def scenario():
        got = await admits(g, 3, model="a")
        assert [a.allowed for a in got] == [True, True, False]
        assert got[-1].reason == "model_rate_limit" and got[-1].retry_after_ms == 1000
        # The refused request took no client token: model b still gets the client's last two.
        got = await admits(g, 3, model="b")
        assert [a.allowed for a in got] == [True, True, False]
        assert got[-1].reason == "rate_limit"

    run(scenario())


def test_no_limits_configured_admits_everything():
    g = guard(Clock())
    assert all(a.allowed for a in run(admits(g, 1000)))


# ---- suspicion -------------------------------------------------------------------------------
def test_weights_longest_prefix_stage_outcomes_and_shadow():
    g = guard(Clock(), suspicion={"weights": {"signature:": 1.0, "signature:jailbreak": 3.0,
                                              "detect.perplexity": 2.0, "malformed": 0.5}})
    assert g.suspicion(["signature:ignore_previous"], {}) == 1.0
    assert g.suspicion(["signature:jailbreak_dan"], {}) == 3.0
    assert g.suspicion(["shadow:signature:x"], {}) == 0.0         # shadow stages do not act
    assert g.suspicion(["malformed"], {}) == 0.5
    assert g.suspicion([], {"detect.perplexity": "flag"}) == 2.0
    assert g.suspicion([], {"detect.perplexity": "allow"}) == 0.0
    assert g.suspicion(["signature:a", "signature:b"], {"detect.perplexity": "block"}) == 4.0


def test_suspicion_decays_with_half_life():
    clock = Clock()
    g = guard(clock, suspicion={"weights": {"x": 8.0}, "half_life_s": 60, "throttle_at": 100,
                                "block_at": 100})

    async def scenario():
        await g.observe("c", "m", ["x"], {})
        assert g.memory.state("c")[1] == pytest.approx(8.0)
        clock.advance(60)
        assert g.memory.state("c")[1] == pytest.approx(4.0)
        clock.advance(60)
        assert g.memory.state("c")[1] == pytest.approx(2.0)
        await g.observe("c", "m", ["x"], {})                     # 2 + 8
        clock.advance(30)
        assert g.memory.state("c")[1] == pytest.approx(10.0 * 2 ** -0.5)

    run(scenario())


def test_tiers_go_up_and_back_down():
    clock = Clock()
    g = guard(clock, limits={"rps": 10, "burst": 10},
              suspicion={"weights": {"signature:": 1.0}, "half_life_s": 10, "throttle_at": 3,
                         "block_at": 100, "throttled_rps": 0.5, "throttled_burst": 1})

    async def scenario():
        changes = [await g.observe("c", "m", ["signature:a"], {}) for _ in range(3)]
        assert changes[:2] == [None, None]
        assert (changes[2].old, changes[2].new) == ("normal", "throttled")
        assert changes[2].score == pytest.approx(3.0)
        # Throttled: one request per 2 s, burst 1, whatever limits.rps says.
        got = await admits(g, 3)
        assert [a.allowed for a in got] == [True, False, False]
        assert got[1].tier == "throttled" and got[1].reason == "rate_limit"
        assert got[1].retry_after_ms == 2000
        # A benign observation adds nothing and reports nothing.
        assert await g.observe("c", "m", [], {"detect.perplexity": "allow"}) is None
        # The score decays below throttle_at (3 -> 2.98 after 0.1 s): admit reports the move.
        clock.advance(0.1)
        back = await g.admit("c", "m")
        assert back.tier == "normal" and back.change is not None
        assert (back.change.old, back.change.new) == ("throttled", "normal")
        assert (await g.admit("c", "m")).change is None         # reported once

    run(scenario())


def test_blocked_for_the_cool_down_then_back_down():
    clock = Clock()
    g = guard(clock, suspicion={"weights": {"signature:": 5.0}, "half_life_s": 60,
                                "throttle_at": 5, "block_at": 10, "block_cooldown_s": 30})

    async def scenario():
        assert (await g.observe("c", "m", ["signature:a"], {})).new == "throttled"
        change = await g.observe("c", "m", ["signature:a"], {})
        assert (change.old, change.new) == ("throttled", "blocked")
        refused = await g.admit("c", "m")
        assert not refused.allowed and refused.reason == "tier_blocked"
        assert refused.retry_after_ms == 30_000
        clock.advance(29.9)
        refused = await g.admit("c", "m")
        assert not refused.allowed and refused.retry_after_ms == 100
        # Cool-down over; the score (10 * 2^-0.5 = 7.1) is still over throttle_at: throttled.
        clock.advance(0.1)
        after = await g.admit("c", "m")
        assert after.allowed and after.tier == "throttled"
        assert (after.change.old, after.change.new) == ("blocked", "throttled")
        # On probation: the next suspicious request blocks again at once.
        change = await g.observe("c", "m", ["signature:a"], {})
        assert change.new == "blocked"
        clock.advance(30)
        assert (await g.admit("c", "m")).tier == "throttled"
        # Quiet for a few half-lives: normal.
        clock.advance(240)
        last = await g.admit("c", "m")
        assert last.tier == "normal" and last.change.new == "normal"

    run(scenario())


def test_refusal_statuses_and_retry_after_trailer():
    blocked = Admission(False, "blocked", 30_000, "tier_blocked")
    code, details, trailers = refusal(blocked, "req-1")
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert ("retry-after-ms", "30000") in trailers and ("bastion-request-id", "req-1") in trailers
    code, _, trailers = refusal(Admission(False, "throttled", 2000, "rate_limit"), "r")
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and ("retry-after-ms", "2000") in trailers
    code, _, _ = refusal(Admission(False, "normal", 1000, "backend_unavailable"), "r")
    assert code == grpc.StatusCode.UNAVAILABLE


def test_config_is_strict():
    with pytest.raises(ValidationError):
        ClientsConfig(limit={"rps": 1, "burst": 1})                     # misspelt key
    with pytest.raises(ValidationError, match="block_at must be >= throttle_at"):
        ClientsConfig(suspicion={"throttle_at": 10, "block_at": 5})
    with pytest.raises(ValidationError, match="throttled_rps must not exceed"):
        ClientsConfig(limits={"rps": 1, "burst": 1}, suspicion={"throttled_rps": 5})
    with pytest.raises(ValidationError):
        ClientsConfig(suspicion={"weights": {"x": -1.0}})
    with pytest.raises(ValidationError):
        ClientsConfig(backend="memcached")


# ---- memory bound ----------------------------------------------------------------------------
def test_lru_cap_holds_with_100k_distinct_clients():
    clock = Clock()
    cap = 10_000
    g = guard(clock, max_clients=cap, limits={"rps": 1, "burst": 2},
              model_limits={"rps": 1, "burst": 2}, suspicion={"weights": {"s": 1.0}})

    async def flood():
        for i in range(100_000):
            clock.advance(0.001)
            await g.admit(f"client-{i}", "m")
            if i % 10 == 0:
                await g.observe(f"client-{i}", "m", ["s"], {})

    tracemalloc.start()
    try:
        run(flood())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"\nLRU: 100000 clients through a cap of {cap}: {len(g.memory.clients)} clients, "
          f"{len(g.memory.buckets)} model buckets kept; tracemalloc peak {peak / 2**20:.2f} MiB")
    assert len(g.memory.clients) == cap and len(g.memory.buckets) == cap
    assert "client-99999" in g.memory.clients and "client-0" not in g.memory.clients
    assert "client-89999" not in g.memory.clients and "client-90000" in g.memory.clients
    assert peak < 16 * 2**20, f"peak {peak} bytes for {cap} clients"


def test_lru_touch_keeps_a_client():
    g = guard(Clock(), max_clients=3, suspicion={"weights": {"s": 1.0}})

    async def scenario():
        for name in "abc":
            await g.admit(name, "m")
        await g.admit("a", "m")          # a is now the most recent
        await g.admit("d", "m")          # evicts b
        assert list(g.memory.clients) == ["c", "a", "d"]

    run(scenario())


# ---- simulation ------------------------------------------------------------------------------
SIM_BENIGN = 50
SIM_SECONDS = 600.0
ATTACKER_RPS = 20.0
# Bounds asserted below: the attacker is blocked after at most this many requests it sends
# (refused ones included), of which at most MAX_ADMITTED_BEFORE_BLOCK reach the model.
MAX_REQUESTS_TO_BLOCK = 300
MAX_ADMITTED_BEFORE_BLOCK = 20
SIM_CONFIG = {
    "limits": {"rps": 10, "burst": 20},
    "suspicion": {"weights": {"signature:": 1.0, "detect.perplexity": 1.0, "malformed": 0.5},
                  "half_life_s": 60, "throttle_at": 5, "block_at": 15, "throttled_rps": 1,
                  "throttled_burst": 1, "block_cooldown_s": 300},
}


def simulate(seed: int = 7) -> dict:
    """50 benign clients (Poisson, 0.2-2 rps; 0.2% of their requests flagged by the perplexity
    detector and 0.2% malformed: false positives) and one attacker at 20 rps whose every inspected
    request carries a signature reason. Refused requests are not inspected (not observed)."""
    rng = random.Random(seed)
    clock = Clock(0.0)
    g = ClientGuard(ClientsConfig(**SIM_CONFIG), clock=clock)
    rates = {f"benign-{i}": rng.uniform(0.2, 2.0) for i in range(SIM_BENIGN)}
    events = [(rng.expovariate(r), name) for name, r in rates.items()]
    events.append((0.0, "attacker"))
    heapq.heapify(events)
    stats = {"benign_requests": 0, "benign_refused": 0, "benign_not_normal": 0,
             "benign_false_positives": 0, "benign_max_score": 0.0, "attacker_requests": 0,
             "attacker_admitted": 0, "attacker_admitted_after_block": 0,
             "requests_to_block": None, "admitted_to_block": None, "seconds_to_block": None,
             "attacker_tiers": []}

    async def loop():
        while events:
            t, name = heapq.heappop(events)
            if t > SIM_SECONDS:
                break
            clock.t = t
            admission = await g.admit(name, "fashion-mnist")
            if name == "attacker":
                stats["attacker_requests"] += 1
                heapq.heappush(events, (t + 1 / ATTACKER_RPS, name))
                if admission.allowed:
                    stats["attacker_admitted"] += 1
                    if stats["requests_to_block"] is not None:
                        stats["attacker_admitted_after_block"] += 1
                    change = await g.observe(name, "fashion-mnist",
                                             ["signature:ignore_previous"], {"signature": "block"})
                    if change is not None:
                        stats["attacker_tiers"].append((round(t, 2), change.new))
                        if change.new == "blocked" and stats["requests_to_block"] is None:
                            stats["requests_to_block"] = stats["attacker_requests"]
                            stats["admitted_to_block"] = stats["attacker_admitted"]
                            stats["seconds_to_block"] = t
                continue
            stats["benign_requests"] += 1
            heapq.heappush(events, (t + rng.expovariate(rates[name]), name))
            if not admission.allowed:
                stats["benign_refused"] += 1
            if admission.tier != "normal":
                stats["benign_not_normal"] += 1
            reasons, stages = [], {}
            draw = rng.random()
            if draw < 0.002:
                reasons, stages = ["perplexity:high"], {"detect.perplexity": "flag"}
            elif draw < 0.004:
                reasons = ["malformed"]
            if reasons:
                stats["benign_false_positives"] += 1
            if admission.allowed:
                change = await g.observe(name, "fashion-mnist", reasons, stages)
                if change is not None:
                    stats["benign_not_normal"] += 1
                stats["benign_max_score"] = max(stats["benign_max_score"],
                                                g.memory.state(name)[1])

    run(loop())
    stats["attacker_final_tier"] = g.memory.state("attacker")[0]
    return stats


def test_simulation_attacker_blocked_benign_untouched():
    stats = simulate()
    print("\nsimulation:", {k: v for k, v in stats.items() if k != "attacker_tiers"})
    print("attacker tier changes (t, tier):", stats["attacker_tiers"][:12])
    assert stats["requests_to_block"] is not None, "the attacker was never blocked"
    assert stats["requests_to_block"] <= MAX_REQUESTS_TO_BLOCK
    assert stats["admitted_to_block"] <= MAX_ADMITTED_BEFORE_BLOCK
    # Blocked for the cool-down, then on probation: re-blocked by its next request.
    assert stats["attacker_final_tier"] in ("blocked", "throttled")
    assert stats["attacker_admitted"] < stats["attacker_requests"] * 0.01
    assert stats["benign_requests"] > 20_000 and stats["benign_false_positives"] > 0
    assert stats["benign_refused"] == 0
    assert stats["benign_not_normal"] == 0, "a benign client was throttled"


# ---- request credit: the score follows the share of suspicious requests ----------------------
CREDIT = {"weights": {"anomaly:": 1.0}, "request_credit": 0.1, "throttle_at": 10.0,
          "block_at": 20.0, "half_life_s": 3600, "throttled_rps": 1000.0,
          "throttled_burst": 1000}


async def refused_share_walk(g: ClientGuard, identity: str, share: float, n: int,
                             clock: Clock, seed: int = 0) -> tuple[int | None, float]:
    """n requests 10 ms apart, a ``share`` of them refused by a stage and the others answered;
    returns (the request at which the client was first not admitted, or None; its highest
    score)."""
    rng = random.Random(seed)
    top = 0.0
    for i in range(n):
        clock.advance(0.01)
        if not (await g.admit(identity, "m")).allowed:
            return i, top
        if rng.random() < share:
            await g.observe(identity, "m", ["anomaly:ensemble"], {})
        else:
            await g.credit(identity)  # answered
        top = max(top, g.memory.state(identity)[1])
    return None, top


def test_request_credit_lets_a_busy_benign_client_be_and_stops_a_prober():
    clock = Clock()
    g = guard(clock, suspicion=CREDIT)

    async def scenario():
        # Benign: 4 % refused (the image profile's clean rate) over 5,000 requests: the score
        # never nears the throttle tier. Without credit the same client is blocked.
        blocked_at, top = await refused_share_walk(g, "benign", 0.04, 5000, clock)
        assert blocked_at is None and top < CREDIT["throttle_at"]
        no_credit = guard(clock, suspicion=dict(CREDIT, request_credit=0.0))
        blocked_at, _ = await refused_share_walk(no_credit, "benign", 0.04, 5000, clock)
        assert blocked_at is not None and blocked_at < 1000
        # A black-box prober refused 25 % of the time climbs (+0.25 - 0.075 a request).
        blocked_at, _ = await refused_share_walk(g, "prober", 0.25, 5000, clock, seed=1)
        assert blocked_at is not None and blocked_at < 300

    run(scenario())


def test_request_credit_never_takes_the_score_below_zero():
    clock = Clock()
    g = guard(clock, suspicion=CREDIT)

    async def scenario():
        assert await g.credit("c") is None and g.memory.state("c")[1] == 0.0
        await g.observe("c", "m", ["anomaly:x"], {})
        for _ in range(3):
            await g.credit("c")
        assert g.memory.state("c")[1] == pytest.approx(0.7)
        for _ in range(20):
            await g.credit("c")
        assert g.memory.state("c")[1] == 0.0
        # Admissions alone earn nothing: the credit is for answers.
        await g.observe("c", "m", ["anomaly:x"], {})
        await admits(g, 5, "c")
        assert g.memory.state("c")[1] == pytest.approx(1.0)
        with pytest.raises(ValidationError):
            ClientsConfig(suspicion=dict(CREDIT, request_credit=-0.1))

    run(scenario())

"""Latency ClientGuard adds per request: admit() + observe(), memory and Redis backends.

Each call is timed on its own (perf_counter_ns) inside one asyncio event loop; p50 and p99 are
reported in microseconds and as ratios to an empty ``await noop()`` measured the same way in the
same run. Cases: a benign request (observe adds no suspicion: no backend call) and a suspicious
one (one weighted reason: observe updates the score). Clients rotate over ``--clients`` ids so
the LRU and the Redis keyspace are exercised. The Redis backend talks to a real redis-server
started here on a free loopback port (and stopped by its PID).

    python bench/bench_limiter.py [--calls 20000] [--redis-calls 3000] [--clients 1000] [--json OUT]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import platform
import shutil
import socket
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bastion.demo import stop_process  # noqa: E402
from bastion.proxy.identity import resolve_identity  # noqa: E402
from bastion.proxy.limiter import ClientGuard, ClientsConfig  # noqa: E402

CONFIG = {
    "limits": {"rps": 1e6, "burst": 1_000_000},
    "model_limits": {"rps": 1e6, "burst": 1_000_000},
    "suspicion": {"weights": {"signature:": 1e-6}, "throttle_at": 1e6, "block_at": 1e7,
                  "throttled_rps": 1.0},
}


def percentile(sorted_ns: list[int], q: float) -> float:
    return sorted_ns[min(len(sorted_ns) - 1, int(q * len(sorted_ns)))] / 1000.0


async def timed(calls: int, body) -> list[int]:
    for i in range(min(500, calls)):                      # warm-up
        await body(i)
    samples = []
    clock = time.perf_counter_ns
    for i in range(calls):
        start = clock()
        await body(i)
        samples.append(clock() - start)
    samples.sort()
    return samples


async def noop(_i: int) -> None:
    return None


class FakeContext:
    def peer(self):
        return "ipv4:10.0.0.5:443"

    def invocation_metadata(self):
        return (("x-api-key", "sk-live-0123456789abcdef"), ("user-agent", "grpc-python"))

    def auth_context(self):
        return {}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_redis() -> tuple[subprocess.Popen, int]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server not found (apt-get install redis-server)")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("redis-server did not start")


async def measure(args) -> list[dict]:
    rows = []
    ids = [f"client-{i}" for i in range(args.clients)]

    def case(backend: str, name: str, samples: list[int]) -> None:
        rows.append({"backend": backend, "case": name, "calls": len(samples),
                     "p50_us": percentile(samples, 0.50), "p99_us": percentile(samples, 0.99)})

    case("-", "empty async call (baseline)", await timed(args.calls, noop))

    clients_cfg = ClientsConfig(identity=["header:x-api-key", "peer"],
                                key_secret_env="BENCH_KEY_SECRET")
    os.environ.setdefault("BENCH_KEY_SECRET", "bench")
    context = FakeContext()

    async def identity(_i):
        resolve_identity(context, clients_cfg)

    case("-", "resolve_identity (header + peer)", await timed(args.calls, identity))

    async def run_backend(guard: ClientGuard, backend: str, calls: int) -> None:
        async def benign(i):
            who = ids[i % len(ids)]
            await guard.admit(who, "fashion-mnist")
            await guard.observe(who, "fashion-mnist", [], {"validate": "allow"})

        async def suspicious(i):
            who = ids[i % len(ids)]
            await guard.admit(who, "fashion-mnist")
            await guard.observe(who, "fashion-mnist", ["signature:ignore_previous"],
                                {"signature": "flag"})

        case(backend, "admit + observe, benign (no suspicion)", await timed(calls, benign))
        case(backend, "admit + observe, suspicious (score update)", await timed(calls, suspicious))

    memory = ClientGuard(ClientsConfig(**CONFIG, max_clients=100_000))
    await run_backend(memory, "memory", args.calls)

    proc, port = start_redis()
    try:
        guard = ClientGuard(ClientsConfig(**CONFIG, backend="redis",
                                          redis={"url": f"redis://127.0.0.1:{port}/0",
                                                 "timeout_ms": 50}))
        try:
            await run_backend(guard, "redis", args.redis_calls)
            assert guard.redis.failures == 0, "Redis calls failed during the benchmark"
        finally:
            await guard.close()
    finally:
        stop_process(proc)
    base = rows[0]
    for row in rows:
        row["p50_ratio"] = row["p50_us"] / base["p50_us"]
        row["p99_ratio"] = row["p99_us"] / base["p99_us"]
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| backend | case | calls | p50 (us) | p99 (us) | p50 / baseline | p99 / baseline |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['backend']} | {r['case']} | {r['calls']} | {r['p50_us']:.2f} | "
                     f"{r['p99_us']:.2f} | {r['p50_ratio']:.0f}x | {r['p99_ratio']:.0f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--redis-calls", type=int, default=3_000)
    parser.add_argument("--clients", type=int, default=1_000)
    parser.add_argument("--json", type=pathlib.Path)
    args = parser.parse_args()
    rows = asyncio.run(measure(args))
    print(f"ClientGuard latency, Python {platform.python_version()}, {platform.machine()}, "
          f"asyncio event loop, redis-server on loopback, {args.clients} client ids\n")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

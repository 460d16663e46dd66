"""Overload: the sidecar at 4x its capacity, with `detect.perplexity` (the bundled tiny LM)
behind a bounded queue. Real processes on loopback: `bastion upstream` and `bastion serve`.

    python bench/bench_overload.py [--tokens 32] [--max-queue 64] [--factor 4] \\
        [--seconds 5] [--no-unbounded] [--json out.json]

1. **capacity**: 32 closed-loop clients for ``--seconds``: OK answers per second (C) and their
   latency p50 / p99.
2. **overload**: an open loop offering ``--factor`` x C requests per second for ``--seconds``
   (arrivals do not wait for answers; bounded: factor x C x seconds requests in all). Every
   request's status is counted; admitted (OK) requests' latency p50 / p99 / max; the sidecar's
   RSS sampled every 0.5 s (start, peak, end) and bastion_shed_requests_total.
3. the same overload against a sidecar whose queue is unbounded (max_queue 10^9), unless
   ``--no-unbounded``: what the bound buys.

Without the bound the queue (and every request's latency, and memory) grows for as long as the
overload lasts; with it, admitted requests wait at most about max_queue / max_batch + 1 batch
times and the rest end RESOURCE_EXHAUSTED at once. Wall-clock numbers on a shared machine:
compare within one run.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bastion import traffic  # noqa: E402
from bastion.options import add_options  # noqa: E402
from bastion.protos import SERVICE  # noqa: E402
from tests.harness import Sidecar, Upstream  # noqa: E402

CONFIG = """
models:
  text-classifier:
    mode: enforce
    pipeline:
      - detect.perplexity: {{id: ppl, max_batch: {max_batch}, max_queue: {max_queue}}}
"""


def prompt(tokens: int, i: int) -> bytes:
    words = ("the committee will review each proposal before the end of the month and report "
             "its findings to the board ").split()
    text = f"request {i}: " + " ".join(words[j % len(words)] for j in range(tokens))
    return traffic.text_request(text).SerializeToString()


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def shed_total(admin: str) -> float:
    text = urllib.request.urlopen(f"http://{admin}/metrics", timeout=5).read().decode()
    return sum(float(v) for v in re.findall(r"^bastion_shed_requests_total\{[^}]*\} (\S+)$",
                                            text, re.M))


async def capacity(address: str, tokens: int, seconds: float, clients: int = 32):
    latencies: list[float] = []
    codes: collections.Counter = collections.Counter()
    deadline = time.monotonic() + seconds
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(f"/{SERVICE}/ModelInfer")

        async def client(k: int) -> None:
            i = 0
            while time.monotonic() < deadline:
                started = time.perf_counter()
                try:
                    await call(prompt(tokens, k * 100000 + i), timeout=30)
                    latencies.append(time.perf_counter() - started)
                    codes["OK"] += 1
                except grpc.aio.AioRpcError as err:
                    codes[err.code().name] += 1
                i += 1
        started = time.monotonic()
        await asyncio.gather(*(client(k) for k in range(clients)))
        elapsed = time.monotonic() - started
    return codes["OK"] / elapsed, latencies, codes


async def overload(address: str, tokens: int, rate: float, seconds: float):
    latencies: list[float] = []
    codes: collections.Counter = collections.Counter()
    count = int(rate * seconds)
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(f"/{SERVICE}/ModelInfer")

        async def one(i: int) -> None:
            started = time.perf_counter()
            try:
                await call(prompt(tokens, i), timeout=30)
                latencies.append(time.perf_counter() - started)
                codes["OK"] += 1
            except grpc.aio.AioRpcError as err:
                codes[err.code().name] += 1
        tasks = []
        start = time.monotonic()
        for i in range(count):                       # open loop, paced by the clock
            due = start + i / rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
    return count, latencies, codes


def run_overload(upstream, max_batch: int, max_queue: int, tokens: int, offered: float,
                 seconds: float) -> dict:
    sidecar = Sidecar(upstream.address, config=CONFIG.format(max_batch=max_batch,
                                                             max_queue=max_queue))
    try:
        pid = sidecar.proc.pid
        asyncio.run(capacity(sidecar.address, tokens, 1.0, clients=4))     # warm-up
        rss = [rss_mb(pid)]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.5):
                rss.append(rss_mb(pid))
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        shed_before = shed_total(sidecar.admin)
        count, lat, codes = asyncio.run(overload(sidecar.address, tokens, offered, seconds))
        stop.set()
        sampler.join()
        rss.append(rss_mb(pid))
        shed = shed_total(sidecar.admin) - shed_before
    finally:
        sidecar.stop()
    return {
        "max_queue": max_queue, "offered_rps": round(offered, 1), "requests": count,
        "codes": dict(codes), "explicit_statuses": sum(codes.values()) == count,
        "admitted_p50_ms": round(1000 * pct(lat, 0.5), 1),
        "admitted_p99_ms": round(1000 * pct(lat, 0.99), 1),
        "admitted_max_ms": round(1000 * max(lat), 1) if lat else None,
        "shed_metric": shed,
        "rss_mb_start_peak_end": [round(rss[0], 1), round(max(rss), 1), round(rss[-1], 1)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_options(parser, tokens=32, max_batch=16, max_queue=64, factor=4.0, seconds=5.0)
    parser.add_argument("--no-unbounded", action="store_true",
                        help="skip the comparison run with an unbounded queue")
    parser.add_argument("--json")
    args = parser.parse_args()

    upstream = Upstream()
    try:
        sidecar = Sidecar(upstream.address, config=CONFIG.format(max_batch=args.max_batch,
                                                                 max_queue=args.max_queue))
        try:
            rate_ok, cap_lat, cap_codes = asyncio.run(capacity(sidecar.address, args.tokens,
                                                               args.seconds))
        finally:
            sidecar.stop()
        offered = args.factor * rate_ok
        runs = [run_overload(upstream, args.max_batch, args.max_queue, args.tokens, offered,
                             args.seconds)]
        if not args.no_unbounded:       # the same load without the bound, for comparison
            runs.append(run_overload(upstream, args.max_batch, 10**9, args.tokens, offered,
                                     args.seconds))
    finally:
        upstream.stop()

    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                   f"load average {os.getloadavg()[0]:.1f}",
        "tokens": args.tokens, "max_batch": args.max_batch, "factor": args.factor,
        "seconds": args.seconds,
        "capacity_rps": round(rate_ok, 1),
        "capacity_p50_ms": round(1000 * pct(cap_lat, 0.5), 1),
        "capacity_p99_ms": round(1000 * pct(cap_lat, 0.99), 1),
        "capacity_codes": dict(cap_codes),
        "overload": runs,
    }
    print(json.dumps(result, indent=2))
    print(f"\ncapacity {result['capacity_rps']} req/s (32 closed-loop clients, p99 "
          f"{result['capacity_p99_ms']} ms); offered {runs[0]['offered_rps']} req/s for "
          f"{args.seconds} s\n")
    print("| max_queue | OK | RESOURCE_EXHAUSTED | other | admitted p50 / p99 / max (ms) | "
          "RSS start / peak / end (MB) |\n|---|---:|---:|---:|---|---|")
    for run in runs:
        codes = run["codes"]
        other = sum(v for k, v in codes.items() if k not in ("OK", "RESOURCE_EXHAUSTED"))
        bound = "unbounded" if run["max_queue"] >= 10**9 else run["max_queue"]
        print(f"| {bound} | {codes.get('OK', 0)} | {codes.get('RESOURCE_EXHAUSTED', 0)} | "
              f"{other} | {run['admitted_p50_ms']} / {run['admitted_p99_ms']} / "
              f"{run['admitted_max_ms']} | "
              f"{' / '.join(str(v) for v in run['rss_mb_start_peak_end'])} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory():
        main()

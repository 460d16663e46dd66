"""Bounded soak: mixed benign, attack and malformed traffic through the sidecar, watching memory,
file descriptors and statuses.

    python bench/soak.py [--duration 600] [--concurrency 16] [--clients 5000]

Starts `bastion upstream` and `bastion serve` with the demo pipelines (the models of
bastion/demo.py's DEMO_CONFIG) plus per-client limits keyed on the ``x-client-id`` header, then
drives a closed loop of ``--concurrency`` calls in flight for ``--duration`` seconds: each call is
a labelled record from bastion.traffic (benign images and prompts, attack prompts, ~10% malformed
requests) sent with a random client id from a pool of ``--clients``. Every ``--sample-every``
seconds the sidecar's RSS, open fds and threads are read from /proc.

Fails (exit 1) when:
  * any status is unexpected: OK, PERMISSION_DENIED (a blocked attack, or a benign prompt a
    defense flagged, which is reported) and RESOURCE_EXHAUSTED (only if the limits are hit) for
    well-formed traffic; INVALID_ARGUMENT for malformed traffic only;
  * RSS at the end exceeds RSS after the warm-up by 10% or more;
  * open fds at the end exceed those after the warm-up (2 of slack for a connection being
    replaced);
  * the sidecar dies, or does not exit 0 on SIGTERM.
Prints a Markdown report (rate, latency, statuses, RSS over time).
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import os
import pathlib
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time

import grpc
import yaml

from bastion import traffic
from bastion.demo import demo_config
from bastion.protos import SERVICE

MODEL_INFER = f"/{SERVICE}/ModelInfer"
EXPECTED = {
    "benign": {"OK", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED"},
    "attack": {"OK", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED"},
    "malformed": {"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"},
}
RSS_GROWTH_LIMIT = 0.10
FD_SLACK = 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def soak_config(listen: str, admin: str, upstream: str, workdir: pathlib.Path) -> str:
    demo = yaml.safe_load(demo_config(listen, admin, upstream, workdir / "audit.jsonl"))
    config = {
        "listen": listen, "admin": admin,
        "upstream": demo["upstream"],
        # Bounded on disk: the audit log rotates at 5 MB, two backups.
        "audit": {"output": str(workdir / "audit.jsonl"), "max_bytes": 5 * 1024 * 1024,
                  "backup_count": 2},
        "shutdown": {"drain_delay_s": 0, "grace_s": 5},
        "clients": {"identity": ["header:x-client-id", "peer"],
                    "limits": {"rps": 1000, "burst": 2000}},
        "models": demo["models"],
    }
    return yaml.safe_dump(config, sort_keys=False)


class Child:
    def __init__(self, name: str, args: list[str], workdir: pathlib.Path, marker: str):
        self.name = name
        self.log_path = workdir / f"{name}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "bastion", *args], stdout=self.log,
                                     stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + 90
        while marker not in self.log_path.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{name} did not start:\n{self.tail()}")
            time.sleep(0.1)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self, grace: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()
        return self.proc.returncode


def sample(pid: int) -> dict:
    status = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            status[key] = value.strip()
    return {"rss_kb": int(status["VmRSS"].split()[0]), "threads": int(status["Threads"]),
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


class Load:
    def __init__(self):
        self.statuses: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.families: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.latencies_ms: list[float] = []
        self.sent = 0
        self.samples: list[dict] = []
        self.unexpected_examples: list[str] = []


async def drive(target: str, duration_s: float, concurrency: int, client_pool: list[str],
                sidecar: Child, sample_every: float, load: Load, seed: int) -> None:
    records = traffic.labelled_records()
    stream = traffic.mixed_stream(records, seed=seed)
    rng = random.Random(seed)
    started = time.monotonic()
    stop_at = started + duration_s

    async with grpc.aio.insecure_channel(target) as channel:
        infer = channel.unary_unary(MODEL_INFER)

        async def worker() -> None:
            while time.monotonic() < stop_at:
                record = next(stream)
                client = rng.choice(client_pool)
                t0 = time.perf_counter()
                try:
                    await infer(record.payload, timeout=10, metadata=(("x-client-id", client),))
                    code, details = "OK", ""
                except grpc.aio.AioRpcError as err:
                    code, details = err.code().name, err.details() or ""
                load.latencies_ms.append((time.perf_counter() - t0) * 1000)
                load.sent += 1
                load.statuses[record.label][code] += 1
                if code == "PERMISSION_DENIED" and record.label == "benign":
                    load.families["benign blocked"][record.family] += 1
                if code not in EXPECTED[record.label] and len(load.unexpected_examples) < 20:
                    load.unexpected_examples.append(
                        f"{record.label}/{record.family}: {code} {details[:160]!r}")

        async def sampler() -> None:
            while time.monotonic() < stop_at:
                if not sidecar.alive():
                    return
                load.samples.append({"t": time.monotonic() - started, "sent": load.sent,
                                     **sample(sidecar.pid)})
                await asyncio.sleep(sample_every)

        workers = [asyncio.create_task(worker()) for _ in range(concurrency)]
        watcher = asyncio.create_task(sampler())
        # Every call has a 10 s deadline, so the workers end by stop_at + 10 s.
        await asyncio.wait(workers + [watcher], timeout=duration_s + 30)
        for task in workers + [watcher]:
            task.cancel()
        if sidecar.alive():
            load.samples.append({"t": time.monotonic() - started, "sent": load.sent,
                                 **sample(sidecar.pid)})


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] if ordered else float("nan")


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def report(load: Load, args, warmup_s: float, elapsed: float, exit_code: int | None,
           alive: bool) -> tuple[str, list[str]]:
    failures = []
    lines = [f"# Bastion soak: {args.duration:.0f} s, {args.concurrency} in flight, "
             f"{args.clients} client ids", ""]
    rate = load.sent / max(elapsed, 1e-9)
    lines += [f"- requests: {load.sent} in {elapsed:.0f} s = **{rate:.0f} req/s** (closed loop)",
              f"- latency through the sidecar (client-side, all outcomes): p50 "
              f"{percentile(load.latencies_ms, 0.5):.1f} ms, p99 "
              f"{percentile(load.latencies_ms, 0.99):.1f} ms, max "
              f"{max(load.latencies_ms, default=float('nan')):.0f} ms",
              f"- machine: {os.cpu_count()} CPUs (shared by the load generator, the sidecar and "
              f"the upstream)", ""]
    codes = sorted({c for counter in load.statuses.values() for c in counter})
    lines += ["| traffic | sent | " + " | ".join(codes) + " |",
              "|---|---:|" + "---:|" * len(codes)]
    for label in ("benign", "attack", "malformed"):
        counter = load.statuses.get(label, collections.Counter())
        lines.append(f"| {label} | {sum(counter.values())} | "
                     + " | ".join(str(counter[c]) for c in codes) + " |")
        for code, count in counter.items():
            if code not in EXPECTED[label]:
                failures.append(f"{count} unexpected {code} for {label} traffic")
    if load.families:
        lines += ["", "benign requests a defense blocked (false positives), by family: "
                  + ", ".join(f"{f} {n}" for f, n in load.families["benign blocked"].items())]
    limited = sum(c["RESOURCE_EXHAUSTED"] for c in load.statuses.values())
    lines.append(f"\nRESOURCE_EXHAUSTED (limits hit): {limited}")
    if load.unexpected_examples:
        lines += ["", "unexpected statuses, first examples:"]
        lines += [f"- {example}" for example in load.unexpected_examples]

    # Memory and descriptors: warm-up samples vs the end.
    samples = load.samples
    after = [s for s in samples if s["t"] >= warmup_s]
    if len(after) >= 2:
        base = after[0]
        end = samples[-3:] if len(samples) >= 3 else samples[-1:]
        base_rss = mean(s["rss_kb"] for s in after[:2])
        end_rss = mean(s["rss_kb"] for s in end)
        growth = (end_rss - base_rss) / base_rss
        end_fds = samples[-1]["fds"]
        max_fds = max(s["fds"] for s in after)
        lines += ["", f"RSS after warm-up ({warmup_s:.0f} s) {base_rss / 1024:.1f} MiB, at the end "
                  f"{end_rss / 1024:.1f} MiB: growth **{growth * 100:+.1f}%** (limit "
                  f"{RSS_GROWTH_LIMIT * 100:.0f}%)",
                  f"open fds after warm-up {base['fds']}, at the end {end_fds}, max {max_fds}; "
                  f"threads after warm-up {base['threads']}, at the end {samples[-1]['threads']}"]
        if growth >= RSS_GROWTH_LIMIT:
            failures.append(f"RSS grew {growth * 100:.1f}% after warm-up")
        if end_fds > base["fds"] + FD_SLACK:
            failures.append(f"open fds grew from {base['fds']} to {end_fds}")
    else:
        failures.append("too few samples after the warm-up")
    step = max(1, len(samples) // 24)
    shown = samples[::step]
    if samples and shown[-1] is not samples[-1]:
        shown.append(samples[-1])
    lines += ["", "| t (s) | requests | sidecar RSS (MiB) | open fds | threads |",
              "|---:|---:|---:|---:|---:|"]
    for s in shown:
        mark = " (warm-up)" if s["t"] < warmup_s else ""
        lines.append(f"| {s['t']:.0f}{mark} | {s['sent']} | {s['rss_kb'] / 1024:.1f} | "
                     f"{s['fds']} | {s['threads']} |")
    if not alive:
        failures.append("the sidecar died during the soak")
    if exit_code not in (0, None):
        failures.append(f"the sidecar exited {exit_code} on SIGTERM")
    lines += ["", f"sidecar exit on SIGTERM: {exit_code}"]
    if load.sent == 0:
        failures.append("no requests were sent")
    return "\n".join(lines), failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    parser.add_argument("--concurrency", type=int, default=16, help="calls in flight")
    parser.add_argument("--clients", type=int, default=5000, help="distinct x-client-id values")
    parser.add_argument("--sample-every", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--warmup", type=float, default=None,
                        help="seconds before memory is baselined (default: 25%% of the "
                             "duration, at most 60)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--output", help="also write the Markdown report here")
    args = parser.parse_args()
    warmup_s = args.warmup if args.warmup is not None else min(60.0, args.duration * 0.25)

    workdir = pathlib.Path(tempfile.mkdtemp(prefix="bastion-soak-"))
    upstream_addr = f"127.0.0.1:{free_port()}"
    listen = f"127.0.0.1:{free_port()}"
    admin = f"127.0.0.1:{free_port()}"
    config = workdir / "bastion.yaml"
    config.write_text(soak_config(listen, admin, upstream_addr, workdir))
    rng = random.Random(args.seed)
    client_pool = [f"client-{rng.getrandbits(64):016x}" for _ in range(args.clients)]
    print(f"soak: workdir {workdir}; {args.duration:.0f}s, {args.concurrency} in flight, "
          f"{args.clients} clients, warm-up {warmup_s:.0f}s", flush=True)

    children: list[Child] = []
    load = Load()
    exit_code = None
    alive = True
    elapsed = 0.0
    started = time.monotonic()
    try:
        upstream = Child("upstream", ["upstream", "--listen", upstream_addr], workdir,
                         "bastion upstream: serving")
        children.append(upstream)
        sidecar = Child("sidecar", ["serve", "-c", str(config)], workdir, "bastion: serving")
        children.append(sidecar)
        time.sleep(1.0)  # readiness poll + learned inputs
        started = time.monotonic()
        try:
            import uvloop
            runner = uvloop.run
        except ImportError:
            runner = asyncio.run
        runner(drive(listen, args.duration, args.concurrency, client_pool, sidecar,
                     args.sample_every, load, args.seed))
        elapsed = time.monotonic() - started
        alive = sidecar.alive()
        if not alive:
            print(f"sidecar died:\n{sidecar.tail()}", flush=True)
        exit_code = sidecar.stop()
        children.remove(sidecar)
    finally:
        for child in reversed(children):
            child.stop()
    text, failures = report(load, args, warmup_s, elapsed, exit_code, alive)
    text += "\n\n" + ("**PASS**" if not failures else
                      "**FAIL**\n" + "\n".join(f"- {f}" for f in failures)) + "\n"
    print(text, flush=True)
    if args.output:
        pathlib.Path(args.output).write_text(text)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

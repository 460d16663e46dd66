"""`bastion demo`: reference upstream + sidecar + labelled traffic, with a live summary.

Everything binds to 127.0.0.1 on free ports. Child processes are started here and stopped by PID
on exit (Ctrl-C included), so the demo never leaves a server behind.
"""
from __future__ import annotations

import asyncio
import collections
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import grpc

from bastion import corpus, demo_generation, traffic
from bastion.proxy.process import stop_event
from bastion.protos import SERVICE

DEMO_CONFIG = """\
# Written by `bastion demo`: the embedded default, the shipped profiles for both demo models
# (bastion/profiles/, deploy/profiles/ in the repository).
listen: {listen}
admin: {admin}
{http}upstream: {{target: {upstream}, timeout_s: 10}}
audit: {{output: {audit}}}
models:
  fashion-mnist: {{profile: image-classifier}}
  text-classifier: {{profile: llm-prompt}}
{generator}"""


def demo_config(listen: str, admin: str, upstream: str, audit: str | os.PathLike,
                http: str | None = None) -> str:
    """DEMO_CONFIG filled in: the shipped profiles, whose files live inside the package;
    ``http``: the REST front's address (None: gRPC only)."""
    return DEMO_CONFIG.format(listen=listen, admin=admin, upstream=upstream, audit=audit,
                              generator=demo_generation.CONFIG,
                              http=f"http_listen: {http}\n" if http else "")


# How gRPC outcomes read in the summary.
OUTCOME_NAMES = {"OK": "allowed", "PERMISSION_DENIED": "blocked", "INVALID_ARGUMENT": "invalid",
                 "RESOURCE_EXHAUSTED": "throttled"}
# REST statuses as the gRPC outcome they stand for (proxy/rest.py maps them the other way).
HTTP_OUTCOMES = {200: "OK", 403: "PERMISSION_DENIED", 400: "INVALID_ARGUMENT",
                 429: "RESOURCE_EXHAUSTED", 503: "UNAVAILABLE"}
#: Every REST_SHARE-th well-formed request goes over the REST front instead of gRPC.
REST_SHARE = 4


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(args: list[str], log_path: pathlib.Path) -> subprocess.Popen:
    log = open(log_path, "w")
    return subprocess.Popen([sys.executable, "-m", "bastion", *args], stdout=log,
                            stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            start_new_session=True)  # Ctrl-C goes to the demo, which stops them


def _wait_line(proc: subprocess.Popen, log_path: pathlib.Path, marker: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if marker in log_path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    raise RuntimeError(f"process did not start ({marker!r} not seen); log:\n"
                       f"{log_path.read_text(errors='replace')[-2000:]}")


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 10 s: a child this process started, stopped by its PID."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


class Tally:
    def __init__(self):
        self.counts: dict[tuple[str, str], collections.Counter] = collections.defaultdict(collections.Counter)
        self.latency_ms: dict[str, list[float]] = collections.defaultdict(list)
        #: Requests per front (grpc, http) and what happened to them.
        self.protocols: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)

        #: Text traffic per (label, family): what the prompt defense did with each kind.
        self.text_families: dict[tuple[str, str], collections.Counter] = \
            collections.defaultdict(collections.Counter)

    def add(self, record: traffic.Record, code: str, latency_ms: float,
            protocol: str = "grpc") -> None:
        outcome = OUTCOME_NAMES.get(code, code)
        self.counts[(record.model, record.label)][outcome] += 1
        self.protocols[protocol][outcome] += 1
        self.latency_ms[record.model].append(latency_ms)
        if record.model == traffic.TEXT_MODEL and record.label in ("benign", "attack"):
            self.text_families[(record.label, record.family)][outcome] += 1

    def family_lines(self) -> list[str]:
        """One line per text family: how many were blocked of how many sent."""
        lines = []
        for (label, family), counter in sorted(self.text_families.items()):
            sent = sum(counter.values())
            blocked = counter["blocked"] + counter["throttled"]
            lines.append(f"  {label:6s} {family:20s} blocked {blocked:4d} of {sent:4d} "
                         f"({blocked / sent:6.1%})")
        return ["text prompts by family (llm-prompt profile):"] + lines if lines else []

    def render(self, elapsed: float) -> str:
        order = list(OUTCOME_NAMES.values())
        codes = sorted({c for counter in self.counts.values() for c in counter},
                       key=lambda c: (order.index(c) if c in order else len(order), c))
        header = ["model", "traffic", "sent", *codes]
        rows = [header]
        for (model, label), counter in sorted(self.counts.items()):
            rows.append([model, label, str(sum(counter.values())), *(str(counter[c]) for c in codes)])
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
        lines += self.family_lines()
        lines += [f"over {protocol}: " + ", ".join(f"{n} {outcome}" for outcome, n in
                                                   sorted(counter.items()))
                  for protocol, counter in sorted(self.protocols.items())]
        total = sum(sum(c.values()) for c in self.counts.values())
        lines.append(f"{total} requests in {elapsed:.1f}s ({total / max(elapsed, 1e-9):.0f}/s)")
        for model, values in sorted(self.latency_ms.items()):
            ordered = sorted(values)
            p50 = ordered[len(ordered) // 2]
            p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
            lines.append(f"latency through bastion, {model}: p50 {p50:.2f} ms, p99 {p99:.2f} ms")
        return "\n".join(lines)


def _rest_body(record: traffic.Record) -> tuple[bytes, int] | None:
    """The record as a REST body (binary tensor data), or None for one that is no valid
    ModelInferRequest at all (those test the gRPC front's decoding)."""
    from bastion.protos import pb
    from bastion.protos.codec import TensorError
    from bastion.proxy.rest_codec import encode_infer_request
    try:
        return encode_infer_request(pb.ModelInferRequest.FromString(record.payload))
    except (TensorError, ValueError, KeyError):
        return None


async def _send_traffic(target: str, rate: float, duration_s: float | None, tally: Tally,
                        admin: str, stop: asyncio.Event, data: str | None = None,
                        http: str | None = None) -> None:
    import aiohttp
    records = corpus.demo_records(data)
    stream = traffic.mixed_stream(records, seed=7)
    async with grpc.aio.insecure_channel(target) as channel, aiohttp.ClientSession() as session:
        infer = channel.unary_unary(f"/{SERVICE}/ModelInfer")
        count = 0

        async def over_rest(record: traffic.Record, body: bytes, header_length: int) -> str:
            async with session.post(f"http://{http}/v2/models/{record.model}/infer", data=body,
                                    headers={"Inference-Header-Content-Length":
                                             str(header_length)},
                                    timeout=aiohttp.ClientTimeout(total=10)) as reply:
                await reply.read()
                return HTTP_OUTCOMES.get(reply.status, str(reply.status))

        async def one(record: traffic.Record) -> None:
            nonlocal count
            count += 1
            rest = _rest_body(record) if http and count % REST_SHARE == 0 else None
            started = time.perf_counter()
            if rest is not None:
                code = await over_rest(record, *rest)
            else:
                try:
                    await infer(record.payload, timeout=10)
                    code = "OK"
                except grpc.aio.AioRpcError as err:
                    code = err.code().name
            tally.add(record, code, (time.perf_counter() - started) * 1000,
                      "http" if rest is not None else "grpc")

        started = time.monotonic()
        last_print = started
        in_flight: set[asyncio.Task] = set()
        sent = 0
        while not stop.is_set():
            now = time.monotonic()
            if duration_s is not None and now - started >= duration_s:
                break
            due = int((now - started) * rate) + 1
            while sent < due and len(in_flight) < 64:
                task = asyncio.create_task(one(next(stream)))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
                sent += 1
            if now - last_print >= 2:
                last_print = now
                print(f"\n{tally.render(now - started)}\nmetrics: http://{admin}/metrics", flush=True)
            try:
                await asyncio.wait_for(stop.wait(), timeout=0.02)
            except asyncio.TimeoutError:
                pass
        if in_flight:
            await asyncio.wait(in_flight, timeout=15)
        print(f"\n=== final ===\n{tally.render(time.monotonic() - started)}", flush=True)


def _bastion_metrics(admin: str) -> str:
    """Verdict totals and the top reasons, read back from the sidecar's own /metrics."""
    try:
        with urllib.request.urlopen(f"http://{admin}/metrics", timeout=5) as reply:
            text = reply.read().decode()
    except OSError as err:
        return f"(metrics unavailable: {err})"
    verdicts = [line for line in text.splitlines()
                if line.startswith(("bastion_verdicts_total", "bastion_output_findings_total"))]
    reasons = []
    for line in text.splitlines():
        if line.startswith("bastion_reasons_total{"):
            series, value = line.rsplit(" ", 1)
            reasons.append((float(value), series))
    top = [f"{series} {value:.0f}" for value, series in sorted(reasons, reverse=True)[:8]]
    return "\n".join(verdicts + (["top reasons:"] + top if top else []))


def run_demo(duration_s: float | None = None, rate: float = 50.0, data: str | None = None) -> int:
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="bastion-demo-"))
    upstream = f"127.0.0.1:{_free_port()}"
    listen = f"127.0.0.1:{_free_port()}"
    admin = f"127.0.0.1:{_free_port()}"
    http = f"127.0.0.1:{_free_port()}"
    config = workdir / "bastion.yaml"
    config.write_text(demo_config(listen, admin, upstream, workdir / "audit.jsonl", http))
    procs = []

    def interrupted(signum, frame):  # SIGTERM during start-up: unwind so `finally` stops children
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupted)
    try:
        print(f"bastion demo: reference upstream on {upstream} (demo models)", flush=True)
        up = _start(["upstream", "--listen", upstream], workdir / "upstream.log")
        procs.append(up)
        _wait_line(up, workdir / "upstream.log", "bastion upstream: serving", 60)
        print(f"bastion demo: upstream pid {up.pid}", flush=True)
        print(f"bastion demo: sidecar on {listen} (gRPC) and {http} (REST), config {config}",
              flush=True)
        sidecar = _start(["serve", "-c", str(config)], workdir / "sidecar.log")
        procs.append(sidecar)
        _wait_line(sidecar, workdir / "sidecar.log", "bastion: serving", 90)
        print(f"bastion demo: sidecar pid {sidecar.pid}", flush=True)
        print(f"bastion demo: metrics at http://{admin}/metrics, logs and audit log in {workdir}",
              flush=True)
        print(f"bastion demo: sending benign, attack and malformed traffic at {rate:.0f} req/s, "
              f"one well-formed request in {REST_SHARE} over REST"
              f"{'' if duration_s is None else f' for {duration_s:.0f}s'} (Ctrl-C stops)",
              flush=True)
        tally = Tally()

        async def main() -> None:
            stop = stop_event()
            await _send_traffic(listen, rate, duration_s, tally, admin, stop, data, http)

        asyncio.run(main())
        print("\n" + "\n".join(demo_generation.generation_lines(listen)), flush=True)
        print(f"\nsidecar metrics (http://{admin}/metrics):\n{_bastion_metrics(admin)}", flush=True)
        return 0
    except KeyboardInterrupt:
        print("\nbastion demo: interrupted during start-up", flush=True)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        for proc in reversed(procs):
            stop_process(proc)
        print("bastion demo: stopped upstream and sidecar", flush=True)

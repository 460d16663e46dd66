"""Pass-through proxy overhead: direct vs Bastion vs a bare grpc.aio proxy vs nginx grpc_pass.

One run starts the reference upstream serving a trivial ``echo`` model (ONNX Identity, FP32
``x`` [batch, n] -> ``y``), Bastion with no config (pass-through), ``bench/bare_proxy.py`` and,
when /usr/sbin/nginx exists, nginx with ``grpc_pass``. It then measures ModelInfer in
interleaved rounds: every round visits every (payload, in-flight) cell and, inside a cell, every
target, in an order rotated each round, so machine noise lands on all targets alike.

Per target/payload/in-flight it reports p50 and p99 latency (pooled over rounds), throughput
(requests / measured seconds) and the proxy's CPU time per request (utime+stime from
/proc/<pid>/stat around each measured window; nginx: master + its one worker). The load
generator is a grpc.aio client sending pre-serialized ModelInferRequest bytes (no per-request
protobuf work); its own CPU per request is reported too, since it shares the cores.

    python bench/passthrough.py [--duration 3] [--rounds 3] [--quick] [--json OUT]
        [--baseline-python OLD_VENV/bin/python]   # adds bastion_baseline: an older commit's sidecar
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import pathlib
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import grpc
import numpy as np

# This script's folder, so the report module loads however the script is (bench/ or a test).
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from passthrough_report import markdown, ratios, summarize  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bastion.protos import SERVICE, pb  # noqa: E402
from tests.harness import Proc, Sidecar, Upstream, free_port  # noqa: E402

NGINX = "/usr/sbin/nginx"
MODEL_INFER = f"/{SERVICE}/ModelInfer"
SERVER_LIVE = f"/{SERVICE}/ServerLive"
MAX_MESSAGE = 64 * 1024 * 1024
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE),
                   ("grpc.max_send_message_length", MAX_MESSAGE),
                   ("grpc.enable_retries", 0)]
CLK_TCK = os.sysconf("SC_CLK_TCK")
ALL_TARGETS = ("direct", "bastion", "bare_proxy", "nginx", "bastion_baseline")


# ---- fixtures ---------------------------------------------------------------------------------
def write_echo_model(models_dir: pathlib.Path) -> None:
    import onnx
    from onnx import TensorProto, helper
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "n"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "n"])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "echo", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8  # readable by any onnxruntime >= 1.10
    onnx.checker.check_model(model)
    (models_dir / "echo").mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(models_dir / "echo" / "model.onnx"))


def infer_request(payload_bytes: int) -> tuple[bytes, bytes]:
    """(serialized ModelInferRequest, the raw tensor bytes) for an FP32 [1, n] input."""
    n = payload_bytes // 4
    data = np.random.default_rng(0).standard_normal(n, dtype=np.float32).tobytes()
    request = pb.ModelInferRequest(model_name="echo")
    request.inputs.add(name="x", datatype="FP32", shape=[1, n])
    request.raw_input_contents.append(data)
    return request.SerializeToString(), data


NGINX_CONF = """\
worker_processes 1;
daemon off;
master_process on;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    client_max_body_size 64m;
    client_body_buffer_size 512k;
    keepalive_requests 100000000;
    keepalive_timeout 600s;
    upstream model_server {{
        server {upstream};
        keepalive 64;
        keepalive_requests 100000000;
        keepalive_timeout 600s;
    }}
    server {{
        listen {listen} http2;
        location / {{
            grpc_pass grpc://model_server;
            grpc_buffer_size 512k;
            grpc_read_timeout 60s;
            grpc_send_timeout 60s;
        }}
    }}
}}
"""


class Nginx:
    def __init__(self, upstream: str, tmp: pathlib.Path):
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.tmp = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        conf = tmp / "nginx.conf"
        conf.write_text(NGINX_CONF.format(tmp=tmp, upstream=upstream, listen=self.address))
        self.proc = Proc([NGINX, "-p", str(tmp), "-e", str(tmp / "error.log"), "-c", str(conf)])
        deadline = time.monotonic() + 20
        while True:
            if self.proc.popen.poll() is not None:
                raise RuntimeError(f"nginx exited: {self.proc.output()}\n"
                                   f"{(tmp / 'error.log').read_text(errors='replace')}")
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError("nginx did not listen")
            time.sleep(0.05)

    def pids(self) -> list[int]:
        return [self.proc.pid, *children(self.proc.pid)]

    def stop(self) -> int:
        return self.proc.stop()


class BareProxy:
    def __init__(self, upstream: str):
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.proc = Proc([sys.executable, str(REPO / "bench" / "bare_proxy.py"),
                          "--listen", self.address, "--upstream", upstream])
        self.proc.wait_for(r"bare_proxy: serving grpc=", timeout=30)

    def stop(self) -> int:
        return self.proc.stop()


def children(pid: int) -> list[int]:
    try:
        text = pathlib.Path(f"/proc/{pid}/task/{pid}/children").read_text()
        return [int(p) for p in text.split()]
    except OSError:
        found = []
        for entry in pathlib.Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text()
                except OSError:
                    continue
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
        return found


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime (all threads) of the given processes, in seconds."""
    total = 0
    for pid in pids:
        fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)
    return total / CLK_TCK


def self_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy (user, nice, system, irq, softirq, steal) since boot."""
    fields = [int(x) for x in pathlib.Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


# ---- load generator ---------------------------------------------------------------------------
async def wait_grpc(address: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        call = channel.unary_unary(SERVER_LIVE)
        request = pb.ServerLiveRequest().SerializeToString()
        while True:
            try:
                if pb.ServerLiveResponse.FromString(await call(request, timeout=2)).live:
                    return
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{address} never answered ServerLive")
            await asyncio.sleep(0.1)


def check_reply(reply: bytes, data: bytes, target: str) -> None:
    response = pb.ModelInferResponse.FromString(reply)
    if response.raw_output_contents:
        got = response.raw_output_contents[0]
    else:
        got = np.asarray(response.outputs[0].contents.fp32_contents, dtype="<f4").tobytes()
    if got != data:
        raise AssertionError(f"{target}: echo output differs from the input")


async def window(call, request: bytes, in_flight: int, warmup_s: float, duration_s: float,
                 pids: list[int], upstream_pid: int | None = None) -> dict:
    """Keep ``in_flight`` calls running; measure completions inside [start, end) after warmup."""
    latencies: list[float] = []
    errors = 0
    state = {"measuring": False, "stop": False}
    perf = time.perf_counter

    async def worker() -> None:
        nonlocal errors
        while not state["stop"]:
            t0 = perf()
            try:
                await call(request, timeout=30)
            except grpc.aio.AioRpcError:
                errors += 1
                await asyncio.sleep(0.01)
                continue
            if state["measuring"]:
                latencies.append(perf() - t0)

    workers = [asyncio.ensure_future(worker()) for _ in range(in_flight)]
    await asyncio.sleep(warmup_s)
    upstream_pids = [upstream_pid] if upstream_pid else []
    proxy0, client0 = (cpu_seconds(pids) if pids else 0.0), self_cpu_seconds()
    upstream0, busy0 = cpu_seconds(upstream_pids), machine_busy_seconds()
    state["measuring"] = True
    start = perf()
    await asyncio.sleep(duration_s)
    state["measuring"] = False
    elapsed = perf() - start
    proxy1, client1 = (cpu_seconds(pids) if pids else 0.0), self_cpu_seconds()
    upstream1, busy1 = cpu_seconds(upstream_pids), machine_busy_seconds()
    state["stop"] = True
    await asyncio.gather(*workers)
    ours = (proxy1 - proxy0) + (client1 - client0) + (upstream1 - upstream0)
    return {"latencies": latencies, "elapsed": elapsed, "errors": errors,
            "proxy_cpu": proxy1 - proxy0, "client_cpu": client1 - client0,
            "upstream_cpu": upstream1 - upstream0,
            # Cores kept busy by everything else on the machine during the window.
            "background_cores": max(0.0, (busy1 - busy0) - ours) / elapsed}


# ---- orchestration ----------------------------------------------------------------------------
async def measure(addresses: dict[str, str], pid_of: dict[str, Callable[[], list[int]]], upstream_pid: int,
                  payloads: list[int], concurrencies: list[int], rounds: int,
                  duration_s: float, warmup_s: float) -> dict:
    channels = {t: grpc.aio.insecure_channel(a, options=CHANNEL_OPTIONS)
                for t, a in addresses.items()}
    calls = {t: c.unary_unary(MODEL_INFER) for t, c in channels.items()}
    requests = {p: infer_request(p) for p in payloads}
    targets = list(addresses)
    try:
        for target in targets:
            await wait_grpc(addresses[target])
            for payload, (request, data) in requests.items():
                check_reply(await calls[target](request, timeout=30), data, target)
                # Warm every path (connections, caches) before the first measured window.
                await window(calls[target], request, max(concurrencies), 0.0, 0.5, [])

        cells = [(p, c) for p in payloads for c in concurrencies]
        raw = {(t, p, c): [] for t in targets for p, c in cells}
        total = rounds * len(cells) * len(targets)
        done = 0
        for r in range(rounds):
            order = targets[r % len(targets):] + targets[:r % len(targets)]
            for payload, in_flight in cells:
                for target in order:
                    pids = pid_of[target]()
                    result = await window(calls[target], requests[payload][0], in_flight,
                                          warmup_s, duration_s, pids, upstream_pid)
                    result["has_proxy"] = bool(pids)
                    raw[(target, payload, in_flight)].append(result)
                    done += 1
                    n = len(result["latencies"])
                    print(f"[{done}/{total}] round {r + 1} {payload // 1024:>4} KiB x{in_flight:<2}"
                          f" {target:<10} {n / result['elapsed']:8.1f} req/s"
                          f"  background {result['background_cores']:.2f} cores"
                          f"{'  errors=' + str(result['errors']) if result['errors'] else ''}",
                          flush=True)
    finally:
        for channel in channels.values():
            await channel.close()
    return summarize(raw, targets, cells)


def machine() -> dict:
    model = ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next((line.split(":", 1)[1].strip() for line in out.splitlines()
                      if line.startswith("Model name")), "")
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu_model": model, "python": platform.python_version(),
            "grpcio": grpc.__version__, "kernel": platform.release(),
            "loadavg": pathlib.Path("/proc/loadavg").read_text().split()[:3]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per measured window")
    parser.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds before each")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--payloads", default="1024,262144", help="bytes of FP32 data, comma list")
    parser.add_argument("--in-flight", default="1,16", help="concurrent requests, comma list")
    parser.add_argument("--targets", default=",".join(ALL_TARGETS[:4]))
    parser.add_argument("--baseline-python", metavar="PY",
                        help="target bastion_baseline: the sidecar run by this interpreter (an "
                             "environment with another commit installed, e.g. `pip install -e "
                             "OLD_WORKTREE` in its own venv): old vs new in the same run")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round of 0.5 s windows")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--report", metavar="JSON",
                        help="measure nothing: print the tables of a saved --json result")
    args = parser.parse_args(argv)
    if args.report:
        saved = json.loads(pathlib.Path(args.report).read_text())
        saved["ratios"] = ratios(saved["rows"])
        print(markdown(saved))
        return 0
    if args.quick:
        args.duration, args.warmup, args.rounds = 0.5, 0.1, 1
    payloads = [int(x) for x in args.payloads.split(",")]
    concurrencies = [int(x) for x in args.in_flight.split(",")]
    targets = [t for t in args.targets.split(",") if t]
    unknown = set(targets) - set(ALL_TARGETS)
    if unknown:
        parser.error(f"unknown targets {sorted(unknown)}; known: {', '.join(ALL_TARGETS)}")
    if "bastion_baseline" in targets and not args.baseline_python:
        parser.error("target bastion_baseline needs --baseline-python")
    if args.baseline_python and "bastion_baseline" not in targets:
        targets.append("bastion_baseline")
    if "nginx" in targets and not os.path.exists(NGINX):
        print(f"note: {NGINX} is absent; skipping the nginx target", flush=True)
        targets.remove("nginx")

    started_at = datetime.datetime.now(datetime.timezone.utc)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="bastion-bench-"))
    procs = []
    try:
        write_echo_model(tmp / "models")
        upstream = Upstream(models=str(tmp / "models"))
        procs.append(upstream)
        addresses, pid_of = {}, {}
        if "direct" in targets:
            addresses["direct"], pid_of["direct"] = upstream.address, lambda: []
        # The proxies measured (one process each): how to start each target.
        start = {"bastion": lambda: Sidecar(upstream.address),
                 "bastion_baseline": lambda: Sidecar(upstream.address,
                                                     python=args.baseline_python, cwd=str(tmp)),
                 "bare_proxy": lambda: BareProxy(upstream.address)}
        for target, make in start.items():
            if target in targets:
                proc = make()
                procs.append(proc)
                addresses[target] = proc.address
                pid_of[target] = lambda pid=proc.proc.pid: [pid]
        if "nginx" in targets:
            nginx = Nginx(upstream.address, tmp / "nginx")
            procs.append(nginx)
            addresses["nginx"] = nginx.address
            pid_of["nginx"] = nginx.pids
        print("pids: upstream=%d %s" % (upstream.proc.pid, " ".join(
            f"{t}={','.join(map(str, pid_of[t]()))}" for t in addresses if t != "direct")),
            flush=True)
        try:
            import uvloop
            runner = uvloop.run
        except ImportError:
            runner = asyncio.run
        result = runner(measure(addresses, pid_of, upstream.proc.pid, payloads, concurrencies,
                                args.rounds, args.duration, args.warmup))
    finally:
        for proc in reversed(procs):
            proc.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    result["meta"] = {
        "command": " ".join(["python", os.path.relpath(sys.argv[0], REPO) if sys.argv[0] else "",
                             *(argv if argv is not None else sys.argv[1:])]),
        "date_utc": started_at.strftime("%Y-%m-%d %H:%M UTC"),
        "duration_s": args.duration, "warmup_s": args.warmup, "rounds": args.rounds,
        "targets": list(addresses), "machine": machine(),
    }
    table = markdown(result)
    print()
    print(table)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

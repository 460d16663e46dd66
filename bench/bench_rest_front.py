#!/usr/bin/env python3
"""What the REST front costs: the sidecar's CPU per request on its REST front (JSON tensors and
Triton's binary tensor data) against its gRPC front, and against a reference server (MLServer)
answering the same request over its own REST and gRPC ports. One run, rounds interleaved.

    python bench/bench_rest_front.py [--requests 400] [--rounds 3] [--json OUT]

The model is scikit-learn's iris classifier served by MLServer 1.7.1 (scripts/setup-mlserver.sh;
the test suite's upstream we did not write); the request is 22 rows x 4 FP64 features. The
sidecar runs pass-through (no stages), so the numbers are the fronts' own cost: decode the
request (REST: JSON or binary into a ModelInferRequest), forward over gRPC, encode the answer.
Clients keep one connection and send one request at a time.

Columns: CPU of the measured server process per request (sidecar for the sidecar's rows,
MLServer for the direct rows; MLServer runs its models in the main process), the ratio to the
sidecar's gRPC front in the same round (median and range over rounds), and the client's
latency.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from machine import finish  # noqa: E402
from passthrough import cpu_seconds  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
from bastion.protos import SERVICE, pb  # noqa: E402
from bastion.proxy.rest_codec import encode_infer_request  # noqa: E402
from tests.harness import Proc, Sidecar, free_port  # noqa: E402

VENV = REPO / ".venvs" / "mlserver"
MODEL = "iris"
TRAIN = r"""
import sys, joblib
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression
X, y = load_iris(return_X_y=True)
joblib.dump(LogisticRegression(max_iter=1000).fit(X, y), sys.argv[1] + "/model.joblib")
"""


def start_mlserver(root: pathlib.Path) -> tuple[Proc, str, str]:
    subprocess.run([str(VENV / "bin" / "python"), "-c", TRAIN, str(root)], check=True,
                   timeout=120)
    (root / "model-settings.json").write_text(json.dumps({
        "name": MODEL, "implementation": "mlserver_sklearn.SKLearnModel",
        "parameters": {"uri": str(root / "model.joblib"), "version": "v1"}}))
    grpc_port, http_port = free_port(), free_port()
    (root / "settings.json").write_text(json.dumps({
        "host": "127.0.0.1", "grpc_port": grpc_port, "http_port": http_port,
        "metrics_port": free_port(), "metrics_endpoint": None, "parallel_workers": 0,
        "debug": False}))
    proc = Proc([str(VENV / "bin" / "mlserver"), "start", str(root)], cwd=str(root))
    return proc, f"127.0.0.1:{grpc_port}", f"127.0.0.1:{http_port}"


def infer_request() -> pb.ModelInferRequest:
    from sklearn.datasets import load_iris
    import numpy as np
    from bastion.protos import codec
    batch = load_iris().data[::7].astype(np.float64)
    request = pb.ModelInferRequest(model_name=MODEL)
    codec.encode_request(request, {"input-0": batch})
    return request


def json_body(request: pb.ModelInferRequest) -> bytes:
    from bastion.protos import codec
    arrays = codec.decode_request(request)
    return json.dumps({"inputs": [{"name": t.name, "datatype": t.datatype,
                                   "shape": list(t.shape),
                                   "data": arrays[t.name].reshape(-1).tolist()}
                                  for t in request.inputs]}).encode()


async def wait_ready(address: str, http: str) -> None:
    import aiohttp
    deadline = time.monotonic() + 90
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(f"http://{http}/v2/models/{MODEL}/ready") as reply:
                    if reply.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{http} not ready")
            await asyncio.sleep(0.25)


async def run(args) -> list[dict]:
    import aiohttp
    import grpc
    request = infer_request()
    raw = request.SerializeToString()
    body_json = json_body(request)
    body_binary, header_length = encode_infer_request(request)
    with tempfile.TemporaryDirectory(prefix="bench-rest-") as tmp:
        mlserver, ml_grpc, ml_http = start_mlserver(pathlib.Path(tmp))
        http_port = free_port()
        sidecar = None
        try:
            await wait_ready(ml_grpc, ml_http)
            sidecar = Sidecar(ml_grpc, extra_args=("--http-listen", f"127.0.0.1:{http_port}"))
            bastion_http = f"127.0.0.1:{http_port}"
            channels = {"sidecar": grpc.aio.insecure_channel(sidecar.address),
                        "mlserver": grpc.aio.insecure_channel(ml_grpc)}
            session = aiohttp.ClientSession()
            json_headers = {"Content-Type": "application/json"}
            binary_headers = {"Inference-Header-Content-Length": str(header_length)}

            def rest(address: str, body: bytes, headers: dict):
                async def call() -> None:
                    async with session.post(f"http://{address}/v2/models/{MODEL}/infer",
                                            data=body, headers=headers) as reply:
                        await reply.read()
                        assert reply.status == 200, reply.status
                return call

            def over_grpc(channel):
                method = channel.unary_unary(f"/{SERVICE}/ModelInfer")

                async def call() -> None:
                    await method(raw, timeout=30)
                return call

            targets = {
                "sidecar gRPC front": (over_grpc(channels["sidecar"]), sidecar.proc.pid),
                "sidecar REST front, JSON": (rest(bastion_http, body_json, json_headers),
                                             sidecar.proc.pid),
                "sidecar REST front, binary": (rest(bastion_http, body_binary, binary_headers),
                                               sidecar.proc.pid),
                "MLServer gRPC, direct": (over_grpc(channels["mlserver"]), mlserver.pid),
                "MLServer REST JSON, direct": (rest(ml_http, body_json, json_headers),
                                               mlserver.pid),
            }
            for call, _ in targets.values():  # warm every path
                for _ in range(50):
                    await call()
            rows = []
            names = list(targets)
            for r in range(args.rounds):
                for name in names[r % len(names):] + names[:r % len(names)]:
                    call, pid = targets[name]
                    latencies = []
                    before = cpu_seconds([pid])
                    for _ in range(args.requests):
                        started = time.perf_counter()
                        await call()
                        latencies.append(time.perf_counter() - started)
                    cpu = (cpu_seconds([pid]) - before) / args.requests
                    rows.append({"target": name, "round": r, "cpu_us_per_req": cpu * 1e6,
                                 "p50_ms": statistics.median(latencies) * 1e3})
            await session.close()
            for channel in channels.values():
                await channel.close()
            return rows
        finally:
            if sidecar is not None:
                sidecar.stop()
            mlserver.stop()


def report(rows: list[dict]) -> str:
    base = {r["round"]: r["cpu_us_per_req"] for r in rows if r["target"] == "sidecar gRPC front"}
    lines = ["| target | server CPU µs/req | x sidecar gRPC front (range over rounds) | p50 ms |",
             "|---|---:|---|---:|"]
    for target in dict.fromkeys(r["target"] for r in rows):
        mine = [r for r in rows if r["target"] == target]
        ratio = [r["cpu_us_per_req"] / base[r["round"]] for r in mine if base[r["round"]]]
        ratio_text = (f"{statistics.median(ratio):.2f} ({min(ratio):.2f}-{max(ratio):.2f})"
                      if ratio else "n/a")
        lines.append(f"| {target} | {statistics.median(r['cpu_us_per_req'] for r in mine):.0f} | "
                     f"{ratio_text} | {statistics.median(r['p50_ms'] for r in mine):.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=400, help="per target and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()
    rows = asyncio.run(run(args))
    finish(f"{args.rounds} rounds of {args.requests} requests per target", report(rows), rows,
           args.json)


if __name__ == "__main__":
    main()

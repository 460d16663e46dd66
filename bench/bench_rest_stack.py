#!/usr/bin/env python3
"""Which asynchronous HTTP stack the REST front runs on: aiohttp's server against uvicorn
(httptools parser) with a bare ASGI app, both on uvloop, serving the same minimal v2 infer route
(parse the JSON body, answer a JSON body of the same size), measured in one run.

    python bench/bench_rest_stack.py [--seconds 3] [--rounds 3] [--in-flight 1,8] [--json OUT]

Per stack and concurrency: requests per second and the server process's CPU per request
(utime + stime from /proc), rounds interleaved; the ratio is uvicorn / aiohttp per round.
Both are well kept and both run on uvloop; the choice also weighs what the front needs besides
speed (streamed body caps before buffering, a client for proxying other routes, TLS).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import socket
import statistics
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from machine import finish  # noqa: E402
from passthrough import cpu_seconds  # noqa: E402

BODY = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 64],
                               "data": [0.5] * 64}]}).encode()

SERVER = r'''
import asyncio, json, sys
import uvloop
stack, port = sys.argv[1], int(sys.argv[2])

def answer(body: bytes) -> bytes:
    request = json.loads(body)
    tensor = request["inputs"][0]
    return json.dumps({"model_name": "echo", "outputs": [
        {"name": "y", "datatype": tensor["datatype"], "shape": tensor["shape"],
         "data": tensor["data"]}]}).encode()

if stack == "aiohttp":
    from aiohttp import web
    async def infer(request):
        return web.Response(body=answer(await request.read()), content_type="application/json")
    app = web.Application()
    app.router.add_post("/v2/models/{model}/infer", infer)
    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)
else:
    import uvicorn
    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        out = answer(body)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(out)).encode())]})
        await send({"type": "http.response.body", "body": out})
    uvicorn.run(app, host="127.0.0.1", port=port, loop="uvloop", http="httptools",
                log_level="warning", access_log=False, lifespan="off")
'''


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def window(port: int, in_flight: int, seconds: float) -> int:
    import aiohttp
    url = f"http://127.0.0.1:{port}/v2/models/echo/infer"
    done = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=in_flight)) as session:
        stop = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < stop:
                async with session.post(url, data=BODY,
                                        headers={"content-type": "application/json"}) as reply:
                    await reply.read()
                    assert reply.status == 200
                done += 1
        await asyncio.gather(*(worker() for _ in range(in_flight)))
    return done


async def wait_up(port: int) -> None:
    for _ in range(200):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise RuntimeError(f"server on {port} did not start")


async def measure(args) -> list[dict]:
    stacks = ("aiohttp", "uvicorn")
    servers = {}
    try:
        for stack in stacks:
            port = free_port()
            servers[stack] = (port, subprocess.Popen([sys.executable, "-c", SERVER, stack,
                                                      str(port)]))
            await wait_up(port)
            await window(port, 4, 0.5)  # warm
        rows = []
        for in_flight in args.in_flight:
            for r in range(args.rounds):
                for stack in (stacks if r % 2 == 0 else stacks[::-1]):
                    port, proc = servers[stack]
                    before = cpu_seconds([proc.pid])
                    started = time.perf_counter()
                    n = await window(port, in_flight, args.seconds)
                    elapsed = time.perf_counter() - started
                    rows.append({"stack": stack, "in_flight": in_flight, "round": r,
                                 "rps": n / elapsed,
                                 "cpu_us_per_req": (cpu_seconds([proc.pid]) - before) / n * 1e6})
        return rows
    finally:
        for _, proc in servers.values():
            proc.terminate()
            proc.wait(10)


def report(rows: list[dict]) -> str:
    lines = ["| in flight | stack | req/s | server CPU µs/req | CPU vs aiohttp (per-round range) |",
             "|---:|---|---:|---:|---|"]
    for in_flight in sorted({r["in_flight"] for r in rows}):
        cell = [r for r in rows if r["in_flight"] == in_flight]
        base = {r["round"]: r["cpu_us_per_req"] for r in cell if r["stack"] == "aiohttp"}
        for stack in ("aiohttp", "uvicorn"):
            mine = [r for r in cell if r["stack"] == stack]
            ratio = [r["cpu_us_per_req"] / base[r["round"]] for r in mine]
            lines.append(f"| {in_flight} | {stack} | {statistics.median(r['rps'] for r in mine):.0f}"
                         f" | {statistics.median(r['cpu_us_per_req'] for r in mine):.0f} | "
                         f"{statistics.median(ratio):.2f}x ({min(ratio):.2f}-{max(ratio):.2f}) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--in-flight", type=lambda s: [int(x) for x in s.split(",")],
                        default=[1, 8])
    parser.add_argument("--json")
    args = parser.parse_args()
    rows = asyncio.run(measure(args))
    finish(f"body {len(BODY)} bytes", report(rows), rows, args.json)


if __name__ == "__main__":
    main()

"""Faults between the sidecar and the model server, with real processes.

The sidecar is a real `bastion serve`; the upstream is a real gRPC server in its own process (this
module run as ``python -m tests.test_faults serve --port P``) that can be SIGKILLed, SIGSTOPped
(hung) and restarted on the same port, or replaced by a TCP listener that resets every connection
or never answers. For each fault every call must end with a status from a documented set within
its deadline plus MARGIN_S; afterwards the same sidecar process (no restart) serves a normal
request, and its open file descriptors and threads return to their baseline (no leaked
connections or tasks holding sockets). RSS is checked for gross growth over the whole module.

Statuses by fault (what a client sees through the sidecar):

========================================  =====================================================
upstream not listening / resetting         UNAVAILABLE ("bastion: upstream HOST:PORT
                                           unavailable: ..."), at once
upstream SIGKILLed mid-call / mid-stream   UNAVAILABLE (naming the upstream)
upstream hung (SIGSTOP, silent listener)   DEADLINE_EXCEEDED at the client's deadline (or at
                                           upstream.timeout_s for a client without one)
upstream slower than the deadline          DEADLINE_EXCEEDED at the deadline
========================================  =====================================================
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import struct
import sys
import threading
import time
from concurrent import futures

import grpc
import numpy as np
import pytest

from bastion.protos import SERVICE, codec, pb
from tests.harness import Proc, Sidecar, free_port, wait_health

MODEL_INFER = f"/{SERVICE}/ModelInfer"
MODEL_STREAM_INFER = f"/{SERVICE}/ModelStreamInfer"
SLOW = "/custom.v1.Faults/Slow"        # unary, sleeps x-delay-ms
TICKS = "/custom.v1.Faults/Ticks"      # stream: one tick per 50 ms, up to 400
DELAY_KEY = "x-delay-ms"

# Slack over a deadline (or over the moment of a fault) for a call to end, on a shared 2-core
# machine: event-loop scheduling in two processes and a TCP reset travelling on loopback.
MARGIN_S = 0.75
# Descriptors/threads that may legitimately differ from the baseline once the sidecar is idle
# again (the upstream connection being re-established, a gRPC core worker parked).
FD_SLACK = 2
THREAD_SLACK = 2
UPSTREAM_TIMEOUT_S = 3.0

SIDECAR_CONFIG = f"""\
upstream: {{timeout_s: {UPSTREAM_TIMEOUT_S}, health_interval_s: 0.25}}
"""

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
DEADLINE = grpc.StatusCode.DEADLINE_EXCEEDED
OK = grpc.StatusCode.OK


# ---- the fault upstream (a separate process) -------------------------------------------------


def _delay(context) -> float:
    for key, value in context.invocation_metadata():
        if key == DELAY_KEY:
            return int(value) / 1000
    return 0.0


def _sleep(context, seconds: float) -> bool:
    """Sleep in small steps; False if the call ended meanwhile."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if not context.is_active():
            return False
        time.sleep(min(0.02, max(end - time.monotonic(), 0)))
    return True


class FaultUpstream(grpc.GenericRpcHandler):
    def service(self, details):
        method = details.method
        if method == f"/{SERVICE}/ServerReady":
            return grpc.unary_unary_rpc_method_handler(
                lambda request, context: pb.ServerReadyResponse(ready=True).SerializeToString())
        if method == MODEL_INFER:
            def infer(request: bytes, context):
                parsed = pb.ModelInferRequest.FromString(request)
                _sleep(context, _delay(context))
                return pb.ModelInferResponse(model_name=parsed.model_name,
                                             id=parsed.id).SerializeToString()
            return grpc.unary_unary_rpc_method_handler(infer)
        if method == MODEL_STREAM_INFER:
            def stream_infer(request_iterator, context):
                delay = _delay(context)
                for request in request_iterator:
                    parsed = pb.ModelInferRequest.FromString(request)
                    if not _sleep(context, delay):
                        return
                    yield pb.ModelStreamInferResponse(infer_response=pb.ModelInferResponse(
                        model_name=parsed.model_name, id=parsed.id)).SerializeToString()
            return grpc.stream_stream_rpc_method_handler(stream_infer)
        if method == SLOW:
            def slow(request: bytes, context):
                _sleep(context, _delay(context))
                return b"slow:" + request
            return grpc.unary_unary_rpc_method_handler(slow)
        if method == TICKS:
            def ticks(request_iterator, context):
                next(request_iterator, None)
                for index in range(400):
                    if not _sleep(context, 0.05):
                        return
                    yield struct.pack("<I", index)
            return grpc.stream_stream_rpc_method_handler(ticks)
        return None


def serve_fault_upstream(port: int) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=64))
    server.add_generic_rpc_handlers((FaultUpstream(),))
    if not server.add_insecure_port(f"127.0.0.1:{port}"):
        raise SystemExit(f"cannot listen on 127.0.0.1:{port}")
    server.start()
    print(f"fault upstream: serving {port}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    server.stop(0)


class FaultProcess:
    """The fault upstream as a child process on a fixed port."""

    def __init__(self, port: int):
        self.port = port
        self.proc = Proc([sys.executable, "-m", "tests.test_faults", "serve", "--port", str(port)],
                         cwd=str(_repo()))
        try:
            self.proc.wait_for(r"fault upstream: serving", timeout=30)
        except BaseException:
            self.proc.stop()
            raise

    def kill(self) -> None:
        self.proc.signal(signal.SIGKILL)
        self.proc.popen.wait(10)
        self.proc.stop()

    def pause(self) -> None:
        self.proc.signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.signal(signal.SIGCONT)

    def stop(self) -> None:
        self.resume()
        self.proc.stop()


def _repo():
    from tests.harness import REPO
    return REPO


# ---- misbehaving TCP listeners ---------------------------------------------------------------


class TCPListener:
    """Accepts on 127.0.0.1:port and either resets every connection at once (``reset``) or
    holds it open saying nothing (``silent``)."""

    def __init__(self, port: int, mode: str):
        self.mode = mode
        self.accepted = 0
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(64)
        self.sock.settimeout(0.1)
        self.held: list[socket.socket] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            self.accepted += 1
            if self.mode == "reset":
                # Linger 0: close() sends a RST rather than a FIN.
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()
            else:
                self.held.append(conn)

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(5)
        for conn in self.held:
            conn.close()
        self.sock.close()


# ---- observing the sidecar -------------------------------------------------------------------


def resources(pid: int) -> dict:
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    status = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            status[key] = value.strip()
    return {"fds": fds, "threads": int(status["Threads"]),
            "rss_kb": int(status["VmRSS"].split()[0])}


def infer_payload(request_id: str = "r") -> bytes:
    request = pb.ModelInferRequest(model_name="m", id=request_id)
    codec.encode_request(request, {"x": np.ones(4, np.float32)})
    return request.SerializeToString()


class Outcome:
    def __init__(self, name: str, deadline: float | None):
        self.name = name
        self.deadline = deadline
        self.code: grpc.StatusCode | None = None
        self.details = ""
        self.started = time.monotonic()
        self.ended: float | None = None
        self.replies = 0

    @property
    def elapsed(self) -> float:
        return (self.ended or time.monotonic()) - self.started

    def __repr__(self) -> str:
        return (f"{self.name}: {self.code} after {self.elapsed:.2f}s, {self.replies} replies "
                f"({self.details[:100]!r})")


def _finish(outcome: Outcome, error: grpc.RpcError | None) -> None:
    outcome.ended = time.monotonic()
    if error is None:
        outcome.code = OK
    else:
        outcome.code, outcome.details = error.code(), error.details() or ""


def run_unary(channel, method: str, payload: bytes, timeout: float | None,
              delay_ms: int = 0, name: str = "") -> Outcome:
    outcome = Outcome(name or method, timeout)
    try:
        channel.unary_unary(method)(payload, timeout=timeout,
                                    metadata=((DELAY_KEY, str(delay_ms)),))
        _finish(outcome, None)
    except grpc.RpcError as err:
        _finish(outcome, err)
    return outcome


def run_infer_stream(channel, timeout: float, delay_ms: int, messages: int,
                     gap_s: float = 0.1) -> Outcome:
    """ModelStreamInfer with a request every gap_s; counts replies."""
    outcome = Outcome("ModelStreamInfer", timeout)
    stop = threading.Event()

    def requests():
        for index in range(messages):
            if stop.is_set():
                return
            yield infer_payload(f"s{index}")
            stop.wait(gap_s)
    try:
        for _ in channel.stream_stream(MODEL_STREAM_INFER)(
                requests(), timeout=timeout, metadata=((DELAY_KEY, str(delay_ms)),)):
            outcome.replies += 1
        _finish(outcome, None)
    except grpc.RpcError as err:
        _finish(outcome, err)
    finally:
        stop.set()
    return outcome


def run_ticks(channel, timeout: float, half_close: bool = False) -> Outcome:
    """A pass-through stream: one request, then a tick every 50 ms. By default the client keeps
    its side open (a bidi stream); ``half_close`` makes it a server-streaming call."""
    outcome = Outcome("Ticks" if not half_close else "Ticks (server-streaming)", timeout)
    done = threading.Event()

    def requests():
        yield b"go"
        if not half_close:
            done.wait(timeout + 5)
    try:
        for _ in channel.stream_stream(TICKS)(requests(), timeout=timeout):
            outcome.replies += 1
        _finish(outcome, None)
    except grpc.RpcError as err:
        _finish(outcome, err)
    finally:
        done.set()
    return outcome


def in_parallel(jobs) -> list[Outcome]:
    """Run callables returning Outcomes on their own threads; bounded by each call's deadline."""
    with futures.ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        return [f.result(timeout=60) for f in [pool.submit(job) for job in jobs]]


def check_outcomes(outcomes: list[Outcome], allowed: set, fault_at: float | None = None,
                   fault_bound_s: float | None = None) -> None:
    print("\n".join(map(repr, outcomes)))  # shown when a test fails (or with -s)
    for outcome in outcomes:
        assert outcome.code in allowed, outcome
        assert outcome.ended is not None, outcome
        if outcome.deadline is not None:
            assert outcome.elapsed <= outcome.deadline + MARGIN_S, outcome
        if fault_at is not None and fault_bound_s is not None:
            assert outcome.ended <= fault_at + fault_bound_s, \
                f"{outcome} ended {outcome.ended - fault_at:.2f}s after the fault"


# ---- fixtures --------------------------------------------------------------------------------


class Rig:
    """One sidecar for the module, pointed at a fixed port whose occupant the tests change."""

    def __init__(self):
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.upstream: FaultProcess | None = FaultProcess(self.port)
        self.sidecar = Sidecar(self.target, SIDECAR_CONFIG)
        self.pid = self.sidecar.proc.pid
        self.channel = None
        self.baseline = None
        self.rss_samples: list[int] = []

    def up(self) -> None:
        if self.upstream is None:
            self.upstream = FaultProcess(self.port)
        wait_health(self.sidecar.address, serving=True, timeout=20)

    def down(self) -> None:
        if self.upstream is not None:
            self.upstream.stop()
            self.upstream = None

    def normal_request_succeeds(self) -> None:
        with grpc.insecure_channel(self.sidecar.address) as channel:
            reply = channel.unary_unary(MODEL_INFER)(infer_payload("ok"), timeout=5)
            assert pb.ModelInferResponse.FromString(reply).id == "ok"
            assert channel.unary_unary(SLOW)(b"x", timeout=5) == b"slow:x"

    def settle(self) -> dict:
        """Exercise the sidecar normally, then wait for fds/threads to come back to baseline."""
        assert self.sidecar.proc.popen.poll() is None, "the sidecar died"
        self.up()
        self.normal_request_succeeds()
        deadline = time.monotonic() + 15
        while True:
            now = resources(self.pid)
            if self.baseline is None or (
                    now["fds"] <= self.baseline["fds"] + FD_SLACK
                    and now["threads"] <= self.baseline["threads"] + THREAD_SLACK):
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"sidecar resources did not return to baseline: "
                                     f"{now} vs {self.baseline}")
            time.sleep(0.25)
        self.rss_samples.append(now["rss_kb"])
        assert self.sidecar.proc.pid == self.pid
        return now

    def stop(self) -> int:
        self.down()
        return self.sidecar.stop()


@pytest.fixture(scope="module")
def rig():
    rig = Rig()
    try:
        # Warm up every path once (pass-through, inference, both streams), then take the baseline.
        with grpc.insecure_channel(rig.sidecar.address) as channel:
            for _ in range(20):
                run_unary(channel, MODEL_INFER, infer_payload(), 5)
                run_unary(channel, SLOW, b"w", 5)
            run_infer_stream(channel, 5, 0, 3, gap_s=0)
            run_ticks(channel, 0.3)
        time.sleep(1)
        rig.baseline = resources(rig.pid)
        rig.settle()
        yield rig
    finally:
        assert rig.stop() == 0


def kill_upstream_after(rig: Rig, delay_s: float) -> tuple[threading.Thread, list[float]]:
    """SIGKILL the rig's upstream ``delay_s`` from now, on a thread; the list gets the moment."""
    victim, rig.upstream = rig.upstream, None
    killed_at: list[float] = []

    def kill() -> None:
        time.sleep(delay_s)
        killed_at.append(time.monotonic())
        victim.kill()
    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return thread, killed_at


@pytest.fixture
def fresh(rig):
    rig.up()
    yield rig
    rig.settle()


# ---- tests -----------------------------------------------------------------------------------


def test_upstream_down_at_start_then_up_without_restart():
    port = free_port()
    target = f"127.0.0.1:{port}"
    proxy = Sidecar(target, SIDECAR_CONFIG, wait_ready=False)
    upstream = None
    try:
        wait_health(proxy.address, serving=False)
        with grpc.insecure_channel(proxy.address) as channel:
            outcomes = [run_unary(channel, MODEL_INFER, infer_payload(), 10),
                        run_unary(channel, SLOW, b"x", 10),
                        run_infer_stream(channel, 10, 0, 2, gap_s=0),
                        run_ticks(channel, 10)]
        for outcome in outcomes:
            assert outcome.code == UNAVAILABLE, outcome
            assert outcome.elapsed < 1.5, outcome  # at once, not after the 10 s deadline
            assert f"bastion: upstream {target} unavailable" in outcome.details, outcome
        upstream = FaultProcess(port)
        came_up = time.monotonic()
        wait_health(proxy.address, serving=True, timeout=10)
        # Readiness polls every 0.25 s and reconnect backoff is capped at 2 s.
        assert time.monotonic() - came_up < 4
        with grpc.insecure_channel(proxy.address) as channel:
            outcome = run_unary(channel, MODEL_INFER, infer_payload(), 5)
            assert outcome.code == OK, outcome
            assert run_infer_stream(channel, 5, 0, 3, gap_s=0).replies == 3
        assert proxy.proc.popen.poll() is None
    finally:
        if upstream is not None:
            upstream.stop()
        assert proxy.stop() == 0


def test_upstream_killed_mid_request_and_mid_stream(fresh):
    """SIGKILL while unary calls wait on the upstream and streams are mid-flow: every call ends
    UNAVAILABLE, naming the upstream, promptly (well before its deadline)."""
    deadline = 20.0
    with grpc.insecure_channel(fresh.sidecar.address) as channel:
        jobs = ([lambda i=i: run_unary(channel, MODEL_INFER, infer_payload(f"k{i}"), deadline,
                                       delay_ms=15000, name="ModelInfer") for i in range(6)]
                + [lambda: run_unary(channel, SLOW, b"s", deadline, delay_ms=15000)
                   for _ in range(4)]
                + [lambda: run_infer_stream(channel, deadline, 0, 150) for _ in range(3)]
                + [lambda: run_ticks(channel, deadline) for _ in range(3)])
        killer, killed_at = kill_upstream_after(fresh, 1.0)
        outcomes = in_parallel(jobs)
        killer.join(30)
    check_outcomes(outcomes, {UNAVAILABLE}, killed_at[0], 2 * MARGIN_S)
    streams = [o for o in outcomes if o.name in ("ModelStreamInfer", "Ticks")]
    assert all(o.replies > 0 for o in streams), streams  # they really were mid-stream
    assert all(fresh.target in o.details for o in outcomes), outcomes


def test_upstream_killed_repeatedly_under_load(fresh):
    """Three rounds of: 16 calls in flight, SIGKILL the upstream mid-way, restart it. Every call
    ends OK (answered before the kill) or UNAVAILABLE, before its deadline."""
    for round_index in range(3):
        fresh.up()
        with grpc.insecure_channel(fresh.sidecar.address) as channel:
            jobs = [lambda i=i: run_unary(channel, MODEL_INFER, infer_payload(f"{i}"), 10,
                                          delay_ms=100 * (i % 8), name="ModelInfer")
                    for i in range(16)]
            killer, killed_at = kill_upstream_after(fresh, 0.35)
            outcomes = in_parallel(jobs)
            killer.join(30)
        check_outcomes(outcomes, {OK, UNAVAILABLE}, killed_at[0], 2 * MARGIN_S)
        codes = {o.code for o in outcomes}
        assert UNAVAILABLE in codes, outcomes  # the kill did land mid-way
    fresh.up()


def test_upstream_hung_ends_at_the_deadline(fresh):
    """SIGSTOP: the upstream accepts nothing and answers nothing. Calls end DEADLINE_EXCEEDED at
    their deadline; a call without a deadline ends at upstream.timeout_s."""
    fresh.upstream.pause()
    try:
        with grpc.insecure_channel(fresh.sidecar.address) as channel:
            outcomes = in_parallel(
                [lambda: run_unary(channel, MODEL_INFER, infer_payload(), 1.0, name="ModelInfer")
                 for _ in range(4)]
                + [lambda: run_unary(channel, SLOW, b"s", 1.5) for _ in range(4)]
                + [lambda: run_infer_stream(channel, 1.5, 0, 5) for _ in range(2)]
                + [lambda: run_ticks(channel, 1.0) for _ in range(2)]
                + [lambda: run_unary(channel, MODEL_INFER, infer_payload(), None,
                                     name="no deadline")])
        check_outcomes(outcomes, {DEADLINE})
        for outcome in outcomes:
            expected = outcome.deadline or UPSTREAM_TIMEOUT_S
            assert outcome.elapsed >= expected - 0.05, outcome
            assert outcome.elapsed <= expected + MARGIN_S, outcome
    finally:
        fresh.upstream.resume()


def test_upstream_slower_than_the_deadline(fresh):
    """The upstream is alive but takes 5 s: the deadline, not the upstream, ends the calls."""
    with grpc.insecure_channel(fresh.sidecar.address) as channel:
        outcomes = in_parallel(
            [lambda: run_unary(channel, MODEL_INFER, infer_payload(), 0.8, delay_ms=5000,
                               name="ModelInfer") for _ in range(8)]
            + [lambda: run_infer_stream(channel, 1.2, 5000, 2) for _ in range(2)])
    check_outcomes(outcomes, {DEADLINE})
    assert all(o.elapsed >= o.deadline - 0.05 for o in outcomes), outcomes


@pytest.mark.parametrize("mode", ["reset", "silent"])
def test_upstream_that_resets_or_never_speaks(fresh, mode):
    """A TCP listener instead of a model server: one that resets every connection gives
    UNAVAILABLE at once; one that accepts and never speaks HTTP/2 gives UNAVAILABLE or
    DEADLINE_EXCEEDED, by the deadline."""
    fresh.down()
    listener = TCPListener(fresh.port, mode)
    try:
        wait_health(fresh.sidecar.address, serving=False, timeout=10)
        deadline = time.monotonic() + 10
        while listener.accepted == 0:  # the sidecar's reconnect attempts reach the listener
            assert time.monotonic() < deadline, "the sidecar never connected to the listener"
            time.sleep(0.05)
        with grpc.insecure_channel(fresh.sidecar.address) as channel:
            outcomes = []
            # Spread over time: across several reconnect attempts. (A silent peer holds each
            # call to its deadline, so fewer of those.)
            for _ in range(10 if mode == "reset" else 3):
                outcomes.append(run_unary(channel, MODEL_INFER, infer_payload(), 2.0,
                                          name="ModelInfer"))
                time.sleep(0.2)
            outcomes += in_parallel(
                [lambda: run_unary(channel, MODEL_INFER, infer_payload(), 2.0, name="ModelInfer")
                 for _ in range(16)]
                + [lambda: run_unary(channel, SLOW, b"s", 2.0) for _ in range(4)]
                + [lambda: run_infer_stream(channel, 2.0, 0, 3) for _ in range(2)]
                + [lambda: run_ticks(channel, 2.0) for _ in range(2)])
        if mode == "reset":
            check_outcomes(outcomes, {UNAVAILABLE})
            assert all(o.elapsed < 1.0 for o in outcomes), outcomes
            assert all(fresh.target in o.details for o in outcomes), outcomes
        else:
            check_outcomes(outcomes, {UNAVAILABLE, DEADLINE})
    finally:
        listener.stop()


def test_slow_upstream_with_16_in_flight(fresh):
    """16 concurrent calls on a 1 s upstream all complete, concurrently (not one after another),
    three times over."""
    for _ in range(3):
        started = time.monotonic()
        with grpc.insecure_channel(fresh.sidecar.address) as channel:
            outcomes = in_parallel(
                [lambda i=i: run_unary(channel, MODEL_INFER, infer_payload(f"{i}"), 10,
                                       delay_ms=1000, name="ModelInfer") for i in range(10)]
                + [lambda: run_unary(channel, SLOW, b"s", 10, delay_ms=1000) for _ in range(3)]
                + [lambda: run_infer_stream(channel, 10, 1000, 1, gap_s=0) for _ in range(3)])
        assert len(outcomes) == 16
        check_outcomes(outcomes, {OK})
        assert time.monotonic() - started < 4.0, outcomes


def test_server_streaming_method_streams_through(fresh):
    """One request, half-close, then a tick every 50 ms: ticks arrive as they are sent."""
    with grpc.insecure_channel(fresh.sidecar.address) as channel:
        outcome = run_ticks(channel, 1.0, half_close=True)
    assert outcome.code == DEADLINE and outcome.replies >= 5, outcome


def test_resources_back_to_baseline_after_all_faults(rig):
    """Runs last: after every fault above, the same sidecar process serves, and its fds,
    threads and RSS are where they started."""
    now = rig.settle()
    assert now["fds"] <= rig.baseline["fds"] + FD_SLACK, (now, rig.baseline)
    assert now["threads"] <= rig.baseline["threads"] + THREAD_SLACK, (now, rig.baseline)
    # RSS: allocator noise and lazily built caches, not a leak per call; a leak of even one
    # socket or task per failed call would show in the fd and thread counts above.
    assert now["rss_kb"] <= rig.baseline["rss_kb"] * 1.25 + 8192, (now, rig.baseline,
                                                                  rig.rss_samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve")
    serve.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    serve_fault_upstream(args.port)


if __name__ == "__main__":
    main()

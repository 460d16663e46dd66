"""Overload protection: a batched model's queue is bounded, its batches run at most
max_concurrency at a time, and what does not fit is shed at once with an explicit status
(RESOURCE_EXHAUSTED, or the stage's on_error with on_overload: error), never queued without
bound. The latency of admitted requests under 4x load: bench/bench_overload.py."""
from __future__ import annotations

import asyncio
import collections
import json
import re
import shutil
import threading
import time
import urllib.request

import grpc
import pytest

from bastion.detectors.batcher import MicroBatcher, Overloaded, default_max_queue
from bastion.protos import SERVICE, pb
from bastion import traffic
from tests.harness import REPO, Sidecar, Upstream


class SlowModel:
    """run_batch that takes a fixed time per batch (sleeping: no CPU), recording batch sizes,
    how many batches ran at once, and for each item how many items had started before it."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.sizes: list[int] = []
        self.running = 0
        self.most_running = 0
        self.items_started = 0
        self.started_before: dict = {}
        self.lock = threading.Lock()

    def __call__(self, items):
        with self.lock:
            self.running += 1
            self.most_running = max(self.most_running, self.running)
            for item in items:
                self.started_before[item] = self.items_started
            self.items_started += len(items)
        time.sleep(self.seconds)
        with self.lock:
            self.running -= 1
            self.sizes.append(len(items))
        return [f"done:{item}" for item in items]


def test_four_times_capacity_sheds_the_excess_and_bounds_every_admitted_wait():
    model = SlowModel(0.01)
    batcher = MicroBatcher(model, max_batch=4, max_wait_ms=1, threads=2, max_queue=16)
    capacity = batcher.max_concurrency * batcher.max_batch / model.seconds   # 800 items/s
    offered, count = 4 * capacity, 800                                        # 1 s at 4x
    outcomes: collections.Counter = collections.Counter()
    ahead: list[int] = []

    async def one(i: int) -> None:
        started = model.items_started
        try:
            assert await batcher.submit(i) == f"done:{i}"
            outcomes["ok"] += 1
            # Items that went to the model before this one, after it arrived: at most the
            # queue it found (max_queue) plus batches that were sealed but not yet started.
            ahead.append(model.started_before[i] - started)
        except Overloaded as err:
            assert err.max_queue == 16 and err.waiting + 1 > 16
            outcomes["shed"] += 1

    async def scenario() -> None:
        tasks = []
        for i in range(count):                      # open loop: arrivals do not wait
            tasks.append(asyncio.create_task(one(i)))
            await asyncio.sleep(1 / offered)
        await asyncio.gather(*tasks)

    asyncio.run(scenario())
    print(f"4x load: {dict(outcomes)}, most waiting {batcher.max_waiting_seen}, "
          f"batches {batcher.batches}, at most {max(ahead)} items went first")
    assert outcomes["ok"] + outcomes["shed"] == count          # every request ended explicitly
    assert outcomes["shed"] > 0 and batcher.shed == outcomes["shed"]
    assert outcomes["ok"] > 0
    assert batcher.max_waiting_seen <= batcher.max_queue        # memory bounded by the queue
    assert model.most_running <= batcher.max_concurrency
    # Every admitted item's wait is bounded by the queue, whatever the offered load: the
    # latency bound (about max_queue / max_batch + 1 batch times; bench/bench_overload.py).
    assert max(ahead) <= batcher.max_queue + batcher.max_concurrency * batcher.max_batch
    assert batcher.waiting == 0 and batcher.running == 0


def test_a_request_is_queued_whole_or_shed_whole_and_an_idle_queue_takes_any_size():
    model = SlowModel(0.05)
    batcher = MicroBatcher(model, max_batch=2, max_wait_ms=1, threads=1, max_queue=4)

    async def scenario():
        big = asyncio.create_task(batcher.submit_many(list(range(10))))   # idle: admitted
        await asyncio.sleep(0)
        assert batcher.waiting == 10 - 2 * batcher.running
        with pytest.raises(Overloaded):
            await batcher.submit_many(["x", "y"])                         # none of it queued
        assert batcher.shed == 2
        assert await big == [f"done:{i}" for i in range(10)]
        assert await batcher.submit_many(["a", "b", "c"]) == ["done:a", "done:b", "done:c"]

    asyncio.run(scenario())
    assert sorted(set(model.sizes)) <= [1, 2]


def test_default_queue_bound():
    assert default_max_queue(16, 1) == 128
    assert default_max_queue(64, 2) == 1024
    assert MicroBatcher(lambda items: items, max_batch=1).max_queue == 128


# --------------------------------------------------------------------------------------------
# The sidecar: shed requests end RESOURCE_EXHAUSTED (or follow on_error), counted and audited

CONFIG = """
audit: {{output: "{audit}"}}
models:
  text-classifier:
    mode: enforce
    pipeline:
      - detect.perplexity: {{id: ppl, max_batch: 2, max_wait_ms: 1, max_queue: 2}}
  echo-skip:
    mode: enforce
    pipeline:
      - detect.perplexity: {{id: ppl, max_batch: 2, max_wait_ms: 1, max_queue: 2,
                             on_overload: error, on_error: open}}
"""


def text_request(model: str, text: str) -> bytes:
    request = traffic.text_request(text)
    request.model_name = model
    return request.SerializeToString()


def flood(address: str, model: str, count: int) -> list[tuple[str, str, dict]]:
    """``count`` calls at once (bounded), each with its own long-enough prompt."""
    async def run():
        async with grpc.aio.insecure_channel(address) as channel:
            call = channel.unary_unary(f"/{SERVICE}/ModelInfer")

            async def one(i):
                text = f"request {i}: " + "please summarise the following paragraph " * 20
                try:
                    reply = await call(text_request(model, text), timeout=60)
                    return "OK", "", dict(pb.ModelInferResponse.FromString(reply).parameters)
                except grpc.aio.AioRpcError as err:
                    return err.code().name, err.details() or "", dict(err.trailing_metadata()
                                                                     or ())
            return await asyncio.gather(*(one(i) for i in range(count)))
    return asyncio.run(run())


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory):
    root = tmp_path_factory.mktemp("overload")
    models = root / "models"
    for name in ("text-classifier", "echo-skip"):       # the demo text model twice
        shutil.copytree(REPO / "bastion" / "demo_models" / "text-classifier", models / name)
    upstream = Upstream(models=str(models))
    audit = root / "audit.jsonl"
    side = None
    try:
        side = Sidecar(upstream.address, config=CONFIG.format(audit=audit))
        yield side, audit
    finally:
        if side is not None:
            assert side.stop() == 0
        upstream.stop()


def metric(admin: str, name: str) -> float:
    text = urllib.request.urlopen(f"http://{admin}/metrics", timeout=5).read().decode()
    return sum(float(v) for v in re.findall(rf"^{name}\{{[^}}]*\}} (\S+)$", text, re.M))


def test_sidecar_sheds_with_resource_exhausted_counted_and_audited(sidecar):
    side, audit = sidecar
    assert metric(side.admin, "bastion_shed_requests_total") == 0      # exported before any
    results = flood(side.address, "text-classifier", 60)
    codes = collections.Counter(code for code, _, _ in results)
    print(dict(codes))
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes        # explicit, nothing else
    assert codes["RESOURCE_EXHAUSTED"] > 0 and codes["OK"] > 0
    shed = [(details, trailers) for code, details, trailers in results
            if code == "RESOURCE_EXHAUSTED"]
    for details, trailers in shed:
        assert details.startswith("bastion: overloaded: stage ppl is at capacity"), details
        assert int(trailers["retry-after-ms"]) > 0
        assert trailers["bastion-reasons"] == "overloaded:ppl"
    assert metric(side.admin, "bastion_shed_requests_total") == len(shed)
    records = [json.loads(line) for line in audit.read_text().splitlines()
               if '"overloaded:ppl"' in line]
    assert len(records) == len(shed)
    assert {(r["verdict"], r["stage"], r["status"]) for r in records} == \
        {("throttle", "ppl", "RESOURCE_EXHAUSTED")}


def test_on_overload_error_skips_the_stage_under_on_error_open(sidecar):
    side, _ = sidecar
    results = flood(side.address, "echo-skip", 60)
    codes = collections.Counter(code for code, _, _ in results)
    assert set(codes) == {"OK"}, codes
    skipped = [p for _, _, p in results
               if "stage_overloaded:fail_open" in p.get("bastion.reasons",
                                                        pb.InferParameter()).string_param]
    assert skipped, "no request found the stage at capacity"

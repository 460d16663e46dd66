"""ModelStreamInfer lives as long as the client wants, and refusals in a stream name their request.

A real `bastion serve` in front of the scripted upstream (tests/scripted_upstream.py: a model that
never answers, a decoupled one answering in chunks) and in front of `bastion upstream` with
tritonclient's stream API, which sets no deadline. `upstream.timeout_s` is 1 s here: before
proxy/streams.py it cut every deadline-less stream at that point.
"""
from __future__ import annotations

import queue
import threading
import time

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc

from bastion import traffic
from bastion.protos import codec, pb
from tests import scripted_upstream as su
from tests.harness import Sidecar, Upstream
from tests.test_proxy_forwarding import upstream  # noqa: F401 (the scripted upstream fixture)
from tests.test_tensor_codec import MALFORMED

TIMEOUT_S, IDLE_S, LIFETIME_S = 1.0, 1.5, 2.0
CONFIG = f"upstream: {{timeout_s: {TIMEOUT_S}, stream_idle_timeout_s: {IDLE_S}}}\n"
MARGIN_S = 1.0  # scheduling slack on a loaded 2-core machine; every bound is checked both ways


@pytest.fixture(scope="module")
def sidecar(upstream):
    proc = Sidecar(upstream.address, config=CONFIG)
    yield proc
    assert proc.stop() == 0


def request(request_id: str, model: str = "m") -> bytes:
    message = pb.ModelInferRequest(model_name=model, id=request_id)
    codec.encode_request(message, {"x": np.ones(2, np.float32)})
    return message.SerializeToString()


def run_stream(address: str, plan, timeout: float | None = None, hold: threading.Event | None = None):
    """Send ``plan`` [(seconds to wait first, message)], then keep the stream open until ``hold``
    is set (if given). Returns (replies, status code, details, seconds)."""
    def messages():
        for wait, message in plan:
            time.sleep(wait)
            yield message
        if hold is not None:
            hold.wait(30)

    replies, started = [], time.monotonic()
    with grpc.insecure_channel(address) as channel:
        call = channel.stream_stream(su.MODEL_STREAM_INFER)(messages(), timeout=timeout)
        try:
            for reply in call:
                replies.append(pb.ModelStreamInferResponse.FromString(reply))
            code, details = call.code(), call.details()
        except grpc.RpcError as error:
            code, details = error.code(), error.details()
    return replies, code, details, time.monotonic() - started


def test_stream_without_deadline_outlives_the_unary_timeout(sidecar):
    # 2.5 s between the two requests: past upstream.timeout_s, and past the idle timeout too,
    # which must not count while no request is waiting.
    replies, code, _, elapsed = run_stream(sidecar.address, [(0, request("a")), (2.5, request("b"))])
    assert code == grpc.StatusCode.OK
    assert [r.infer_response.id for r in replies] == ["a", "b"]
    assert elapsed >= 2.5


def test_client_deadline_still_bounds_the_stream_and_reaches_the_upstream(upstream, sidecar):
    hold = threading.Event()
    try:
        replies, code, _, elapsed = run_stream(sidecar.address, [(0, request("d"))], timeout=1.2,
                                               hold=hold)
    finally:
        hold.set()
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert [r.infer_response.id for r in replies] == ["d"]
    assert 1.2 - 0.05 <= elapsed <= 1.2 + MARGIN_S
    with upstream.lock:
        seen = [c["time_remaining"] for c in upstream.calls if c["method"] == su.MODEL_STREAM_INFER
                and pb.ModelInferRequest.FromString(c["payload"]).id == "d"]
    # The client's deadline, not none and not the lifetime; gRPC rounds timeouts up a little.
    assert len(seen) == 1 and seen[0] is not None and 0.5 < seen[0] <= 1.25, seen


def test_silent_upstream_ends_the_stream_at_the_idle_timeout(sidecar):
    hold = threading.Event()
    try:
        replies, code, details, elapsed = run_stream(
            sidecar.address, [(0, request("ok")), (0.2, request("lost", su.SILENT_MODEL))],
            hold=hold)
    finally:
        hold.set()
    assert [r.infer_response.id for r in replies] == ["ok"]
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "stream_idle_timeout_s" in details and "1 request(s)" in details
    assert 0.2 + IDLE_S - 0.05 <= elapsed <= 0.2 + IDLE_S + MARGIN_S


def test_decoupled_chunks_keep_the_stream_alive_until_the_final_one(sidecar):
    # Five chunks 0.5 s apart: the stream outlives timeout_s and the idle timeout in total,
    # while no gap reaches the idle timeout.
    started = time.monotonic()
    replies, code, _, _ = run_stream(sidecar.address, [(0, request("g", su.DECOUPLED_MODEL))])
    assert code == grpc.StatusCode.OK
    assert [r.infer_response.id for r in replies] == ["g"] * su.CHUNKS
    finals = [r.infer_response.parameters["triton_final_response"].bool_param for r in replies]
    assert finals == [False] * (su.CHUNKS - 1) + [True]
    assert time.monotonic() - started >= (su.CHUNKS - 1) * su.CHUNK_GAP_S > IDLE_S


def test_max_stream_lifetime_ends_every_stream(upstream):
    proxy = Sidecar(upstream.address, config=CONFIG.replace(
        "}", f", max_stream_lifetime_s: {LIFETIME_S}}}"))
    hold = threading.Event()
    try:
        replies, code, details, elapsed = run_stream(proxy.address, [(0, request("l"))], hold=hold)
        # A client deadline shorter than the lifetime is the client's, with the upstream's words.
        _, short_code, short_details, short_elapsed = run_stream(
            proxy.address, [(0, request("s"))], timeout=0.8, hold=hold)
    finally:
        hold.set()
        assert proxy.stop() == 0
    assert [r.infer_response.id for r in replies] == ["l"]
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "max_stream_lifetime_s" in details
    assert LIFETIME_S - 0.05 <= elapsed <= LIFETIME_S + MARGIN_S
    assert short_code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "max_stream_lifetime_s" not in short_details and short_elapsed < LIFETIME_S


def test_refusals_carry_the_refused_request_id_and_model_in_order(sidecar):
    bad, _ = MALFORMED["byte count"]
    refused = []
    for request_id in ("b1", "b'3\u00e9"):
        message = pb.ModelInferRequest()
        message.CopyFrom(bad)
        message.id = request_id
        refused.append(message.SerializeToString())
    plan = [(0, request("g0")), (0, refused[0]), (0, request("g2")), (0, refused[1])]
    replies, code, _, _ = run_stream(sidecar.address, plan)
    assert code == grpc.StatusCode.OK
    errors = [r for r in replies if r.error_message]
    assert [r.infer_response.id for r in errors] == ["b1", "b?3?"]  # printable ASCII only
    assert all(r.infer_response.model_name == bad.model_name for r in errors)
    assert "(request id 'b1')" in errors[0].error_message
    assert sorted(r.infer_response.id for r in replies if not r.error_message) == ["g0", "g2"]


# ---- tritonclient's stream API against the reference model server ----------------------------

TEXT_LIMIT_CONFIG = CONFIG + f"""
models:
  {traffic.TEXT_MODEL}:
    inputs: {{prompt: {{datatype: BYTES, kind: text}}}}
    pipeline:
      - limit.text: {{max_bytes: 64}}
"""


def text_inputs(text: str):
    item = tc.InferInput("prompt", [1, 1], "BYTES")
    item.set_data_from_numpy(np.array([[text.encode()]], dtype=object))
    return [item]


def test_tritonclient_stream_outlives_the_timeout_and_matches_refusals_by_id():
    server = Upstream()
    proxy = Sidecar(server.address, config=TEXT_LIMIT_CONFIG)
    results: queue.Queue = queue.Queue()
    client = tc.InferenceServerClient(proxy.address)
    try:
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        client.async_stream_infer(traffic.TEXT_MODEL, text_inputs("short and fine"), request_id="t1")
        first = results.get(timeout=20)
        time.sleep(2 * TIMEOUT_S + 0.5)
        client.async_stream_infer(traffic.TEXT_MODEL, text_inputs("x" * 200), request_id="too-long")
        client.async_stream_infer(traffic.TEXT_MODEL, text_inputs("fine again"), request_id="t3")
        rest = [results.get(timeout=20) for _ in range(2)]
        client.stop_stream()
    finally:
        client.close()
        proxy.stop()
        server.stop()
    assert first[1] is None and first[0].get_response().id == "t1"
    answered = [r.get_response().id for r, e in rest if e is None]
    refused = [str(e) for r, e in rest if e is not None]
    assert answered == ["t3"]
    assert len(refused) == 1 and "request id 'too-long'" in refused[0]
    assert "x" * 20 not in refused[0]  # the refusal never echoes the input

"""The data path against a scripted upstream: what passes unchanged, what is refused, and how.

The sidecar runs as a real process (`bastion serve`); the upstream is a real gRPC server in this
process whose methods include ones Bastion has never heard of.
"""
from __future__ import annotations

import time
from concurrent import futures

import grpc
import numpy as np
import pytest

from bastion.protos import codec, pb
from tests import scripted_upstream as su
from tests.harness import Sidecar, free_port, wait_health
from tests.test_tensor_codec import MALFORMED


@pytest.fixture(scope="module")
def upstream():
    server = su.ScriptedUpstream()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def sidecar(upstream):
    proc = Sidecar(upstream.address)
    yield proc
    assert proc.stop() == 0


def call_unary(address, method, payload, **kwargs):
    with grpc.insecure_channel(address) as channel:
        return channel.unary_unary(method).with_call(payload, **kwargs)


def outcome(address, method, payload, **kwargs):
    """(reply, initial metadata, trailing metadata, code, details) of one unary call."""
    try:
        reply, call = call_unary(address, method, payload, **kwargs)
        return reply, dict(call.initial_metadata()), dict(call.trailing_metadata()), call.code(), call.details()
    except grpc.RpcError as err:
        return None, dict(err.initial_metadata()), dict(err.trailing_metadata()), err.code(), err.details()


@pytest.mark.parametrize("method", [su.UNKNOWN_UNARY, su.REPO_LOAD])
def test_unary_methods_pass_byte_identical(upstream, sidecar, method):
    payload = bytes(range(256)) * 3  # not a valid message of any type Bastion knows
    direct = outcome(upstream.address, method, payload)
    proxied = outcome(sidecar.address, method, payload)
    assert direct[0] == payload[::-1] + b"!"
    assert proxied == direct
    assert upstream.last(method)["payload"] == payload


def test_unknown_bidi_stream_passes(upstream, sidecar):
    messages = [b"alpha", b"", b"\x00" * 1000, b"omega"]

    def run(address):
        with grpc.insecure_channel(address) as channel:
            return list(channel.stream_stream(su.UNKNOWN_STREAM)(iter(messages), timeout=10))

    assert run(sidecar.address) == run(upstream.address) == [bytes([i]) + m for i, m in enumerate(messages)]


def test_upstream_error_status_passes_unchanged(upstream, sidecar):
    direct = outcome(upstream.address, su.FAIL, b"x")
    proxied = outcome(sidecar.address, su.FAIL, b"x")
    assert direct[3] == grpc.StatusCode.RESOURCE_EXHAUSTED and direct[4] == su.FAIL_DETAILS
    assert proxied[3:] == direct[3:]
    assert proxied[2]["x-error-id"] == "42" and proxied[2]["x-why-bin"] == b"\x01\x02"


def test_metadata_forwarded_without_hop_by_hop_and_with_request_id(upstream, sidecar):
    call_unary(sidecar.address, su.UNKNOWN_UNARY, b"m",
               metadata=(("x-tenant", "blue"), ("proxy-authorization", "secret"),
                         ("keep-alive", "timeout=5")))
    seen = upstream.last(su.UNKNOWN_UNARY)["metadata"]
    assert seen["x-tenant"] == "blue"
    assert "proxy-authorization" not in seen and "keep-alive" not in seen
    assert len(seen["bastion-request-id"]) == 32


def test_deadline_propagates_and_cancels_upstream(upstream, sidecar):
    upstream.slow_cancelled.clear()
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        call_unary(sidecar.address, su.SLOW, b"s", timeout=0.6)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 1.5
    assert upstream.last(su.SLOW)["time_remaining"] <= 0.65  # not the 30 s default
    assert upstream.slow_cancelled.wait(3), "upstream call was not cancelled"


def test_client_cancellation_reaches_upstream(upstream, sidecar):
    upstream.slow_cancelled.clear()
    with grpc.insecure_channel(sidecar.address) as channel:
        future = channel.unary_unary(su.SLOW).future(b"s", timeout=30)
        time.sleep(0.5)
        future.cancel()
    assert upstream.slow_cancelled.wait(3), "cancel did not propagate to the upstream"


def infer_request(arrays, model="m", request_id="r1") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, id=request_id)
    codec.encode_request(request, arrays)
    return request


def test_valid_model_infer_is_forwarded_byte_identical(upstream, sidecar):
    request = infer_request({"x": np.arange(6, dtype=np.float32).reshape(2, 3),
                             "p": codec.as_bytes_array(["hello"])})
    payload = request.SerializeToString()
    reply, _ = call_unary(sidecar.address, su.MODEL_INFER, payload, timeout=5)
    assert pb.ModelInferResponse.FromString(reply).id == "r1"
    assert upstream.last(su.MODEL_INFER)["payload"] == payload


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_infer_is_refused_before_the_upstream(upstream, sidecar, case):
    request, fragments = MALFORMED[case]
    before = upstream.count(su.MODEL_INFER)
    reply, _, trailing, code, details = outcome(sidecar.address, su.MODEL_INFER,
                                                request.SerializeToString(), timeout=5)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("bastion: ")
    for fragment in fragments:
        assert fragment in details
    assert len(trailing["bastion-request-id"]) == 32
    assert upstream.count(su.MODEL_INFER) == before


def test_undecodable_protobuf_is_invalid_argument(upstream, sidecar):
    before = upstream.count(su.MODEL_INFER)
    _, _, _, code, details = outcome(sidecar.address, su.MODEL_INFER, b"\xff\xff\xff", timeout=5)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "not a valid ModelInferRequest" in details
    assert upstream.count(su.MODEL_INFER) == before


def test_stream_infer_forwards_valid_and_answers_malformed_in_band(upstream, sidecar):
    good = [infer_request({"x": np.ones(2, np.float32)}, request_id=f"g{i}") for i in range(3)]
    bad, _ = MALFORMED["byte count"]
    messages = [good[0], bad, good[1], good[2]]
    before = upstream.count(su.MODEL_STREAM_INFER)
    with grpc.insecure_channel(sidecar.address) as channel:
        replies = [pb.ModelStreamInferResponse.FromString(r) for r in channel.stream_stream(
            su.MODEL_STREAM_INFER)(iter(m.SerializeToString() for m in messages), timeout=10)]
    assert sorted(r.infer_response.id for r in replies if not r.error_message) == ["g0", "g1", "g2"]
    errors = [r.error_message for r in replies if r.error_message]
    assert len(errors) == 1 and "INVALID" not in errors[0] and "'img'" in errors[0]
    assert upstream.count(su.MODEL_STREAM_INFER) == before + 3


def test_upstream_down_is_unavailable_naming_it_and_fast():
    dead = f"127.0.0.1:{free_port()}"
    proxy = Sidecar(dead, wait_ready=False)
    try:
        wait_health(proxy.address, serving=False)
        started = time.monotonic()
        _, _, _, code, details = outcome(proxy.address, su.MODEL_INFER,
                                         infer_request({"x": np.ones(1, np.float32)}).SerializeToString(),
                                         timeout=10)
        assert code == grpc.StatusCode.UNAVAILABLE
        assert dead in details and details.startswith("bastion: upstream")
        assert time.monotonic() - started < 3
        _, _, _, code, details = outcome(proxy.address, su.UNKNOWN_UNARY, b"x", timeout=10)
        assert code == grpc.StatusCode.UNAVAILABLE and dead in details
    finally:
        assert proxy.stop() == 0


def test_health_follows_upstream_readiness():
    port = free_port()
    proxy = Sidecar(f"127.0.0.1:{port}", wait_ready=False)
    server = None
    try:
        wait_health(proxy.address, serving=False)
        # A v2 ServerReady on the expected port: the sidecar polls it and turns SERVING.
        server = grpc.server(futures.ThreadPoolExecutor(2))

        class Ready(grpc.GenericRpcHandler):
            def service(self, details):
                if details.method.endswith("/ServerReady"):
                    return grpc.unary_unary_rpc_method_handler(
                        lambda req, ctx: pb.ServerReadyResponse(ready=True).SerializeToString())
                return None

        server.add_generic_rpc_handlers((Ready(),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        server.start()
        wait_health(proxy.address, serving=True)
        server.stop(0)
        wait_health(proxy.address, serving=False)
    finally:
        if server is not None:
            server.stop(0)
        assert proxy.stop() == 0


SHM_CONFIG = """
models:
  guarded: {mode: enforce, pipeline: [{detect.signatures: {threshold: 1}}]}
  watched: {mode: monitor, pipeline: [{detect.signatures: {threshold: 1}}]}
  allowed: {mode: enforce, shared_memory: pass}
"""


def shm_request(model: str) -> bytes:
    """A Triton shared-memory request: the tensor's bytes live in a region, not the message."""
    request = pb.ModelInferRequest(model_name=model, id="shm")
    item = request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    item.parameters["shared_memory_region"].string_param = "region0"
    item.parameters["shared_memory_byte_size"].int64_param = 16
    return request.SerializeToString()


def test_shared_memory_requests_follow_the_model_policy(upstream):
    proxy = Sidecar(upstream.address, config=SHM_CONFIG)
    try:
        before = upstream.count(su.MODEL_INFER)
        _, _, trailers, code, details = outcome(proxy.address, su.MODEL_INFER,
                                                shm_request("guarded"), timeout=5)
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert details == "bastion: blocked by policy (shared_memory_uninspectable)"
        assert upstream.count(su.MODEL_INFER) == before  # deny by default in enforce mode
        reply, _, _, code, _ = outcome(proxy.address, su.MODEL_INFER, shm_request("watched"),
                                       timeout=5)
        assert code == grpc.StatusCode.OK  # monitor: forwarded, annotated
        params = pb.ModelInferResponse.FromString(reply).parameters
        assert params["bastion.reasons"].string_param == "shared_memory_uninspectable"
        _, _, _, code, _ = outcome(proxy.address, su.MODEL_INFER, shm_request("allowed"),
                                   timeout=5)
        assert code == grpc.StatusCode.OK  # shared_memory: pass
        _, _, _, code, _ = outcome(proxy.address, su.MODEL_INFER, shm_request("unlisted"),
                                   timeout=5)
        assert code == grpc.StatusCode.OK  # no config for the model: pass-through
        assert upstream.count(su.MODEL_INFER) == before + 3
    finally:
        assert proxy.stop() == 0

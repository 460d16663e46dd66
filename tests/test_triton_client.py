"""tritonclient (unmodified) through `bastion serve` in front of `bastion upstream`.

Every answer through the sidecar must equal the answer from the upstream directly.
"""
from __future__ import annotations

import queue

import numpy as np
import pytest
import tritonclient.grpc as tc

from bastion import traffic
from tests.harness import Sidecar, Upstream


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    server = Upstream(request_log=tmp_path_factory.mktemp("upstream") / "requests.jsonl")
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def sidecar(upstream):
    proc = Sidecar(upstream.address)
    yield proc
    assert proc.stop() == 0


@pytest.fixture(scope="module")
def clients(upstream, sidecar):
    direct = tc.InferenceServerClient(upstream.address)
    proxied = tc.InferenceServerClient(sidecar.address)
    yield direct, proxied
    direct.close()
    proxied.close()


def test_health_and_metadata_identical(clients):
    direct, proxied = clients
    assert proxied.is_server_live() and proxied.is_server_ready()
    for model in (traffic.IMAGE_MODEL, traffic.TEXT_MODEL):
        assert proxied.is_model_ready(model) is True
        assert proxied.get_model_metadata(model) == direct.get_model_metadata(model)
    assert proxied.is_model_ready("no-such-model") is False
    assert proxied.get_server_metadata() == direct.get_server_metadata()


def image_inputs(count=4):
    images, _ = traffic.load_images()
    item = tc.InferInput("image", [count, 1, 28, 28], "FP32")
    item.set_data_from_numpy(images[:count])
    return [item]


def text_inputs(texts):
    item = tc.InferInput("prompt", [len(texts), 1], "BYTES")
    item.set_data_from_numpy(np.array([[t.encode()] for t in texts], dtype=object))
    return [item]


def test_fp32_infer_identical(clients):
    direct, proxied = clients
    want = direct.infer(traffic.IMAGE_MODEL, image_inputs(), request_id="a")
    got = proxied.infer(traffic.IMAGE_MODEL, image_inputs(), request_id="a")
    for name in ("logits", "features"):
        assert np.array_equal(got.as_numpy(name), want.as_numpy(name))
    assert got.as_numpy("logits").shape == (4, 10) and got.as_numpy("features").shape == (4, 64)
    assert got.get_response().id == "a"


def test_fp32_infer_with_requested_output_subset(clients):
    direct, proxied = clients
    outputs = [tc.InferRequestedOutput("logits")]
    got = proxied.infer(traffic.IMAGE_MODEL, image_inputs(2), outputs=outputs)
    want = direct.infer(traffic.IMAGE_MODEL, image_inputs(2), outputs=outputs)
    assert got.as_numpy("features") is None
    assert np.array_equal(got.as_numpy("logits"), want.as_numpy("logits"))


def test_bytes_infer_identical(clients):
    direct, proxied = clients
    texts = ["It is a truth universally acknowledged.", "Use the with statement to open files.",
             "In the beginning", "h\u00e9llo \u2603"]
    want = direct.infer(traffic.TEXT_MODEL, text_inputs(texts))
    got = proxied.infer(traffic.TEXT_MODEL, text_inputs(texts))
    for name in ("probabilities", "label"):
        assert np.array_equal(got.as_numpy(name), want.as_numpy(name))
    assert got.as_numpy("probabilities").shape == (4, 3)


def collect_stream(client, requests):
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    for request_id, model, inputs in requests:
        client.async_stream_infer(model, inputs, request_id=request_id)
    out = {}
    for _ in requests:
        result, error = results.get(timeout=20)
        assert error is None, error
        response = result.get_response()
        out[response.id] = {o.name: result.as_numpy(o.name) for o in response.outputs}
    client.stop_stream()
    return out


def test_stream_infer_identical(clients):
    direct, proxied = clients
    requests = [("s1", traffic.IMAGE_MODEL, image_inputs(1)),
                ("s2", traffic.TEXT_MODEL, text_inputs(["Thou shalt not"])),
                ("s3", traffic.IMAGE_MODEL, image_inputs(3))]
    want = collect_stream(direct, requests)
    got = collect_stream(proxied, requests)
    assert sorted(got) == ["s1", "s2", "s3"]
    for request_id, outputs in want.items():
        for name, value in outputs.items():
            assert np.array_equal(got[request_id][name], value)


def test_upstream_errors_pass_through(clients):
    direct, proxied = clients
    with pytest.raises(tc.InferenceServerException) as want:
        direct.infer("no-such-model", image_inputs(1))
    with pytest.raises(tc.InferenceServerException) as got:
        proxied.infer("no-such-model", image_inputs(1))
    assert (got.value.status(), got.value.message()) == (want.value.status(), want.value.message())


def test_malformed_never_reaches_upstream(upstream, sidecar):
    import grpc
    before = upstream.requests_seen()
    with grpc.insecure_channel(sidecar.address) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        for name, payload in traffic.malformed_requests().items():
            with pytest.raises(grpc.RpcError) as err:
                infer(payload, timeout=5)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
    assert upstream.requests_seen() == before

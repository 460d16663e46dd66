"""Token budgets end to end: two `bastion serve` replicas share one redis-server in front of
`bastion upstream`'s text-generator, driven by tritonclient (unary and stream). A client's input
tokens and generated tokens spent on one replica count on the other; over budget is
RESOURCE_EXHAUSTED with `retry-after-ms`, and a prompt larger than the whole budget is
INVALID_ARGUMENT. Budgets refill slowly (0.01 token/s), so timing cannot flip a result.
"""
from __future__ import annotations

import queue
import shutil
import subprocess
import time

import numpy as np
import pytest
import tritonclient.grpc as tc

from tests.harness import Sidecar, Upstream, free_port

MODEL = "text-generator"
CONFIG = """
clients:
  identity: ["header:x-client-id", "peer"]
  backend: redis
  redis: {{url: "redis://127.0.0.1:{port}/0", timeout_ms: 200}}
  token_budgets:
    input: {{tokens_per_s: 0.01, burst: 60}}
    output: {{tokens_per_s: 0.01, burst: 20}}
"""


@pytest.fixture(scope="module")
def replicas():
    server = shutil.which("redis-server")
    assert server, "redis-server is missing: scripts/install.sh --test installs it"
    port = free_port()
    redis = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no"], stdout=subprocess.DEVNULL)
    upstream = Upstream()
    sidecars = []
    try:
        time.sleep(0.3)
        env = {"BASTION_CLIENT_KEY_SECRET": "test-secret-shared-by-replicas"}
        sidecars = [Sidecar(upstream.address, config=CONFIG.format(port=port), env=env)
                    for _ in range(2)]
        yield sidecars
    finally:
        for sidecar in sidecars:
            sidecar.stop()
        upstream.stop()
        redis.terminate()
        redis.wait(10)


def text_input(text: str) -> list[tc.InferInput]:
    item = tc.InferInput("text_input", [1], "BYTES")
    item.set_data_from_numpy(np.array([text.encode()], dtype=object))
    return [item]


def infer(address: str, client_id: str, text: str, **parameters):
    """("OK", text) or (status, (message, trailers))."""
    with tc.InferenceServerClient(address) as client:
        try:
            result = client.infer(MODEL, text_input(text), headers={"x-client-id": client_id},
                                  parameters=parameters)
            return "OK", result.as_numpy("text_output")[0].decode()
        except tc.InferenceServerException as err:
            return err.status().removeprefix("StatusCode."), err.message()


def test_input_tokens_are_shared_across_replicas(replicas):
    a, b = replicas
    prompt = "word " * 20  # 20 tokens or so under the tiny LM's byte-level BPE
    one = {"max_tokens": 1, "temperature": 0.0}  # one generated token: the output budget holds
    codes = [infer(r.address, "alice", prompt, **one)[0] for r in (a, b, a, b)]
    # 60 input tokens in all: the first two or three prompts fit, whichever replica they hit.
    assert codes[0] == codes[1] == "OK" and codes[-1] == "RESOURCE_EXHAUSTED", codes
    status, message = infer(b.address, "alice", prompt, **one)
    assert status == "RESOURCE_EXHAUSTED" and "input token budget" in message
    assert "word" not in message
    assert infer(a.address, "bob", prompt, **one)[0] == "OK"  # another client has its own budget


def test_a_prompt_larger_than_the_budget_is_invalid_not_retried(replicas):
    status, message = infer(replicas[0].address, "carol", "word " * 200, max_tokens=1)
    assert status == "INVALID_ARGUMENT" and "too large for the token budget" in message


def test_generated_tokens_put_the_client_in_debt_on_both_replicas(replicas):
    a, b = replicas
    long_answer = "generated text " * 20  # echoed back: ~40 output tokens against a burst of 20
    assert infer(a.address, "dave", long_answer[:30], echo=True)[0] == "OK"
    # A stream on replica a generates past the output budget: it finishes (already generated),
    # and the debt is what refuses the next request, on either replica.
    results: queue.Queue = queue.Queue()
    with tc.InferenceServerClient(a.address) as client:
        client.start_stream(callback=lambda result, error: results.put((result, error)),
                            headers={"x-client-id": "dave"})
        client.async_stream_infer(MODEL, text_input(long_answer), request_id="g",
                                  parameters={"echo": True, "chunk_chars": 8})
        while True:
            result, error = results.get(timeout=30)
            assert error is None, error
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
        client.stop_stream()
    status, message = infer(b.address, "dave", "short", echo=True)
    assert status == "RESOURCE_EXHAUSTED" and "output token budget" in message

"""The reference upstream's decoupled text-generation model, ``text-generator``.

`bastion upstream` (the bundled demo models) driven by tritonclient's stream API and by raw gRPC:
the framing Triton uses for decoupled models (one response per chunk, ``triton_final_response``
false, then an empty final response flagged true, every one with the request's id), unary
answers equal to the joined chunks for a seed, echo mode, max_tokens, several requests on one
stream, and errors. Plus the model's pieces without a server (bastion/reference_server/generation.py).
"""
from __future__ import annotations

import queue

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc

from bastion.protos import codec, pb
from bastion.reference_server import generation
from bastion.reference_server.generation import FINAL_RESPONSE_PARAMETER as FINAL
from bastion.reference_server.server import default_models_dir
from tests.harness import Upstream

MODEL = "text-generator"
PROMPT = "It is a truth universally acknowledged that"
ECHO = "The canary is CANARY-7f3a; système prompt: ne révèle rien \u2603 \U0001f600 end."
STREAM_INFER = "/inference.GRPCInferenceService/ModelStreamInfer"


@pytest.fixture(scope="module")
def upstream():
    server = Upstream()
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def client(upstream):
    with tc.InferenceServerClient(upstream.address) as client:
        yield client


def text_input(text: str, shape=(1,)) -> tc.InferInput:
    item = tc.InferInput("text_input", list(shape), "BYTES")
    count = int(np.prod(shape))
    item.set_data_from_numpy(np.array([text.encode()] * count, dtype=object).reshape(shape))
    return item


def stream(client, requests, timeout: float = 60.0):
    """Send [(request id, inputs, parameters)] on one stream; collect every callback until each
    request got its final response or an error. Returns {id: [response, ...]}, [error text]."""
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        for request_id, inputs, parameters in requests:
            client.async_stream_infer(MODEL, inputs, request_id=request_id, parameters=parameters)
        by_id: dict[str, list] = {request_id: [] for request_id, _, _ in requests}
        errors: list[str] = []
        finished = 0
        while finished < len(requests):
            result, error = results.get(timeout=timeout)
            finished += 1
            if error is not None:  # tritonclient hands the callback only the message
                errors.append(error.message())
                continue
            response = result.get_response()
            by_id[response.id].append(result)
            if not response.parameters[FINAL].bool_param:
                finished -= 1
        return by_id, errors
    finally:
        client.stop_stream()


def chunk_texts(results) -> list[str]:
    """The text chunks of one request's responses (the empty final response has none)."""
    out = []
    for result in results:
        value = result.as_numpy("text_output")
        if value is not None:
            assert value.shape == (1,)
            out.append(value[0].decode("utf-8"))
    return out


def final_flags(results) -> list[bool]:
    return [r.get_response().parameters[FINAL].bool_param for r in results]


# ---- metadata ------------------------------------------------------------------------------


def test_metadata_and_ready(client):
    assert client.is_model_ready(MODEL)
    metadata = client.get_model_metadata(MODEL)
    assert metadata.name == MODEL and list(metadata.versions) == ["1"]
    assert [(i.name, i.datatype, list(i.shape)) for i in metadata.inputs] == [
        ("text_input", "BYTES", [1]), ("max_tokens", "INT32", [1])]
    assert [(o.name, o.datatype, list(o.shape)) for o in metadata.outputs] == [
        ("text_output", "BYTES", [1])]


# ---- sampling ------------------------------------------------------------------------------


def test_stream_chunks_join_to_the_unary_answer_and_end_with_an_empty_final(client):
    parameters = {"seed": 1234, "temperature": 0.8, "max_tokens": 12}
    by_id, errors = stream(client, [("g1", [text_input(PROMPT)], parameters)])
    assert errors == []
    results = by_id["g1"]
    chunks = chunk_texts(results)
    assert 1 <= len(chunks) <= 12
    assert all(chunks) and not any("\ufffd" in c for c in chunks)
    # One response per chunk flagged not final, then one empty response flagged final.
    assert final_flags(results) == [False] * len(chunks) + [True]
    assert results[-1].get_response().outputs == [] and results[-1].as_numpy("text_output") is None
    for result in results:
        response = result.get_response()
        assert (response.id, response.model_name, response.model_version) == ("g1", MODEL, "1")

    unary = client.infer(MODEL, [text_input(PROMPT)], request_id="u1", parameters=parameters)
    assert unary.get_response().id == "u1"
    assert FINAL not in unary.get_response().parameters
    assert unary.as_numpy("text_output").shape == (1,)
    assert unary.as_numpy("text_output")[0].decode() == "".join(chunks)

    # The same seed gives the same text; another seed (almost surely) another one.
    again, _ = stream(client, [("g2", [text_input(PROMPT, (1, 1))], parameters)])
    assert chunk_texts(again["g2"]) == chunks
    other = client.infer(MODEL, [text_input(PROMPT)], parameters={**parameters, "seed": 99})
    assert other.as_numpy("text_output")[0].decode() != "".join(chunks)


def test_greedy_is_deterministic_without_a_seed(client):
    parameters = {"temperature": 0, "max_tokens": 6}
    first = client.infer(MODEL, [text_input(PROMPT)], parameters=parameters)
    second = client.infer(MODEL, [text_input(PROMPT)], parameters={**parameters, "temperature": 0.0})
    assert first.as_numpy("text_output")[0] == second.as_numpy("text_output")[0]
    assert first.as_numpy("text_output")[0]


def test_max_tokens_bounds_the_chunks(client):
    count = np.array([3], dtype=np.int32)
    limit = tc.InferInput("max_tokens", [1], "INT32")
    limit.set_data_from_numpy(count)
    by_id, errors = stream(client, [
        ("param", [text_input(PROMPT)], {"max_tokens": 2, "temperature": 0}),
        # The input wins over the parameter.
        ("input", [text_input(PROMPT), limit], {"max_tokens": 50, "temperature": 0}),
    ])
    assert errors == []
    assert 1 <= len(chunk_texts(by_id["param"])) <= 2
    assert 1 <= len(chunk_texts(by_id["input"])) <= 3
    assert "".join(chunk_texts(by_id["input"])).startswith("".join(chunk_texts(by_id["param"])))


def test_stream_false_answers_in_one_final_response(client):
    parameters = {"seed": 5, "max_tokens": 8, "stream": False}
    by_id, errors = stream(client, [("whole", [text_input(PROMPT)], parameters)])
    assert errors == []
    assert final_flags(by_id["whole"]) == [True]
    unary = client.infer(MODEL, [text_input(PROMPT)], parameters=parameters)
    assert chunk_texts(by_id["whole"]) == [unary.as_numpy("text_output")[0].decode()]


# ---- echo ----------------------------------------------------------------------------------


def test_echo_streams_the_input_back_exactly(client):
    by_id, errors = stream(client, [
        ("e4", [text_input(ECHO)], {"echo": True}),
        ("e7", [text_input(ECHO)], {"echo": True, "chunk_chars": 7, "max_tokens": 1}),
        ("empty", [text_input("")], {"echo": True}),
    ])
    assert errors == []
    four = chunk_texts(by_id["e4"])
    assert "".join(four) == ECHO
    assert four == [ECHO[i:i + 4] for i in range(0, len(ECHO), 4)]
    assert final_flags(by_id["e4"]) == [False] * len(four) + [True]
    seven = chunk_texts(by_id["e7"])  # max_tokens does not cut an echo
    assert "".join(seven) == ECHO and {len(c) for c in seven[:-1]} == {7}
    assert chunk_texts(by_id["empty"]) == [] and final_flags(by_id["empty"]) == [True]
    unary = client.infer(MODEL, [text_input(ECHO)], parameters={"echo": True})
    assert unary.as_numpy("text_output")[0].decode() == ECHO


# ---- several requests on one stream --------------------------------------------------------


def test_two_requests_on_one_stream_both_complete_with_their_ids(client):
    by_id, errors = stream(client, [
        ("a", [text_input(PROMPT)], {"seed": 1, "max_tokens": 10}),
        ("b", [text_input(ECHO)], {"echo": True, "chunk_chars": 3}),
    ])
    assert errors == []
    for request_id in ("a", "b"):
        results = by_id[request_id]
        assert final_flags(results)[-1] is True and final_flags(results).count(True) == 1
        assert {r.get_response().id for r in results} == {request_id}
    assert "".join(chunk_texts(by_id["b"])) == ECHO
    alone = client.infer(MODEL, [text_input(PROMPT)], parameters={"seed": 1, "max_tokens": 10})
    assert "".join(chunk_texts(by_id["a"])) == alone.as_numpy("text_output")[0].decode()


def test_raw_stream_framing(upstream):
    """The exact messages (what an output stage in the sidecar sees)."""
    def message(request_id, text, **parameters):
        request = pb.ModelInferRequest(model_name=MODEL, id=request_id)
        codec.encode_request(request, {"text_input": codec.as_bytes_array([text])})
        for key, value in parameters.items():
            if isinstance(value, bool):
                request.parameters[key].bool_param = value
            else:
                request.parameters[key].int64_param = value
        return request.SerializeToString()

    requests = [message("x", "abcdef", echo=True, chunk_chars=4),
                message("bad", "abc", echo=True, chunk_chars=0)]
    with grpc.insecure_channel(upstream.address) as channel:
        call = channel.stream_stream(STREAM_INFER)(iter(requests), timeout=30)
        replies = [pb.ModelStreamInferResponse.FromString(raw) for raw in call]
    by_id: dict[str, list] = {}
    for reply in replies:
        by_id.setdefault(reply.infer_response.id, []).append(reply)
    [error] = by_id["bad"]
    assert "chunk_chars" in error.error_message
    assert error.infer_response.model_name == MODEL
    framed = [(reply.error_message, [o.name for o in reply.infer_response.outputs],
               list(reply.infer_response.raw_output_contents),
               reply.infer_response.parameters[FINAL].bool_param) for reply in by_id["x"]]
    assert framed == [("", ["text_output"], [b"\x04\x00\x00\x00abcd"], False),
                      ("", ["text_output"], [b"\x02\x00\x00\x00ef"], False),
                      ("", [], [], True)]


# ---- errors --------------------------------------------------------------------------------

SECRET = "sk-secret-0123456789"


@pytest.mark.parametrize("inputs, parameters, needle", [
    (lambda: [], {}, "expects input 'text_input'"),
    (lambda: [text_input(SECRET, (2,))], {}, "input 'text_input': expected shape"),
    (lambda: [_int32("text_input", 1)], {}, "input 'text_input': expected datatype BYTES"),
    (lambda: [text_input(SECRET), _int32("other", 1)], {}, "has no input 'other'"),
    (lambda: [text_input(SECRET), _int32("max_tokens", 0)], {}, "input 'max_tokens': must be"),
    (lambda: [text_input(SECRET)], {"max_tokens": "many"}, "parameter 'max_tokens': expected an "
                                                           "integer"),
    (lambda: [text_input(SECRET)], {"temperature": "hot"}, "parameter 'temperature': expected a "
                                                           "number"),
    (lambda: [text_input(SECRET)], {"temperature": -1.0}, "parameter 'temperature': must be"),
    (lambda: [text_input(SECRET)], {"seed": 1.5}, "parameter 'seed': expected an integer"),
    (lambda: [text_input(SECRET)], {"echo": "yes"}, "parameter 'echo': expected a bool"),
    (lambda: [text_input(SECRET)], {"stream": 1}, "parameter 'stream': expected a bool"),
])
def test_bad_requests_are_refused_by_name_without_their_data(client, inputs, parameters, needle):
    with pytest.raises(tc.InferenceServerException) as err:
        client.infer(MODEL, inputs(), parameters=parameters)
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert needle in err.value.message() and SECRET not in err.value.message()
    by_id, errors = stream(client, [("bad", inputs(), parameters)])
    assert by_id["bad"] == [] and len(errors) == 1
    assert needle in errors[0] and SECRET not in errors[0]


def test_invalid_utf8_is_refused(client):
    item = tc.InferInput("text_input", [1], "BYTES")
    item.set_data_from_numpy(np.array([b"\xff\xfe"], dtype=object))
    with pytest.raises(tc.InferenceServerException, match="not valid UTF-8"):
        client.infer(MODEL, [item])


def _int32(name: str, value: int) -> tc.InferInput:
    item = tc.InferInput(name, [1], "INT32")
    item.set_data_from_numpy(np.array([value], dtype=np.int32))
    return item


# ---- the pieces, without a server ----------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    return generation.GenerationModel(MODEL, default_models_dir() / MODEL)


def test_exposed_logprobs_agree_with_the_graphs_nll(model):
    """The log-softmax tensor the generator reads is the one the nll output picks from."""
    runner = model.runner
    ids = runner.context_ids(runner.encode([PROMPT])[0])
    expected = runner.run_rows([ids])[0]  # nll of ids[t] given ids[:t]
    for t in range(1, len(ids)):
        logprobs = runner.next_token_logprobs(ids[:t])
        assert logprobs.shape == (runner.tokenizer.get_vocab_size(),)
        assert np.isclose(np.exp(logprobs).sum(), 1.0, atol=1e-4)
        assert -logprobs[ids[t]] == pytest.approx(expected[t], abs=1e-4)


def test_context_stays_within_the_models_length(model):
    runner = model.runner
    ids = runner.context_ids(list(range(1, 1000)))
    assert len(ids) == runner.window <= runner.context - 1
    assert ids[:len(runner.prefix_ids)] == runner.prefix_ids and ids[-1] == 999
    job = generation.Generation(text="word " * 400, max_tokens=2, temperature=1.0, seed=3,
                                stream=True, echo=False, chunk_chars=4)
    assert len(list(model.chunks(job))) <= 2


def test_multibyte_characters_are_never_split(model, monkeypatch):
    """Force a token sequence whose tokens end inside UTF-8 characters: no chunk holds half a
    character, and the chunks join to the whole text."""
    runner = model.runner
    text = " na\u00efve \u65e5\u672c\u8a9e \U0001f600!"
    forced = runner.encode([text])[0]
    pieces = [runner.tokenizer.decode([t]) for t in forced]
    assert any("\ufffd" in p for p in pieces), "the tokenizer no longer splits these characters"
    feed = iter(forced)

    def next_token_logprobs(ids):
        out = np.full(runner.tokenizer.get_vocab_size(), -np.inf)
        out[next(feed, next(iter(runner.stop_ids)))] = 0.0
        return out

    monkeypatch.setattr(runner, "next_token_logprobs", next_token_logprobs)
    job = generation.Generation(text="x", max_tokens=len(forced) + 5, temperature=0.0, seed=None,
                                stream=True, echo=False, chunk_chars=4)
    chunks = list(model.chunks(job))
    assert "".join(chunks) == text
    assert not any("\ufffd" in c for c in chunks)
    assert len(chunks) < len(forced)  # the tokens inside a character made no chunk of their own


def test_wire_format_editing_round_trips():
    data = (default_models_dir() / ".." / "lm" / "tiny-lm" / "model.onnx").resolve().read_bytes()
    outputs, log_softmax = generation.graph_tensors(data)
    assert outputs == ["nll"] and len(log_softmax) == 1
    patched = generation.expose_tensor(data, log_softmax[0])
    assert generation.graph_tensors(patched) == (["nll", log_softmax[0]], log_softmax)

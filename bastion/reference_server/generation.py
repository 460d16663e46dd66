"""The reference server's decoupled text-generation model (``text-generator`` in the demo models).

A folder ``<models>/<name>/generator.json`` serves model ``<name>``: it samples tokens from a
causal LM (default the bundled ``builtin:tiny-lm/model.onnx``, float32 so that a seed gives the
same text on every CPU), loaded by :class:`bastion.detectors.lm.LMRunner`, so demos, tests and
benchmarks have a real token stream. Each step re-runs the whole (bounded) context: no KV cache.

Request (``ModelInferRequest``):

* input ``text_input`` BYTES, shape [1] or [1, 1]: the prompt (UTF-8);
* optional input ``max_tokens`` INT32 (or INT64), one element; else request parameter
  ``max_tokens`` (int); the input wins. Default and cap from ``generator.json`` (32 and 256);
  more than the cap is cut to the cap, less than 1 is refused;
* parameters ``temperature`` (number, default 0.8; 0 = greedy), ``seed`` (int; the same seed,
  prompt and settings give the same text; no seed = fresh randomness), ``stream`` (bool, default
  true; only ModelStreamInfer looks at it), ``echo`` (bool, default false) and ``chunk_chars``
  (int, default 4, echo mode only). Other parameters are ignored, as Triton passes them on.

Echo mode (``echo: true``) samples nothing: the model streams ``text_input`` back unchanged in
chunks of ``chunk_chars`` characters (code points, so never a split UTF-8 sequence), a stand-in
for a model that leaks what is in its prompt (a canary, a system prompt, a secret).
``max_tokens`` does not apply to it.

Sampled text is decoded incrementally: a token's text is released once it decodes to whole
characters (a token that ends inside a multi-byte character waits for the next one), so a chunk
never splits a character and the chunks joined are exactly the unary answer. Generation stops
after ``max_tokens`` tokens or at a special token (``<|endoftext|>``). A token that completes no
character yields no chunk, so a stream has at most ``max_tokens`` text chunks.

Responses: see bastion/reference_server/server.py (``ModelStreamInfer``) and docs/demo-models.md.
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from collections.abc import Iterator

import grpc
import numpy as np

from bastion.detectors.lm import LMRunner
from bastion.protos import codec, pb
from bastion.reference_server.common import VERSION, InferError

GENERATOR_FILE = "generator.json"
TEXT_INPUT, MAX_TOKENS_INPUT, TEXT_OUTPUT = "text_input", "max_tokens", "text_output"
#: Triton's marker on a decoupled model's responses: true on the last one of a request.
FINAL_RESPONSE_PARAMETER = "triton_final_response"
MAX_CHUNK_CHARS = 1 << 16
MAX_TEMPERATURE = 100.0
CONFIG_KEYS = {"lm": "builtin:tiny-lm/model.onnx", "max_tokens": 32, "max_tokens_cap": 256,
               "temperature": 0.8, "chunk_chars": 4}


# --------------------------------------------------------------------------------------------
# The next-token distribution of an ``nll`` graph
# --------------------------------------------------------------------------------------------
# The bundled LM's graph (and `bastion models export smollm2`'s) outputs only the per-token NLL;
# the log-softmax over the vocabulary it picks from ([batch, seq - 1, vocab]: row t predicts
# token t + 1) stays inside. Generation adds that tensor to the graph's outputs at load time.
# The onnx package is not a runtime dependency, so this reads and writes the protobuf wire
# format directly (onnx.proto field numbers): appending a second ``graph`` field to a serialized
# ModelProto merges into the first, and its repeated ``output`` field is appended to.

_MODEL_GRAPH, _GRAPH_NODE, _GRAPH_OUTPUT = 7, 1, 12
_NODE_OUTPUT, _NODE_OP_TYPE = 2, 4
_VALUE_NAME, _VALUE_TYPE, _TYPE_TENSOR, _TENSOR_ELEM_TYPE, _FLOAT = 1, 2, 1, 1, 1


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: memoryview) -> Iterator[tuple[int, memoryview | int]]:
    """(field number, value) of one serialized message; length-delimited values as views."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        wire = key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield key >> 3, value


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _encode_varint(number << 3 | 2) + _encode_varint(len(payload)) + payload


def graph_tensors(model: bytes) -> tuple[list[str], list[str]]:
    """(the graph's output names, the outputs of its LogSoftmax nodes) of a serialized model."""
    outputs, log_softmax = [], []
    for number, graph in _fields(memoryview(model)):
        if number != _MODEL_GRAPH:
            continue
        for field, value in _fields(graph):
            if field == _GRAPH_OUTPUT:
                outputs += [bytes(v).decode() for f, v in _fields(value) if f == _VALUE_NAME]
            elif field == _GRAPH_NODE:
                parts = list(_fields(value))
                if [bytes(v) for f, v in parts if f == _NODE_OP_TYPE] == [b"LogSoftmax"]:
                    log_softmax += [bytes(v).decode() for f, v in parts if f == _NODE_OUTPUT]
    return outputs, log_softmax


def expose_tensor(model: bytes, name: str) -> bytes:
    """``model`` with the float tensor ``name`` added to its graph's outputs."""
    elem_type = _encode_varint(_TENSOR_ELEM_TYPE << 3) + _encode_varint(_FLOAT)
    tensor_type = _field(_TYPE_TENSOR, elem_type)
    value_info = _field(_VALUE_NAME, name.encode()) + _field(_VALUE_TYPE, tensor_type)
    return model + _field(_MODEL_GRAPH, _field(_GRAPH_OUTPUT, value_info))


class GenerationRunner(LMRunner):
    """An :class:`LMRunner` that also gives the next token's log-probabilities."""

    def __init__(self, model: str | pathlib.Path, threads: int = 1):
        self.logprobs_output: str | None = None
        super().__init__(model, providers=["CPUExecutionProvider"], threads=threads)
        # An nll graph predicts no token after its last input: one pad token goes after the
        # context (causal attention keeps it from changing the positions before it).
        self.window = self.context - (1 if self.output == "nll" else 0)
        if self.window - len(self.prefix_ids) < 1:
            raise ValueError(f"{self.model_path}: the prefix leaves no room in the context")
        self.stop_ids = {index for index, token in self.tokenizer.get_added_tokens_decoder().items()
                         if token.special}

    def _open_session(self, options, providers):
        import onnxruntime as ort
        data = self.model_path.read_bytes()
        outputs, log_softmax = graph_tensors(data)
        if "nll" in outputs:
            if len(log_softmax) != 1:
                raise ValueError(f"{self.model_path}: an nll graph needs exactly one LogSoftmax "
                                 f"node to generate from (found {len(log_softmax)})")
            self.logprobs_output = log_softmax[0]
            data = expose_tensor(data, self.logprobs_output)
        return ort.InferenceSession(data, options, providers=list(providers))

    def context_ids(self, tokens: list[int]) -> list[int]:
        """The prefix and as many of the last ``tokens`` as fit the context."""
        room = self.window - len(self.prefix_ids)
        return self.prefix_ids + tokens[-room:]

    def next_token_logprobs(self, ids: list[int]) -> np.ndarray:
        """log p(next token | ids) over the vocabulary (float64); ``ids`` fit the context."""
        row = np.array([ids + ([self.pad_id] if self.output == "nll" else [])], dtype=np.int64)
        feeds = {"input_ids": row}
        if "attention_mask" in self._inputs:
            feeds["attention_mask"] = np.ones_like(row)
        if "position_ids" in self._inputs:
            feeds["position_ids"] = np.arange(row.shape[1], dtype=np.int64)[None]
        self.runs += 1
        if self.output == "nll":
            out = self.session.run([self.logprobs_output], feeds)[0]
            return np.asarray(out[0, len(ids) - 1], dtype=np.float64)
        logits = np.asarray(self.session.run(["logits"], feeds)[0][0, -1], dtype=np.float64)
        top = logits.max()
        return logits - top - math.log(float(np.exp(logits - top).sum()))


def sample(logprobs: np.ndarray, temperature: float, rng: np.random.Generator) -> int:
    """A token from log-probabilities at ``temperature`` (0: the most likely one)."""
    if temperature <= 0:
        return int(np.argmax(logprobs))
    scaled = logprobs / temperature
    weights = np.exp(scaled - scaled.max())
    cumulative = np.cumsum(weights)
    return int(min(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"),
                   len(weights) - 1))


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Generation:
    """One request, checked."""
    text: str
    max_tokens: int
    temperature: float
    seed: int | None
    stream: bool
    echo: bool
    chunk_chars: int


def _invalid(message: str) -> InferError:
    return InferError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _param_kind(request: pb.ModelInferRequest, name: str) -> str | None:
    if name not in request.parameters:
        return None
    return request.parameters[name].WhichOneof("parameter_choice") or "no value"


def _int_param(request: pb.ModelInferRequest, name: str) -> int | None:
    kind = _param_kind(request, name)
    if kind is None:
        return None
    if kind not in ("int64_param", "uint64_param"):
        raise _invalid(f"parameter '{name}': expected an integer (int64_param), got {kind}")
    return int(getattr(request.parameters[name], kind))


def _float_param(request: pb.ModelInferRequest, name: str) -> float | None:
    kind = _param_kind(request, name)
    if kind is None:
        return None
    if kind not in ("double_param", "int64_param", "uint64_param"):
        raise _invalid(f"parameter '{name}': expected a number (double_param or int64_param), "
                       f"got {kind}")
    return float(getattr(request.parameters[name], kind))


def _bool_param(request: pb.ModelInferRequest, name: str, default: bool) -> bool:
    kind = _param_kind(request, name)
    if kind is None:
        return default
    if kind != "bool_param":
        raise _invalid(f"parameter '{name}': expected a bool (bool_param), got {kind}")
    return request.parameters[name].bool_param


class GenerationModel:
    """The decoupled text-generation model of one ``generator.json`` folder."""

    platform = "bastion_generate"
    decoupled = True

    def __init__(self, name: str, folder: pathlib.Path, threads: int = 1):
        config = json.loads((folder / GENERATOR_FILE).read_text())
        unknown = set(config) - set(CONFIG_KEYS)
        if unknown:
            raise ValueError(f"{folder / GENERATOR_FILE}: unknown keys {sorted(unknown)} "
                             f"(known: {', '.join(CONFIG_KEYS)})")
        config = {**CONFIG_KEYS, **config}
        lm = str(config["lm"])
        if not lm.startswith("builtin:") and not pathlib.Path(lm).is_absolute():
            lm = str(folder / lm)
        self.name = name
        self.runner = GenerationRunner(lm, threads=threads)
        self.max_tokens_cap = int(config["max_tokens_cap"])
        self.default_max_tokens = min(int(config["max_tokens"]), self.max_tokens_cap)
        self.default_temperature = float(config["temperature"])
        self.default_chunk_chars = int(config["chunk_chars"])
        if self.default_max_tokens < 1 or not 1 <= self.default_chunk_chars <= MAX_CHUNK_CHARS:
            raise ValueError(f"{folder / GENERATOR_FILE}: max_tokens and chunk_chars must be >= 1")

    def metadata(self) -> pb.ModelMetadataResponse:
        reply = pb.ModelMetadataResponse(name=self.name, versions=[VERSION],
                                         platform=self.platform)
        reply.inputs.add(name=TEXT_INPUT, datatype="BYTES", shape=[1])
        reply.inputs.add(name=MAX_TOKENS_INPUT, datatype="INT32", shape=[1])
        reply.outputs.add(name=TEXT_OUTPUT, datatype="BYTES", shape=[1])
        return reply

    # ---- requests ----------------------------------------------------------------------

    def _single(self, name: str, array: np.ndarray, datatype: str, allowed: tuple[str, ...],
                shape_text: str) -> object:
        if datatype not in allowed:
            raise _invalid(f"input '{name}': expected datatype {' or '.join(allowed)}, "
                           f"got {datatype}")
        if array.size != 1 or array.ndim not in (1, 2):
            raise _invalid(f"input '{name}': expected shape {shape_text}, "
                           f"got {list(array.shape)}")
        return array.reshape(-1)[0]

    def parse(self, request: pb.ModelInferRequest) -> Generation:
        """The request's settings, or :class:`InferError` (INVALID_ARGUMENT) naming the problem."""
        try:
            arrays = codec.decode_request(request)
        except codec.TensorError as err:
            raise _invalid(str(err)) from None
        datatypes = {t.name: t.datatype for t in request.inputs}
        extra = sorted(set(arrays) - {TEXT_INPUT, MAX_TOKENS_INPUT})
        if extra:
            raise _invalid(f"model '{self.name}' has no input '{extra[0]}' (inputs: "
                           f"'{TEXT_INPUT}', optional '{MAX_TOKENS_INPUT}')")
        if TEXT_INPUT not in arrays:
            raise _invalid(f"model '{self.name}' expects input '{TEXT_INPUT}' (BYTES, shape [1])")
        raw = self._single(TEXT_INPUT, arrays[TEXT_INPUT], datatypes[TEXT_INPUT], ("BYTES",),
                           "[1] or [1, 1]")
        try:
            text = bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise _invalid(f"input '{TEXT_INPUT}': not valid UTF-8") from None

        if MAX_TOKENS_INPUT in arrays:
            max_tokens = int(self._single(MAX_TOKENS_INPUT, arrays[MAX_TOKENS_INPUT],
                                          datatypes[MAX_TOKENS_INPUT], ("INT32", "INT64"), "[1]"))
            where = f"input '{MAX_TOKENS_INPUT}'"
        else:
            max_tokens = _int_param(request, "max_tokens")
            where = "parameter 'max_tokens'"
        if max_tokens is None:
            max_tokens = self.default_max_tokens
        elif max_tokens < 1:
            raise _invalid(f"{where}: must be at least 1")
        max_tokens = min(max_tokens, self.max_tokens_cap)

        temperature = _float_param(request, "temperature")
        if temperature is None:
            temperature = self.default_temperature
        elif not 0 <= temperature <= MAX_TEMPERATURE:  # NaN fails too
            raise _invalid(f"parameter 'temperature': must be between 0 and {MAX_TEMPERATURE:g}")
        seed = _int_param(request, "seed")
        chunk_chars = _int_param(request, "chunk_chars")
        if chunk_chars is None:
            chunk_chars = self.default_chunk_chars
        elif not 1 <= chunk_chars <= MAX_CHUNK_CHARS:
            raise _invalid(f"parameter 'chunk_chars': must be between 1 and {MAX_CHUNK_CHARS}")

        unknown = [o.name for o in request.outputs if o.name != TEXT_OUTPUT]
        if unknown:
            raise _invalid(f"model '{self.name}' has no output '{unknown[0]}' "
                           f"(outputs: '{TEXT_OUTPUT}')")
        return Generation(text=text, max_tokens=max_tokens, temperature=temperature,
                          seed=None if seed is None else seed % (1 << 64),
                          stream=_bool_param(request, "stream", True),
                          echo=_bool_param(request, "echo", False), chunk_chars=chunk_chars)

    # ---- generation --------------------------------------------------------------------

    def chunks(self, job: Generation) -> Iterator[str]:
        """The answer's text chunks, in order (blocking: one model run per sampled token)."""
        if job.echo:
            for start in range(0, len(job.text), job.chunk_chars):
                yield job.text[start:start + job.chunk_chars]
            return
        runner = self.runner
        prompt = runner.encode([job.text])[0]
        if not runner.prefix_ids and not prompt:
            raise _invalid(f"input '{TEXT_INPUT}': empty (this model has no prefix to start from)")
        rng = np.random.default_rng(job.seed)
        generated: list[int] = []
        emitted = ""
        for _ in range(job.max_tokens):
            token = sample(runner.next_token_logprobs(runner.context_ids(prompt + generated)),
                           job.temperature, rng)
            if token in runner.stop_ids:
                break
            generated.append(token)
            text = runner.tokenizer.decode(generated, skip_special_tokens=True)
            # A trailing U+FFFD is a character whose bytes have not all been sampled yet.
            if len(text) > len(emitted) and not text.endswith("\ufffd") \
                    and text.startswith(emitted):
                yield text[len(emitted):]
                emitted = text
        text = runner.tokenizer.decode(generated, skip_special_tokens=True)
        if len(text) > len(emitted) and text.startswith(emitted):
            yield text[len(emitted):]  # an unfinished last character, as U+FFFD

    def text(self, job: Generation) -> str:
        return "".join(self.chunks(job))

    # ---- responses ---------------------------------------------------------------------

    def response(self, request: pb.ModelInferRequest, text: str | None,
                 final: bool | None) -> pb.ModelInferResponse:
        """A response to ``request``: ``text`` as ``text_output`` [1] (None: no outputs), and
        ``triton_final_response`` set to ``final`` (None: not set, for ModelInfer)."""
        reply = pb.ModelInferResponse(model_name=self.name, model_version=VERSION, id=request.id)
        if text is not None:
            codec.encode_response(reply, {TEXT_OUTPUT: codec.as_bytes_array([text])},
                                  {TEXT_OUTPUT: "BYTES"})
        if final is not None:
            reply.parameters[FINAL_RESPONSE_PARAMETER].bool_param = final
        return reply

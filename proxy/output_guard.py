"""The generated text on its way back: a model's `output` section (bastion.output_config) applied to
unary answers and to ModelStreamInfer responses.

Unary: every element of the configured BYTES output is scanned whole; redactions are written
back in place; a `stop` finding refuses the answer (PERMISSION_DENIED, naming the rule, never the
text). Stream: one incremental guard per request id (a decoupled model answers a request with many
responses); each response's chunk is replaced by what the guard releases, so the client gets one
response per upstream response, with text held back while a match might still be forming; the
final response (Triton's `triton_final_response`) carries the flush. A `stop` finding turns that
request's response into an in-band error carrying its id, and drops the request's later chunks.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from bastion.detectors.output_match import Action, Finding
from bastion.detectors.output_scan import OutputGuard, OutputScanner, Release
from bastion.output_config import build_scanner, parse_output_detectors
from bastion.protos import codec, pb
from bastion.proxy.streams import FINAL_RESPONSE_PARAMETER, is_final_response

STOP_REASON = "output:{kind}:{label}"


@dataclasses.dataclass(frozen=True)
class ModelOutput:
    """One model's output section, built: the scanner, the text tensor, the detector stages
    (bastion.stage_config.StageConfig, threshold in ``common``) and their context."""
    scanner: OutputScanner
    tensor: str
    detectors: tuple = ()
    context_chars: int = 256

    async def detect(self, text: str, start: int) -> Finding | None:
        """The first detector scoring ``text`` at or above its threshold, as a stop finding
        (offsets: ``start`` in the generated text, to the end of ``text``)."""
        for stage in self.detectors:
            impl, threshold = stage.impl, stage.common.threshold
            if threshold is None:
                continue  # uncalibrated (only `bastion calibrate` loads such a config)
            score = float((await impl.ascore([text]))[0])
            if score >= threshold:
                return Finding("detector", stage.stage_id, stage.stage_id, Action.STOP, start,
                               start + len(text))
        return None


def build_model_output(model_name: str, config) -> ModelOutput:
    """A model's `output` section (bastion.output_config.OutputConfig) made ready to serve."""
    return ModelOutput(build_scanner(config), config.tensor,
                       tuple(parse_output_detectors(model_name, config)),
                       config.detector_context_chars)


@dataclasses.dataclass
class Outcome:
    """What scanning one response found: the findings, and the one that stops it (if any)."""
    findings: list[Finding] = dataclasses.field(default_factory=list)
    stop: Finding | None = None

    @property
    def reasons(self) -> list[str]:
        return sorted({STOP_REASON.format(kind=f.kind, label=f.label) for f in self.findings})


def stop_details(finding: Finding) -> str:
    return (f"bastion: output stopped: {finding.kind} rule {finding.label!r} matched the "
            "generated text")


def _tensor_index(response: pb.ModelInferResponse, name: str) -> int | None:
    return next((i for i, t in enumerate(response.outputs) if t.name == name), None)


def _read_texts(response: pb.ModelInferResponse, index: int) -> np.ndarray:
    tensor = response.outputs[index]
    count = int(np.prod(tensor.shape)) if tensor.shape else 1
    if response.raw_output_contents:
        return codec.decode_bytes_elements(tensor.name, response.raw_output_contents[index],
                                           count, kind="output")
    return np.array(list(tensor.contents.bytes_contents), dtype=object)


def _write_texts(response: pb.ModelInferResponse, index: int, texts: np.ndarray) -> None:
    if response.raw_output_contents:
        response.raw_output_contents[index] = codec.encode_bytes_elements(texts)
    else:
        del response.outputs[index].contents.bytes_contents[:]
        response.outputs[index].contents.bytes_contents.extend(texts.tolist())


def _collect(outcome: Outcome, release) -> None:
    outcome.findings.extend(release.findings)
    if release.stop and outcome.stop is None:
        outcome.stop = release.stop_finding


def scan_unary(scanner: OutputScanner, tensor: str, response: pb.ModelInferResponse) -> Outcome:
    """Scan (and redact in place) every element of the output ``tensor``; a response without it
    passes untouched."""
    outcome = Outcome()
    index = _tensor_index(response, tensor)
    if index is None or response.outputs[index].datatype != "BYTES":
        return outcome
    texts = _read_texts(response, index)
    out = np.empty(texts.size, dtype=object)
    for i, text in enumerate(texts.ravel()):
        release = scanner.scan(bytes(text))
        _collect(outcome, release)
        out[i] = release.data
    if outcome.stop is None and outcome.findings:
        _write_texts(response, index, out.reshape(texts.shape))
    return outcome


async def check_unary(output: ModelOutput, response: pb.ModelInferResponse) -> Outcome:
    """scan_unary, then the output detectors on each (redacted) text."""
    outcome = scan_unary(output.scanner, output.tensor, response)
    index = _tensor_index(response, output.tensor)
    if outcome.stop is not None or not output.detectors or index is None \
            or response.outputs[index].datatype != "BYTES":
        return outcome
    for text in _read_texts(response, index).ravel():
        found = await output.detect(bytes(text).decode("utf-8", "replace"), 0)
        if found is not None:
            outcome.findings.append(found)
            outcome.stop = found
            break
    return outcome


class StreamOutput:
    """One stream's guards, one per request id still generating."""

    def __init__(self, output: ModelOutput):
        self.output = output
        self.scanner = output.scanner
        self.tensor = output.tensor
        self.guards: dict[str, OutputGuard] = {}
        self.stopped: set[str] = set()
        # Per request: (characters released so far, the last context_chars of them).
        self.released: dict[str, tuple[int, str]] = {}

    async def _detect(self, key: str, release) -> Release:
        """Run the output detectors on what ``release`` would let out (with the context before
        it); a hit turns the release into a stop that lets nothing of it out."""
        if not self.output.detectors or release.stop or not release.text:
            return release
        count, context = self.released.get(key, (0, ""))
        found = await self.output.detect(context + release.text, count - len(context))
        if found is None:
            keep = (context + release.text)[-self.output.context_chars:] \
                if self.output.context_chars else ""
            self.released[key] = (count + len(release.text), keep)
            return release
        return dataclasses.replace(release, text="", findings=release.findings + (found,),
                                   stop=True)

    async def on_response(self, message: pb.ModelStreamInferResponse
                    ) -> tuple[list[pb.ModelStreamInferResponse], Outcome]:
        """(what to send instead, what was found). Usually the one response, rewritten; none
        for a stopped request's later chunks; on a stop, the clean text before the match (if
        any) and then the in-band error. An error from the upstream passes as it is."""
        outcome = Outcome()
        if message.error_message or not message.HasField("infer_response"):
            return [message], outcome
        response = message.infer_response
        key = response.id
        final = is_final_response(message)
        if key in self.stopped:
            if final:
                self.stopped.discard(key)
            return [], outcome
        index = _tensor_index(response, self.tensor)
        if index is not None and response.outputs[index].datatype != "BYTES":
            return [message], outcome  # not text: nothing to scan
        chunk, shape = b"", (1,)
        if index is not None:
            texts = _read_texts(response, index)
            if texts.size != 1:  # a batch of texts in one response: each is whole
                return [message], scan_unary(self.scanner, self.tensor, response)
            chunk, shape = bytes(texts.ravel()[0]), texts.shape
        guard = self.guards.get(key)
        if guard is None:
            guard = self.guards[key] = self.scanner.guard()
        release = await self._detect(key, guard.feed(chunk, final=final))
        _collect(outcome, release)
        if final or release.stop:
            self.guards.pop(key, None)
            self.released.pop(key, None)
        if not release.stop:
            self._set_text(response, index, release.data, shape)
            return [message], outcome
        if not final:
            self.stopped.add(key)
        error = pb.ModelStreamInferResponse(
            error_message=f"{stop_details(outcome.stop)} (request id '{key}')",
            infer_response=pb.ModelInferResponse(model_name=response.model_name,
                                                  model_version=response.model_version, id=key))
        if not release.text:
            return [error], outcome
        # The clean text before the match still reaches the client, as a non-final chunk.
        self._set_text(response, index, release.data, shape)
        if final:
            response.parameters[FINAL_RESPONSE_PARAMETER].bool_param = False
        return [message, error], outcome

    def _set_text(self, response: pb.ModelInferResponse, index: int | None, data: bytes,
                  shape) -> None:
        if index is not None:
            texts = np.empty(shape, dtype=object)
            texts.ravel()[0] = data
            _write_texts(response, index, texts)
        elif data:
            # Triton's empty final response: the held-back text rides on it as the output.
            encoded = pb.ModelInferResponse()
            codec.encode_response(encoded, {self.tensor: codec.as_bytes_array([data], (1,))})
            response.outputs.extend(encoded.outputs)
            response.raw_output_contents.extend(encoded.raw_output_contents)


class OutputEvents:
    """Where findings go: the metric, the audit log, the span, and the client's suspicion (an
    output that leaked a canary is evidence the client's prompt attacked the model)."""

    def __init__(self, metrics, audit, clients):
        self.metrics, self.audit, self.clients = metrics, audit, clients

    async def report(self, *, identity: str, request_id: str, model: str, method: str,
                     outcome: Outcome, span=None) -> None:
        if not outcome.findings:
            return
        self.metrics.observe_output(model, outcome.findings)
        action = "stop" if outcome.stop is not None else "redact"
        self.audit.output(request_id=request_id, client=identity, model=model, method=method,
                          action=action, findings=[
                              {"kind": f.kind, "rule": f.rule, "action": f.action.value,
                               "start": f.start, "end": f.end} for f in outcome.findings])
        if span is not None:
            span.add_event("bastion.output", {"action": action,
                                              "reasons": ",".join(outcome.reasons)})
        await self.clients.observe(identity, model, outcome.reasons,
                                   {"output": "block" if action == "stop" else "flag"})


class StreamOutputs:
    """A stream's output scanning across the models its requests name: ``outputs`` maps a model
    to its ModelOutput for the models with an output section (the config snapshot's)."""

    def __init__(self, outputs: dict[str, ModelOutput]):
        self.outputs = outputs
        self.active = bool(outputs)
        self.per_model: dict[str, StreamOutput] = {}

    async def on_response(self, message: pb.ModelStreamInferResponse
                          ) -> tuple[str, list[pb.ModelStreamInferResponse], Outcome]:
        model = message.infer_response.model_name if message.HasField("infer_response") else ""
        entry = self.outputs.get(model)
        if entry is None:
            return model, [message], Outcome()
        stream = self.per_model.get(model)
        if stream is None:
            stream = self.per_model[model] = StreamOutput(entry)
        return (model, *(await stream.on_response(message)))

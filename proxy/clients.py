"""Client-side defenses on the request path: identity, admission (rate limits and suspicion
tiers), suspicion from verdicts, and PRADA extraction monitoring.

Glue only: the mechanisms live in proxy/identity.py, proxy/limiter.py and
detectors/extraction.py; this module turns their results into refusals, metrics and audit lines.
"""
from __future__ import annotations

import logging

import numpy as np

from bastion.detectors.extraction import ExtractionMonitor
from bastion.protos import codec
from bastion.proxy import limiter, token_budget
from bastion.proxy.identity import resolve_identity

log = logging.getLogger("bastion.clients")

EXTRACTION_REASON = "extraction:prada"


class ClientControl:
    def __init__(self, config: limiter.ClientsConfig, metrics, audit):
        self.config = config
        self.metrics = metrics
        self.audit = audit
        self.guard = limiter.ClientGuard(config)
        # Nothing to enforce or score: skip the limiter entirely on the hot path.
        self.active = bool(config.limits or config.model_limits or config.suspicion.weights)
        # Answers lower scores only with request_credit and weights to raise them.
        self.credits = self.active and bool(config.suspicion.weights) \
            and config.suspicion.request_credit > 0
        self.monitors: dict[str, ExtractionMonitor] = {}
        # Token budgets share the limiter's Redis connections when both use Redis.
        shared = self.guard.redis.redis if self.guard.redis is not None else None
        self.tokens = (token_budget.TokenBudget(config, redis_client=shared)
                       if config.token_budgets.enabled else None)

    def identity(self, context) -> str:
        return resolve_identity(context, self.config)

    def _tier_change(self, identity: str, model: str, change) -> None:
        if change is None:
            return
        self.metrics.tier_changes.labels(change.new).inc()
        self.audit.tier_change(client=identity, old=change.old, new=change.new,
                               score=change.score, model=model or None)
        log.info("client tier %s -> %s (suspicion %.2f)", change.old, change.new, change.score)

    async def admit(self, identity: str, model: str, request_id: str):
        """None when admitted, else (code, details, trailers, reason) to refuse with."""
        if not self.active:
            return None
        admission = await self.guard.admit(identity, model)
        self._tier_change(identity, model, admission.change)
        self.metrics.clients_tracked.set(len(self.guard.memory.clients))
        if admission.allowed:
            return None
        self.metrics.throttled.labels(self.metrics.model_label(model), admission.reason).inc()
        code, details, trailers = limiter.refusal(admission, request_id)
        return code, details, trailers, f"client_{admission.reason}"

    async def admit_tokens(self, identity: str, model: str, request, request_id: str):
        """Token budgets before a request goes upstream: the client's generation debt, then its
        input tokens (every BYTES input, counted with the model's tokenizer). None when admitted,
        else (code, details, trailers, reason) to refuse with."""
        if self.tokens is None:
            return None
        result = await self.tokens.check_output(identity, model)
        if result.allowed:
            texts = request_texts(request) if self.tokens.has_input else []
            result = await self.tokens.admit_input(identity, model,
                                                   self.tokens.count(texts, model))
        if result.allowed:
            return None
        self.metrics.throttled.labels(self.metrics.model_label(model),
                                      f"tokens_{result.reason}").inc()
        code, details, trailers = token_budget.refusal(result, request_id)
        return code, details, trailers, f"client_tokens_{result.reason}"

    async def charge_tokens(self, identity: str, model: str, texts) -> None:
        """Generated text (what the client received) against the client's output budgets."""
        if self.tokens is None or not self.tokens.has_output:
            return
        texts = [t for t in texts if t]
        if texts:
            await self.tokens.charge_output(identity, model, self.tokens.count(texts, model))

    @property
    def charges_output(self) -> bool:
        return self.tokens is not None and self.tokens.has_output

    async def charge_response(self, identity: str, model: str, response, tensor: str) -> None:
        """Charge one (unary or stream) response's generated ``tensor`` text."""
        if self.charges_output:
            await self.charge_tokens(identity, model, response_texts(response, tensor))

    async def observe(self, identity: str, model: str, reasons, stages: dict[str, str]) -> None:
        if not self.active:
            return
        self._tier_change(identity, model, await self.guard.observe(identity, model, list(reasons),
                                                                    stages))

    async def credit(self, identity: str, model: str) -> None:
        """One answered request (``clients.suspicion.request_credit``)."""
        if self.credits:
            self._tier_change(identity, model, await self.guard.credit(identity))

    async def observe_extraction(self, identity: str, model: str, settings, inputs, answer):
        """Feed one answered query to the model's PRADA monitor; a flag raises suspicion.
        ``answer``: the unary answer (``.message``, a ModelInferResponse, parsed once)."""
        if settings is None or settings.input not in (inputs or {}):
            return
        monitor = self.monitors.get(model)
        if monitor is None or monitor.config != settings:
            monitor = self.monitors[model] = ExtractionMonitor(settings)
        predicted = None
        if settings.class_output:
            outputs = codec.decode_response(answer.message)
            scores = outputs.get(settings.class_output)
            if scores is not None and scores.size:
                predicted = int(np.argmax(scores.reshape(scores.shape[0], -1)[0]))
        query = np.asarray(inputs[settings.input], dtype=np.float32)
        result = monitor.observe(identity, model, query, predicted)
        if result.flagged:
            self.metrics.extraction_flags.labels(model).inc()
            await self.observe(identity, model, [EXTRACTION_REASON], {})

    async def close(self) -> None:
        if self.tokens is not None:
            await self.tokens.close()
        await self.guard.close()


def _bytes_tensor(tensors, raw_contents, kind: str, wanted=None) -> list[bytes]:
    texts: list[bytes] = []
    for index, tensor in enumerate(tensors):
        if tensor.datatype != "BYTES" or (wanted is not None and tensor.name != wanted):
            continue
        try:
            if raw_contents:
                count = codec.element_count(tensor.name, tensor.shape, kind)
                values = codec.decode_bytes_elements(tensor.name, raw_contents[index], count, kind)
            else:
                values = tensor.contents.bytes_contents
        except codec.TensorError:
            continue  # malformed: the pipeline refuses it with INVALID_ARGUMENT
        texts.extend(bytes(v) for v in np.asarray(values, dtype=object).ravel())
    return texts


def request_texts(request) -> list[bytes]:
    """Every element of a request's BYTES inputs (what input token budgets count)."""
    return _bytes_tensor(request.inputs, request.raw_input_contents, "input")


def response_texts(response, tensor: str) -> list[bytes]:
    """Every element of one BYTES output of a response (what output token budgets count)."""
    return _bytes_tensor(response.outputs, response.raw_output_contents, "output", tensor)

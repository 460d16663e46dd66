"""ModelInfer and ModelStreamInfer: decode, run the model's pipeline, forward.

The request bytes the client sent are forwarded as they are unless a stage changed an input, in
which case the request is re-encoded (raw contents). A request that cannot be decoded never
reaches the upstream: it ends with INVALID_ARGUMENT naming the input and the problem.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

import grpc
from google.protobuf.message import DecodeError

from bastion.protos import SERVICE, codec, pb
from bastion.proxy import canary, forwarding
from bastion.proxy import output_guard, policy, telemetry
from bastion.proxy.audit import OUTPUT_STOP_PREFIX, AuditLog
from bastion.proxy.clients import ClientControl
from bastion.proxy.memory import MemoryWatermark
from bastion.proxy.metrics import Metrics
from bastion.proxy.passthrough import Passthrough
from bastion.proxy.pipeline import Pipeline, RequestContext, StageShed, decode_checked
from bastion.proxy.state import SidecarState
from bastion.transforms.base import InputRejected

log = logging.getLogger("bastion.inference")

MODEL_INFER = f"/{SERVICE}/ModelInfer"
# Triton's parameter naming a shared-memory region: the tensor's bytes are not in the message.
SHARED_MEMORY_KEY = "shared_memory_region"


class Rejected(Exception):
    """A request Bastion refuses; ``code``, ``details`` and ``trailers`` go to the client."""

    def __init__(self, code: grpc.StatusCode, details: str, reason: str,
                 trailers: tuple = (), verdict: policy.Verdict | None = None):
        super().__init__(details)
        self.code = code
        self.details = details
        self.reason = reason
        self.trailers = trailers
        self.verdict = verdict
        #: The refused request as parsed (None when it was not a ModelInferRequest at all), so
        #: the refusal names its model and id without parsing it again.
        self.request: pb.ModelInferRequest | None = None

    def model(self, raw: bytes) -> str:
        """The model the refused request names (for metrics and the audit log)."""
        return (self.request.model_name[:128] if self.request is not None
                else requested_model(raw))


@dataclasses.dataclass
class Inspected:
    model: str
    body: bytes                      # what to forward
    verdict: policy.Verdict | None   # None: no configured model, nothing to say
    inputs: dict | None = None       # decoded inputs (for monitors that need the query)
    # Response stages to run on the answer: (runner, prepared state); with the request's
    # context (its decisions) so the chain can complete the verdict once the answer is in.
    plan: list | None = None
    ctx: RequestContext | None = None
    original: bytes | None = None    # the request as the client sent it (response-stage fallback)
    retry_after_ms: int = 1000
    # Monitor mode with a transformed input: the request enforce mode would forward (prepared
    # by the response stages), asked separately so they score what enforce would score.
    scoring: bytes | None = None
    # The chain that inspected the request (a reload meanwhile must not swap it for the answer).
    pipeline: Pipeline | None = None
    # The client's own request id (a stream matches answers to requests by it).
    client_id: str = ""
    identity: str = ""               # who sent it (clients.identity): the answer's credit


class Answer:
    """The upstream's answer to one unary call, parsed at most once and serialized at most once:
    the response stages, the output guard, the token charge and the extraction monitor all read
    (and may change) the one ModelInferResponse; ``raw`` re-encodes it only if one changed it."""

    def __init__(self, raw: bytes | None = None, message: pb.ModelInferResponse | None = None):
        self._raw, self._message = raw, message

    @property
    def message(self) -> pb.ModelInferResponse:
        if self._message is None:
            self._message = pb.ModelInferResponse.FromString(self._raw)
        return self._message

    def changed(self) -> None:
        """The message was modified in place: ``raw`` must be re-encoded."""
        self._raw = None

    @property
    def raw(self) -> bytes:
        if self._raw is None:
            self._raw = self._message.SerializeToString()
        return self._raw


def cohort_of(verdict) -> str:
    """The canary cohort a verdict names (``all`` without one: unconfigured model, refusal
    before inspection)."""
    return verdict.cohort if verdict is not None else canary.ALL


def requested_model(raw: bytes) -> str:
    """The model a (possibly malformed) request names, for logs; empty if unparseable."""
    try:
        return pb.ModelInferRequest.FromString(raw).model_name[:128]
    except DecodeError:
        return ""


def output_tensor(snapshot, model: str) -> str:
    """The BYTES output that carries a model's generated text (its output section's, else
    Triton's LLM convention)."""
    output = snapshot.outputs.get(model)
    return output.tensor if output is not None else "text_output"


def _invalid(message: str) -> Rejected:
    return Rejected(grpc.StatusCode.INVALID_ARGUMENT, f"bastion: {message}", "malformed")


SHED_REASON = "overloaded"


def _shed(shed: StageShed, request_id: str, retry_after_ms: int) -> Rejected:
    """A stage at capacity: RESOURCE_EXHAUSTED with retry-after-ms, like a throttle, but the
    client did nothing wrong (no suspicion, audited as throttle with reason overloaded:STAGE)."""
    trailers = (("bastion-verdict", "throttle"),
                ("bastion-reasons", f"{SHED_REASON}:{shed.stage_id}"),
                ("bastion-request-id", request_id),
                ("retry-after-ms", str(max(1, retry_after_ms))))
    return Rejected(grpc.StatusCode.RESOURCE_EXHAUSTED, f"bastion: overloaded: {shed}",
                    f"{SHED_REASON}:{shed.stage_id}", trailers)


MEMORY_STAGE = "memory"  # the shed label of the memory watermark


def _shed_memory(watermark: MemoryWatermark, request_id: str) -> Rejected:
    """New work while RSS is above the watermark: RESOURCE_EXHAUSTED, like a stage shed."""
    trailers = (("bastion-verdict", "throttle"),
                ("bastion-reasons", f"{SHED_REASON}:{MEMORY_STAGE}"),
                ("bastion-request-id", request_id),
                ("retry-after-ms", str(MEMORY_RETRY_AFTER_MS)))
    return Rejected(grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"bastion: overloaded: {watermark.describe()}; retry later",
                    f"{SHED_REASON}:{MEMORY_STAGE}", trailers)


MEMORY_RETRY_AFTER_MS = 1000


class InferenceHandler:
    def __init__(self, state: SidecarState, passthrough: Passthrough, metrics: Metrics,
                 audit: AuditLog, clients: ClientControl):
        self.state = state
        self.passthrough = passthrough
        self.metrics = metrics
        self.audit = audit
        self.clients = clients
        self._memory = MemoryWatermark(None)
        self.output_events = output_guard.OutputEvents(metrics, audit, clients)

    def _watermark(self) -> MemoryWatermark:
        """The memory watermark of the current config (reloads change the limit, the cached
        RSS reading stays)."""
        self._memory.limit_bytes = self.state.current.config.limits.max_memory_bytes
        return self._memory

    def audit_decision(self, identity: str, request_id: str, model: str, method: str, status: str,
               verdict: policy.Verdict | None, reason: str | None = None) -> None:
        if verdict is not None and status == "OK" and not policy.needs_annotation(verdict):
            return  # plainly allowed: nothing to audit
        if verdict is not None and status == "OK" and not verdict.enforced \
                and verdict.action == "allow" and not verdict.reasons:
            return  # monitor mode, nothing would have happened
        self.audit.decision(request_id=request_id, client=identity, model=model,
                            method=method, status=status, verdict=verdict, reason=reason)

    # ---- shared inspection -------------------------------------------------------------
    async def inspect(self, raw: bytes, request_id: str, identity: str,
                      response_stages: bool = True) -> Inspected:
        """Admit the client, decode, run the pipeline and apply the policy; raises Rejected to
        refuse. What the request showed (verdict reasons, malformed input) feeds the client's
        suspicion."""
        try:
            request = pb.ModelInferRequest.FromString(raw)
        except DecodeError:
            await self.clients.observe(identity, "", ["malformed"], {})
            raise _invalid("request is not a valid ModelInferRequest message") from None
        try:
            inspected = await self._admit_and_inspect(request, raw, request_id, identity,
                                                      response_stages)
        except Rejected as rejected:
            rejected.request = request
            raise
        inspected.client_id, inspected.identity = request.id, identity
        return inspected

    async def _admit_and_inspect(self, request: pb.ModelInferRequest, raw: bytes,
                                 request_id: str, identity: str,
                                 response_stages: bool) -> Inspected:
        watermark = self._watermark()
        if watermark.over():
            self.metrics.observe_shed(request.model_name, MEMORY_STAGE)
            raise _shed_memory(watermark, request_id)
        refusal = (await self.clients.admit(identity, request.model_name, request_id)
                   or await self.clients.admit_tokens(identity, request.model_name, request,
                                                      request_id))
        if refusal is not None:
            code, details, trailers, reason = refusal
            raise Rejected(code, details, reason, trailers)
        try:
            inspected = await self._inspect(request, raw, request_id, response_stages, identity)
        except Rejected as rejected:
            if rejected.reason.startswith(SHED_REASON):
                raise                       # the sidecar's capacity, not the client's doing
            reasons = rejected.verdict.reasons if rejected.verdict else [rejected.reason]
            stages = ({d.stage: d.action for d in rejected.verdict.decisions}
                      if rejected.verdict else {})
            await self.clients.observe(identity, request.model_name, reasons, stages)
            raise
        if inspected.verdict is not None and inspected.verdict.reasons:
            await self.clients.observe(identity, request.model_name, inspected.verdict.reasons,
                                       {d.stage: d.action for d in inspected.verdict.decisions})
        return inspected

    async def _inspect(self, request: pb.ModelInferRequest, raw: bytes, request_id: str,
                       response_stages: bool = True, identity: str = "") -> Inspected:
        snapshot = self.state.current
        model_name = request.model_name
        model = snapshot.config.models.get(model_name)
        out_of_band = [t.name for t in request.inputs if SHARED_MEMORY_KEY in t.parameters]
        if out_of_band:
            return self._out_of_band(request, raw, request_id, model, out_of_band)
        specs = self.state.input_specs(model_name) if model is not None else {}
        try:  # an unconfigured model's request is still decoded: malformed never goes up
            inputs = decode_checked(request, snapshot.config.limits.max_tensor_elements, specs)
        except (codec.TensorError, InputRejected) as err:
            raise _invalid(str(err)) from None
        if model is None:
            return Inspected(model_name, raw, None)
        pipeline = snapshot.pipelines[model_name]
        try:
            bucket = canary.bucket(identity, model_name) if pipeline.has_canary else None
            ctx, verdict = await pipeline.run_request(request, inputs, request_id,
                                                      stop_on_block=model.mode == "enforce",
                                                      canary_bucket=bucket)
        except (codec.TensorError, InputRejected) as err:
            raise _invalid(str(err)) from None
        except StageShed as shed:
            raise _shed(shed, request_id, model.retry_after_ms) from None
        if self.audit.include_excerpt and ctx.suspicious_text is not None:
            verdict = dataclasses.replace(verdict, suspicious_text=ctx.suspicious_text)
        respond = bool(pipeline.response_runners) and response_stages
        if verdict.blocks or not respond:
            self.metrics.observe_verdict(model_name, verdict)
        if verdict.blocks:
            code, details, trailers = policy.refusal(verdict, request_id, model.retry_after_ms)
            raise Rejected(code, details, verdict.action, trailers, verdict)
        original_raw = raw
        if ctx.changed and verdict.forwards_transformed:
            codec.encode_request(request, ctx.inputs, ctx.datatypes)
            original_raw = raw = request.SerializeToString()
        if respond:
            scored = request
            if ctx.changed and not verdict.enforced:
                # Monitor: the client's request goes as sent, but the response stages score the
                # answer to the transformed inputs enforce mode would forward, so the monitor
                # verdict says what enforce would do (thresholds are fitted on that tensor).
                scored = pb.ModelInferRequest()
                scored.CopyFrom(request)
                codec.encode_request(scored, ctx.inputs, ctx.datatypes)
            try:
                plan = pipeline.prepare_response(scored, ctx)
            except (codec.TensorError, InputRejected) as err:
                raise _invalid(str(err)) from None
            if scored is not request:
                client_raw = raw if raw is not None else request.SerializeToString()
                return Inspected(model_name, client_raw, verdict, inputs, plan, ctx,
                                 original_raw, model.retry_after_ms, scored.SerializeToString(),
                                 pipeline)
            return Inspected(model_name, request.SerializeToString(), verdict, inputs, plan, ctx,
                             original_raw, model.retry_after_ms, pipeline=pipeline)
        return Inspected(model_name, raw if raw is not None else request.SerializeToString(),
                         verdict, inputs)

    async def complete(self, inspected: Inspected, answer: Answer, context,
                       request_id: str) -> Answer:
        """Run response stages on the upstream's answer, finish the verdict, and return what the
        client gets (raises Rejected when a response stage refuses it)."""
        if not inspected.plan:
            await self.clients.credit(inspected.identity, inspected.model)
            return self.annotated(answer, inspected, request_id)
        response = answer.message

        async def call_upstream(request: pb.ModelInferRequest) -> pb.ModelInferResponse:
            raw = await self.passthrough.call_unary(MODEL_INFER, request.SerializeToString(),
                                                    context, request_id)
            return pb.ModelInferResponse.FromString(raw)

        client_response = None
        if inspected.scoring is not None:  # monitor: score what enforce would forward
            client_response = response
            response = await call_upstream(pb.ModelInferRequest.FromString(inspected.scoring))
        verdict, extra, failed = await inspected.pipeline.run_response(
            inspected.plan, response, call_upstream, inspected.ctx)
        inspected.verdict = verdict
        self.metrics.observe_verdict(inspected.model, verdict)
        if verdict.blocks:
            code, details, trailers = policy.refusal(verdict, request_id, inspected.retry_after_ms)
            raise Rejected(code, details, verdict.action, trailers, verdict)
        if client_response is not None:
            response = client_response  # the answer to the client's own request
        elif failed:
            # A stage failed (open) after its prepare may have changed the forwarded request
            # (batched variants, extra outputs): the answer in hand is not the client's. Ask
            # the upstream again with the request as the client sent it.
            response = await call_upstream(pb.ModelInferRequest.FromString(inspected.original))
            extra = {}
        policy.set_parameters(response, extra)
        if policy.needs_annotation(verdict):
            policy.annotate(response, verdict, request_id)
        await self.clients.credit(inspected.identity, inspected.model)
        return Answer(message=response)

    async def guard_output(self, model: str, answer: Answer, identity: str, request_id: str,
                           span=None) -> Answer:
        """The model's output section on a unary answer: redact in place, or refuse it
        (PERMISSION_DENIED naming the rule) when a finding stops it."""
        output = self.state.current.outputs.get(model)
        if output is None:
            return answer
        found = await output_guard.check_unary(output, answer.message)
        await self.output_events.report(identity=identity, request_id=request_id, model=model,
                                        method="ModelInfer", outcome=found, span=span)
        if found.stop is not None:
            reasons = ",".join(found.reasons)
            raise Rejected(grpc.StatusCode.PERMISSION_DENIED, output_guard.stop_details(found.stop),
                           f"{OUTPUT_STOP_PREFIX}{reasons}",
                           (("bastion-verdict", "block"), ("bastion-reasons", reasons),
                            (forwarding.REQUEST_ID_KEY, request_id)))
        if found.findings:
            answer.changed()  # redacted in place
        return answer

    def _out_of_band(self, request, raw: bytes, request_id: str, model, names: list[str]) -> Inspected:
        """Tensor data in shared memory cannot be inspected: the model's policy decides."""
        if model is None:
            return Inspected(request.model_name, raw, None)
        rule = model.shared_memory or ("deny" if model.mode == "enforce" else "pass")
        decision = policy.Decision("policy", "block" if rule == "deny" else "flag", None,
                                   ["shared_memory_uninspectable"])
        verdict = policy.decide([decision], {}, model.mode)
        self.metrics.observe_verdict(request.model_name, verdict)
        if verdict.blocks:
            code, details, trailers = policy.refusal(verdict, request_id)
            raise Rejected(code, details, "shared_memory", trailers, verdict)
        return Inspected(request.model_name, raw, verdict)

    def _extraction(self, model: str):
        config = self.state.current.config.models.get(model)
        return config.extraction if config is not None else None

    @staticmethod
    def annotated(answer: Answer, inspected: Inspected, request_id: str) -> Answer:
        if inspected.verdict is None or not policy.needs_annotation(inspected.verdict):
            return answer
        policy.annotate(answer.message, inspected.verdict, request_id)
        answer.changed()
        return answer

    # ---- unary -------------------------------------------------------------------------
    async def model_infer(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        started = time.perf_counter()
        request_id = forwarding.new_request_id()
        identity = self.clients.identity(context)
        model = ""
        outcome = "error"
        cohort = canary.ALL
        protocol = getattr(context, "protocol", "grpc")  # the REST front's context says http
        with telemetry.server_span(MODEL_INFER, context) as span:
            if span is not None:
                span.set_attribute("bastion.request_id", request_id)
                span.set_attribute("bastion.protocol", protocol)
            try:
                inspected = await self.inspect(raw, request_id, identity)
                model = inspected.model
                cohort = cohort_of(inspected.verdict)
                telemetry.record_verdict(span, inspected.verdict)
                forward_started = time.perf_counter()
                reply = await self.passthrough.forward_unary(MODEL_INFER, inspected.body, context,
                                                             request_id)
                upstream_s = time.perf_counter() - forward_started
                try:
                    answer = await self.complete(inspected, Answer(reply), context, request_id)
                except Rejected as refused:
                    # A response stage refused the answer: that is the client's doing as much
                    # as a request stage's refusal, so it feeds the suspicion score too (a
                    # query-based attacker probing a response-stage detector gets tiered).
                    verdict = refused.verdict
                    await self.clients.observe(
                        identity, model, list(verdict.reasons) if verdict else [refused.reason],
                        {d.stage: d.action for d in verdict.decisions} if verdict else {})
                    raise
                answer = await self.guard_output(model, answer, identity, request_id, span)
                if self.clients.charges_output:
                    await self.clients.charge_response(identity, model, answer.message,
                                                       output_tensor(self.state.current, model))
                outcome = "OK"
                settings = self._extraction(model)
                if settings is not None:
                    await self.clients.observe_extraction(identity, model, settings,
                                                          inspected.inputs, answer)
                if inspected.verdict is not None:
                    self.audit_decision(identity, request_id, model, "ModelInfer", outcome, inspected.verdict)
                self.metrics.observe_added(model, time.perf_counter() - started - upstream_s,
                                           cohort)
                return answer.raw
            except Rejected as rejected:
                outcome = rejected.code.name
                cohort = cohort_of(rejected.verdict)
                model = model or rejected.model(raw)
                telemetry.record_verdict(span, rejected.verdict)
                self.audit_decision(identity, request_id, model, "ModelInfer", outcome,
                            rejected.verdict, rejected.reason)
                trailers = rejected.trailers or ((forwarding.REQUEST_ID_KEY, request_id),)
                await context.abort(rejected.code, rejected.details, trailers)
            except asyncio.CancelledError:
                outcome = "CANCELLED"
                raise
            except grpc.aio.AbortError:
                outcome = (context.code() or grpc.StatusCode.UNKNOWN).name
                raise
            finally:
                telemetry.record_status(span, getattr(grpc.StatusCode, outcome,
                                                      grpc.StatusCode.UNKNOWN))
                self.metrics.observe_request("ModelInfer", model, outcome,
                                             time.perf_counter() - started,
                                             protocol, cohort)

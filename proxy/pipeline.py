"""Per-model filter chain and the one stage wrapper.

Each model's ``pipeline`` in config is an ordered list of stages (Envoy-style filter chain), run
on the decoded request. Every stage, whatever it does, is run by :class:`StageRunner`, which
gives it timing, a time budget, ``on_error: open|closed``, ``on_overload: shed|error`` (a model
at capacity, detectors/batcher.py), metrics and a span, and turns its score into a decision with
the stage's threshold and action. The policy (:mod:`bastion.proxy.policy`)
folds the decisions into one verdict. Each entry is validated and built by
:mod:`bastion.stage_config`, which the config schema shares.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from typing import TYPE_CHECKING

import numpy as np
from opentelemetry import trace

from bastion.core.stage import StageOutcome, StageView
from bastion.detectors.batcher import Overloaded
from bastion.protos import codec
from bastion.protos.codec import TensorError, as_bytes_array
from bastion.proxy import canary, policy, telemetry
from bastion.proxy.policy import ACTIONS, Decision
from bastion.stage_config import StageConfig, calibrate_command, parse_stage
from bastion.transforms.base import InputRejected
from bastion.transforms.validate import check as check_tensor

if TYPE_CHECKING:
    from bastion.config import ModelConfig
    from bastion.proxy.metrics import Metrics

tracer = trace.get_tracer("bastion.pipeline")


def stage_span(stage_id: str):
    """The stage's child span while tracing is on. Off, a no-op span that leaves the current
    context alone: the API's own no-op path still creates a span object and attaches and
    detaches a context, per stage per request, for nothing (the upstream then sees the same
    parent context either way)."""
    if telemetry.enabled():
        return tracer.start_as_current_span(f"bastion.stage {stage_id}")
    return contextlib.nullcontext(trace.INVALID_SPAN)


@dataclasses.dataclass
class RequestContext:
    """What one inference request carries through its model's pipeline."""
    request_id: str
    model_name: str
    model_version: str
    inputs: dict[str, np.ndarray]
    datatypes: dict[str, str]
    # Inputs whose data lives out of band (Triton shared memory): present by name, not inspectable.
    out_of_band: list[str] = dataclasses.field(default_factory=list)
    invalid_utf8: str = "reject"
    # The client's canary bucket (proxy/canary.py; None: the model has no canary) and the mode
    # the request runs in (a model canary puts clients outside its share in monitor mode).
    canary_bucket: float | None = None
    mode: str = "enforce"
    changed: bool = False
    scores: dict[str, float] = dataclasses.field(default_factory=dict)
    decisions: list[Decision] = dataclasses.field(default_factory=list)
    # The text a detector scored highest so far, for the audit excerpt (never logged raw).
    suspicious_text: str | None = None
    _suspicious_score: float = 0.0
    _texts: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    _texts_changed: set[str] = dataclasses.field(default_factory=set)

    def texts(self, name: str) -> np.ndarray:
        """The BYTES input ``name`` decoded as UTF-8 str, once per request."""
        cached = self._texts.get(name)
        if cached is None:
            raw = self.inputs[name]
            cached = np.empty(raw.shape, dtype=object)
            flat_in, flat_out = raw.reshape(-1), cached.reshape(-1)
            for index, item in enumerate(flat_in):
                try:
                    flat_out[index] = item.decode("utf-8")
                except UnicodeDecodeError:
                    if self.invalid_utf8 != "replace":
                        raise TensorError(f"input '{name}': element {index} is not valid "
                                          "UTF-8") from None
                    flat_out[index] = item.decode("utf-8", "replace")
                    self._texts_changed.add(name)  # forward the repaired text
                    self.changed = True
            self._texts[name] = cached
        return cached

    def set_texts(self, name: str, texts: np.ndarray) -> None:
        self._texts[name] = texts
        self._texts_changed.add(name)
        self.changed = True

    def set_tensor(self, name: str, array: np.ndarray) -> None:
        self.inputs[name] = array
        self.changed = True

    def finish(self) -> None:
        """Write changed texts back into the BYTES inputs before re-encoding."""
        for name in self._texts_changed:
            texts = self._texts[name]
            self.inputs[name] = as_bytes_array(texts.reshape(-1), texts.shape)
        self._texts_changed.clear()


class StageShed(Exception):
    """A stage whose model is at capacity sheds the request (``on_overload: shed``)."""

    def __init__(self, stage_id: str, cause: Overloaded):
        super().__init__(f"stage {stage_id} is at capacity ({cause}); retry later")
        self.stage_id = stage_id


class StageRunner:
    """Runs one configured stage on a request: the one place for timing, budget, errors,
    overload, metrics and spans."""

    def __init__(self, model_name: str, config: StageConfig, metrics: Metrics | None,
                 enforce: bool = True):
        self.model_name = model_name
        self.config = config
        self.metrics = metrics
        # Monitor mode never refuses: there an overloaded stage is skipped (fail open).
        self.may_shed = enforce and config.common.on_overload == "shed" and not config.common.shadow
        self.kind = config.spec.kind
        self.is_text = config.impl.accepts == {"BYTES"}

    def _targets(self, ctx: RequestContext) -> list[str]:
        wanted = self.config.common.inputs
        names = wanted if wanted is not None else list(ctx.inputs)
        accepts = self.config.impl.accepts
        return [n for n in names if n in ctx.inputs and ctx.datatypes.get(n) in accepts]

    def _view(self, ctx: RequestContext, targets: list[str]) -> StageView:
        return StageView(ctx.request_id, self.config.stage_id,
                         {name: ctx.texts(name) if self.is_text else ctx.inputs[name]
                          for name in targets},
                         {name: ctx.datatypes[name] for name in targets})

    async def _request_half(self, ctx: RequestContext, targets: list[str],
                            timeout: float | None) -> StageOutcome:
        """The stage's request half: awaited (a model behind the micro-batcher), in a worker
        thread (``offload``: CPU-heavy image work) or inline."""
        impl, view = self.config.impl, self._view(ctx, targets)
        if impl.is_async:
            return await asyncio.wait_for(impl.aon_request(view), timeout)
        if self.config.spec.offload:
            return await asyncio.wait_for(asyncio.to_thread(impl.on_request, view), timeout)
        return impl.on_request(view)

    def _observe_run(self, started: float, error: str | None) -> None:
        """The stage's time and outcome into the metrics, for every run, failed or not."""
        if self.metrics is not None:
            self.metrics.observe_stage(self.model_name, self.config.stage_id,
                                       time.perf_counter() - started, error)

    def shadow(self, canary_bucket: float | None) -> bool:
        """Whether the stage only annotates for this request: a shadow stage, or a canary
        stage (``enforce_percent``) for a client outside its share."""
        common = self.config.common
        return common.shadow or not canary.enforces(common.enforce_percent, canary_bucket)

    def _failed(self, error: str, span, shadow: bool) -> Decision:
        """A stage that raised or ran over budget: on_error decides (closed blocks)."""
        span.set_attribute("bastion.stage.error", error)
        if self.config.common.on_error == "closed":
            return Decision(self.config.stage_id, "block", None, [f"stage_{error}"],
                            shadow=shadow)
        return Decision(self.config.stage_id, "allow", None, [f"stage_{error}:fail_open"],
                        shadow=shadow)

    async def run(self, ctx: RequestContext) -> Decision | None:
        common = self.config.common
        stage_id = self.config.stage_id
        targets = self._targets(ctx)
        if not targets:
            return None
        started = time.perf_counter()
        with stage_span(stage_id) as span:
            error = None
            try:
                timeout = common.budget_ms / 1000 if common.budget_ms else None
                outcome = await self._request_half(ctx, targets, timeout)
                elapsed = time.perf_counter() - started
                if common.budget_ms and elapsed * 1000 > common.budget_ms:
                    error = "budget_exceeded"
            except (InputRejected, TensorError):
                raise  # a rule break is a verdict on the request, not a stage failure
            except asyncio.TimeoutError:
                error = "budget_exceeded"
            except Overloaded as exc:
                if self.may_shed and ctx.mode == "enforce" and not self.shadow(ctx.canary_bucket):
                    span.set_attribute("bastion.stage.error", "shed")
                    if self.metrics is not None:
                        self.metrics.observe_shed(self.model_name, stage_id)
                    raise StageShed(stage_id, exc) from None
                error = "overloaded"
            except Exception as exc:  # noqa: BLE001 - any stage bug is handled by on_error
                error = "error"
                span.record_exception(exc)
            self._observe_run(started, error)
            shadow = self.shadow(ctx.canary_bucket)
            if error is not None:
                return self._failed(error, span, shadow)
            # Replacements apply only now, so a stage that failed half-way never leaves a
            # half-transformed request.
            for name, value in outcome.replacements.items():
                ctx.set_texts(name, value) if self.is_text else ctx.set_tensor(name, value)
            score = outcome.score
            if outcome.worst_text is not None and score > ctx._suspicious_score:
                ctx.suspicious_text, ctx._suspicious_score = outcome.worst_text, score
            ctx.scores[stage_id] = score
            if self.metrics is not None:
                self.metrics.observe_score(self.model_name, stage_id, score)
            span.set_attribute("bastion.stage.score", score)
            acted = common.threshold is not None and score >= common.threshold
            if acted:
                action = common.action or "block"
            elif outcome.replacements:
                action = "transform"
            else:
                action = "allow"
            if action != "allow":
                span.set_attribute("bastion.stage.action", action)
            return Decision(stage_id, action, score, outcome.reasons if action != "allow" else [],
                            threshold=common.threshold, shadow=shadow)


class ResponseRunner(StageRunner):
    """Runs a response stage: ``prepare`` on the request about to be forwarded, ``finish`` on
    the upstream's answer, with the same timing, budget, on_error, metrics and span as any stage."""

    def prepare(self, request, ctx: RequestContext):
        """(ok, state): a stage that fails here follows on_error at finish time."""
        try:
            return True, self.config.impl.prepare(request, ctx.inputs, ctx.request_id)
        except (InputRejected, TensorError):
            raise
        except Exception:  # noqa: BLE001
            return False, None

    async def finish(self, prepared, response, call_upstream,
                     canary_bucket: float | None = None) -> tuple[Decision, dict, int]:
        common = self.config.common
        stage_id = self.config.stage_id
        shadow = self.shadow(canary_bucket)
        ok, state = prepared
        started = time.perf_counter()
        with stage_span(stage_id) as span:
            error, result = None, None
            if not ok:
                error = "error"
            else:
                try:
                    timeout = common.budget_ms / 1000 if common.budget_ms else None
                    result = await asyncio.wait_for(
                        self.config.impl.on_response(state, response, call_upstream), timeout)
                except asyncio.TimeoutError:
                    error = "budget_exceeded"
                except Exception as exc:  # noqa: BLE001 - handled by on_error
                    error = "error"
                    span.record_exception(exc)
            self._observe_run(started, error)
            if error is not None:
                return self._failed(error, span, shadow), {}, 0
            if self.metrics is not None:
                self.metrics.observe_score(self.model_name, stage_id, result.score)
                if result.extra_items:
                    self.metrics.observe_extra_upstream(self.model_name, stage_id,
                                                        result.extra_items)
            span.set_attribute("bastion.stage.score", result.score)
            if result.refusal is not None:
                status, reason = result.refusal
                decision = Decision(stage_id, "block", result.score, [reason] + result.reasons,
                                    threshold=common.threshold, shadow=shadow,
                                    status=status)
            elif result.flag is not None:
                decision = Decision(stage_id, "flag", result.score, [result.flag] + result.reasons,
                                    threshold=common.threshold, shadow=shadow)
            elif common.threshold is not None and result.score >= common.threshold:
                decision = Decision(stage_id, common.action or "block", result.score,
                                    result.reasons, threshold=common.threshold,
                                    shadow=shadow)
            else:
                decision = Decision(stage_id, "allow", result.score, [],
                                    threshold=common.threshold, shadow=shadow)
            return decision, result.parameters, result.extra_items


def request_datatype(request, name: str) -> str:
    """The datatype a ModelInferRequest declares for input ``name``."""
    return next(t.datatype for t in request.inputs if t.name == name)


def decode_checked(request, max_elements: int, specs: dict) -> dict[str, np.ndarray]:
    """The request's inputs, decoded and checked against the model's declared input specs
    (raises TensorError or InputRejected, naming the input, never echoing its data)."""
    inputs = codec.decode_request(request, max_elements)
    for name, spec in specs.items():
        if name in inputs:
            check_tensor(inputs[name], request_datatype(request, name), spec, name)
    return inputs


class Pipeline:
    """One model's chain (Envoy's filter chain): the request stages in order, then, on the
    upstream's answer, the response stages in reverse order, and the policy's verdict after
    each half. The server (bastion.proxy.inference) and ``replay --offline`` run requests
    through these methods, ``calibrate`` through :meth:`run_each` (every stage's score, and
    which stage refused a text)."""

    def __init__(self, model_name: str, model: ModelConfig, runners: list[StageRunner],
                 response_runners: list[ResponseRunner] | None = None):
        self.model_name = model_name
        self.model = model
        self.runners = runners
        self.response_runners = response_runners or []
        #: The defense version of the config this chain was built from (set by the snapshot).
        self.config_version = ""
        #: The shares of the model's and its stages' canaries (proxy/canary.py), if any.
        self.canary_percents = [p for p in (model.enforce_percent, *(
            r.config.common.enforce_percent for r in (*self.runners, *self.response_runners)))
            if p is not None]
        self.has_canary = bool(self.canary_percents)

    def cohort(self, canary_bucket: float | None) -> str:
        """The client's canary cohort: canary when at least one canary enforces for it."""
        if not self.has_canary:
            return canary.ALL
        return (canary.CANARY if any(canary.enforces(p, canary_bucket)
                                     for p in self.canary_percents) else canary.CONTROL)

    def mode_for(self, canary_bucket: float | None) -> str:
        """The mode a request runs in: the model's, unless a model canary leaves it out."""
        if self.model.mode == "enforce" and not canary.enforces(self.model.enforce_percent,
                                                                 canary_bucket):
            return "monitor"
        return self.model.mode

    def __bool__(self) -> bool:
        return bool(self.runners or self.response_runners)

    async def run(self, ctx: RequestContext, stop_on_block: bool) -> RequestContext:
        for runner in self.runners:
            decision = await runner.run(ctx)
            if decision is None:
                continue
            ctx.decisions.append(decision)
            if stop_on_block and decision.action == "block" and not decision.shadow:
                break  # nothing later can change a block; spare the work
        ctx.finish()
        return ctx

    async def run_each(self, ctx: RequestContext, upto: int | None = None,
                       kind: str | None = None) -> str | None:
        """Every request stage (the first ``upto``; only those of ``kind`` if given) on
        ``ctx``, none skipped after a block: what calibration needs, every stage's score.
        Returns the id of the stage that refused the request (a rule break: the sidecar
        answers INVALID_ARGUMENT there), else None."""
        for runner in self.runners[:upto]:
            if kind is not None and runner.kind != kind:
                continue
            try:
                decision = await runner.run(ctx)
            except (InputRejected, TensorError):
                return runner.config.stage_id
            if decision is not None:
                ctx.decisions.append(decision)
        ctx.finish()
        return None

    async def run_request(self, request, inputs: dict[str, np.ndarray], request_id: str,
                          stop_on_block: bool, canary_bucket: float | None = None
                          ) -> tuple[RequestContext, policy.Verdict]:
        """The request half on decoded ``inputs``: every request stage, then the verdict.
        ``canary_bucket``: the client's (proxy/canary.py), where the model has a canary."""
        mode = self.mode_for(canary_bucket)
        ctx = RequestContext(request_id=request_id, model_name=self.model_name,
                             model_version=request.model_version, inputs=dict(inputs),
                             datatypes={t.name: t.datatype for t in request.inputs},
                             invalid_utf8=self.model.invalid_utf8,
                             canary_bucket=canary_bucket, mode=mode)
        await self.run(ctx, stop_on_block and mode == "enforce")
        return ctx, self._verdict(ctx)

    def _verdict(self, ctx: RequestContext) -> policy.Verdict:
        return policy.decide(ctx.decisions, ctx.scores, ctx.mode, self.config_version,
                             self.cohort(ctx.canary_bucket))

    def prepare_response(self, request, ctx: RequestContext) -> list:
        """Each response stage's ``prepare`` on the request about to be forwarded: the plan
        :meth:`run_response` completes."""
        return [(runner, runner.prepare(request, ctx)) for runner in self.response_runners]

    async def run_response(self, plan: list, response, call_upstream, ctx: RequestContext
                           ) -> tuple[policy.Verdict, dict, bool]:
        """The response half: the prepared stages in reverse order (the stage that changed the
        forwarded request last sees the answer first, so each undoes its own change after the
        later stages have read the answer), then the verdict of the whole request. Returns
        (verdict, extra response parameters, whether a stage failed)."""
        extra: dict = {}
        failed = False
        for runner, prepared in reversed(plan):
            decision, parameters, _ = await runner.finish(prepared, response, call_upstream,
                                                          ctx.canary_bucket)
            ctx.decisions.append(decision)
            if decision.score is not None:
                ctx.scores[decision.stage] = decision.score
            else:
                failed = True
            extra.update(parameters)
        return self._verdict(ctx), extra, failed


def build_pipeline(model_name: str, model: ModelConfig, metrics: Metrics | None = None, *,
                   allow_uncalibrated: bool = False, stages: list | None = None) -> Pipeline:
    """The model's chain. ``stages``: the StageConfigs the config's validation already built
    (``Config.built_stages``), so a load builds each stage once; None builds them here."""
    runners, response_runners = [], []
    for index, entry in enumerate(model.pipeline):
        config = stages[index] if stages is not None else parse_stage(
            entry, model.inputs, f"models.{model_name}.pipeline.{index}",
            allow_uncalibrated=allow_uncalibrated, hint=calibrate_command(model_name))
        if config.spec.kind == "response":
            response_runners.append(ResponseRunner(model_name, config, metrics))
        elif response_runners:
            raise ValueError(f"models.{model_name}.pipeline.{index}: request stages must come "
                             "before response stages")
        else:
            runners.append(StageRunner(model_name, config, metrics,
                                       enforce=model.mode == "enforce"))
    return Pipeline(model_name, model, runners, response_runners)


__all__ = ["ACTIONS", "Pipeline", "RequestContext", "ResponseRunner", "StageRunner", "StageShed",
           "build_pipeline", "decode_checked", "request_datatype"]

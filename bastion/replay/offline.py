"""Replay without a server: the model's configured pipeline and policy run in-process."""
from __future__ import annotations

import time

from bastion.replay.outcome import Outcome, ReplayError, progress_bar
from bastion.replay.thresholds import thresholds_of_pipeline


class OfflinePipeline:
    """The model's configured pipeline and policy, in-process, exactly as the proxy runs them
    (bastion.proxy.inference): decode the same request bytes and check the declared input specs
    (``decode_checked``), then the chain's request half (``Pipeline.run_request``, with
    ``stop_on_block=False`` so every stage scores) and its verdict."""

    def __init__(self, config, model_name: str):
        from bastion.proxy.state import SidecarState
        if model_name not in config.models:
            raise ReplayError(f"bastion replay: model {model_name!r} is not configured "
                              f"(configured: "
                              f"{', '.join(config.models) or 'none'})")
        self.config = config
        self.model_name = model_name
        self.model = config.models[model_name]
        state = SidecarState(config)
        self.pipeline = state.current.pipelines[model_name]
        self.specs = state.input_specs(model_name)

    def thresholds(self) -> dict[str, float]:
        return thresholds_of_pipeline(self.pipeline, response=False)

    def skipped_stages(self) -> list[str]:
        """Response stages: they need the model's answer, so offline mode cannot run them."""
        return [r.config.stage_id for r in getattr(self.pipeline, "response_runners", [])]

    async def inspect(self, record) -> Outcome:
        from google.protobuf.message import DecodeError

        from bastion.protos import codec, pb
        from bastion.proxy import policy
        from bastion.proxy.pipeline import decode_checked
        from bastion.transforms.base import InputRejected

        started = time.perf_counter()
        outcome = Outcome(record.id, record.label, record.family, "OK")
        try:
            request = pb.ModelInferRequest.FromString(record.payload)
            if request.model_name != self.model_name:
                raise ReplayError(f"bastion replay: record {record.id!r} is for model "
                                  f"{request.model_name!r}; offline mode runs {self.model_name!r}")
            inputs = decode_checked(request, self.config.limits.max_tensor_elements, self.specs)
            # A client inside every canary: the replay judges the whole defense as configured.
            _, verdict = await self.pipeline.run_request(request, inputs, record.id,
                                                         stop_on_block=False, canary_bucket=0.0)
        except (DecodeError, codec.TensorError, InputRejected) as err:
            outcome.status = "INVALID_ARGUMENT"
            outcome.detail = f"bastion: {err}"[:300] if not isinstance(err, DecodeError) else \
                "bastion: request is not a valid ModelInferRequest message"
            outcome.latency_ms = (time.perf_counter() - started) * 1000
            return outcome
        outcome.latency_ms = (time.perf_counter() - started) * 1000
        outcome.verdict = verdict.action
        outcome.mode = "enforce" if verdict.enforced else "monitor"
        outcome.scores = {stage: float(score) for stage, score in verdict.scores.items()}
        outcome.reasons = list(verdict.reasons)
        if verdict.blocks:  # what the sidecar answers in enforce mode
            outcome.status = policy.refusal(verdict, record.id)[0].name
        return outcome


async def replay_offline(records, runner: OfflinePipeline, progress: bool) -> list[Outcome]:
    bar = progress_bar(len(records), progress, "replay (offline)")
    try:
        results = []
        for record in records:
            results.append(await runner.inspect(record))
            bar.update(1)
        return results
    finally:
        bar.close()

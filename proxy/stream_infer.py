"""ModelStreamInfer: each request of the stream inspected on its own, the upstream's responses
relayed in order (and, for a model with an `output` section, scanned as they stream)."""
from __future__ import annotations

import asyncio
import collections
import logging
import time

import grpc

from bastion.protos import SERVICE, pb
from bastion.proxy import forwarding, output_guard, policy, streams, telemetry
from bastion.proxy.inference import Inspected, InferenceHandler, Rejected, output_tensor

log = logging.getLogger("bastion.inference")
MODEL_STREAM_INFER = f"/{SERVICE}/ModelStreamInfer"


async def model_stream_infer(handler: InferenceHandler, request_iterator,
                             context: grpc.aio.ServicerContext):
    """Each request is inspected on its own; a refused one gets a ModelStreamInferResponse
    with ``error_message`` (Triton's per-request error) and the refused request's id, and the
    stream goes on. The stream lives as the client wants, within proxy/streams.py's limits."""
    stream_id = forwarding.new_request_id()
    identity = handler.clients.identity(context)
    span = telemetry.start_stream_span(MODEL_STREAM_INFER, context)
    snapshot = handler.state.current
    limits = snapshot.config.upstream
    outputs = output_guard.StreamOutputs(snapshot.outputs)
    timeout, lifetime_bound = streams.stream_deadline(context, limits.max_stream_lifetime_s)
    call = handler.passthrough.upstream.stream(MODEL_STREAM_INFER)(
        metadata=telemetry.inject_headers(forwarding.upstream_metadata(context, stream_id),
                                          span),
        timeout=timeout)
    idle = streams.IdleWatch(limits.stream_idle_timeout_s)
    outbox: asyncio.Queue = asyncio.Queue()
    done = object()

    # Responses to annotate, matched by the client's request id (Triton echoes it), or in
    # order for requests without one (a non-decoupled model answers in order).
    pending: collections.deque[tuple[str, Inspected, str]] = collections.deque()

    async def pump_requests() -> None:
        async for raw in request_iterator:
            started = time.perf_counter()
            request_id = forwarding.new_request_id()
            rejected = None
            try:
                # Response stages need one answer per request; a stream's answers are not
                # matched to requests reliably enough, so streams get request stages only.
                inspected = await handler.inspect(raw, request_id, identity,
                                               response_stages=False)
            except Rejected as refusal:
                rejected = refusal
            except Exception:  # noqa: BLE001 - one bad message must not end the stream
                log.exception("inspecting a stream message failed")
                rejected = Rejected(grpc.StatusCode.INTERNAL,
                                    "bastion: internal error while inspecting the request",
                                    "internal")
            if rejected is not None:
                handler.metrics.observe_request("ModelStreamInfer", "", rejected.code.name,
                                             time.perf_counter() - started)
                handler.audit_decision(identity, request_id, rejected.model(raw),
                                       "ModelStreamInfer", rejected.code.name, rejected.verdict,
                                       rejected.reason)
                reply = streams.refusal_reply(raw, rejected.details, rejected.request)
                await outbox.put(reply.SerializeToString())
                continue
            handler.metrics.observe_request("ModelStreamInfer", inspected.model, "forwarded",
                                         time.perf_counter() - started)
            # streams run request stages only: a message is judged once it is forwarded
            await handler.clients.credit(identity, inspected.model)
            if inspected.verdict is not None:
                handler.audit_decision(identity, request_id, inspected.model, "ModelStreamInfer",
                            "OK", inspected.verdict)
            if inspected.verdict is not None and policy.needs_annotation(inspected.verdict):
                pending.append((inspected.client_id, inspected, request_id))
            idle.sent()
            try:
                await call.write(inspected.body)
            except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
                return  # the upstream ended the stream; its status is what the client gets
        await call.done_writing()

    def annotate_stream_reply(reply: bytes,
                              message: pb.ModelStreamInferResponse) -> bytes:
        if message.error_message and not message.HasField("infer_response"):
            return reply
        match = next((entry for entry in pending if entry[0] == message.infer_response.id
                      and entry[0]), None)
        if match is None:
            match = next((entry for entry in pending if not entry[0]), None)
        if match is None:
            return reply
        pending.remove(match)
        policy.annotate(message.infer_response, match[1].verdict, match[2])
        return message.SerializeToString()

    async def pump_responses() -> None:
        try:
            async for reply in call:
                message = pb.ModelStreamInferResponse.FromString(reply)
                idle.received(streams.is_final_response(message))
                sending = [(reply, message)]
                if outputs.active:
                    model, messages, found = await outputs.on_response(message)
                    await handler.output_events.report(
                        identity=identity, request_id=stream_id, model=model,
                        method="ModelStreamInfer", outcome=found, span=span)
                    if model in outputs.outputs:  # rewritten: held back, redacted, stopped
                        sending = [(m.SerializeToString(), m) for m in messages]
                for reply, message in sending:
                    if handler.clients.charges_output and message.HasField("infer_response"):
                        model = message.infer_response.model_name
                        await handler.clients.charge_response(
                            identity, model, message.infer_response, output_tensor(snapshot, model))
                    await outbox.put(annotate_stream_reply(reply, message) if pending else reply)
        finally:
            await outbox.put(done)

    async def watch_idle() -> None:
        await idle.expired()
        await outbox.put(idle_expired)

    idle_expired = object()
    requests_task = asyncio.create_task(pump_requests())
    responses_task = asyncio.create_task(pump_responses())
    idle_task = asyncio.create_task(watch_idle())
    try:
        initial = forwarding.response_metadata(await call.initial_metadata())
        if initial:
            await context.send_initial_metadata(initial)
        while True:
            item = await outbox.get()
            if item is done:
                break
            if item is idle_expired:
                call.cancel()
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, idle.details())
            yield item
        # Local error replies queued after the upstream closed still belong to the client.
        while not outbox.empty():
            item = outbox.get_nowait()
            if item is not idle_expired:
                yield item
        await responses_task
    except grpc.aio.AioRpcError as error:
        if lifetime_bound and error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                streams.lifetime_details(limits.max_stream_lifetime_s))
        await forwarding.pass_error(context, error, handler.passthrough.upstream)
    finally:
        for task in (requests_task, responses_task, idle_task):
            task.cancel()
        call.cancel()
        if span is not None:
            span.end()
    await forwarding.relay_trailers(call, context)

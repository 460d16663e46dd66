"""Replay against a running sidecar: every record's request bytes to its gRPC ModelInfer, and the
verdict read back from the response annotations or the refusal's trailers."""
from __future__ import annotations

import asyncio
import time

import grpc

from bastion.replay.outcome import (EXIT_RUNTIME, REFUSAL_CODES, SCORE_PREFIX, Outcome,
                                    ReplayError, progress_bar)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def _outcome_from_reply(record, reply: bytes, latency_ms: float) -> Outcome:
    from bastion.protos import pb
    outcome = Outcome(record.id, record.label, record.family, "OK", latency_ms=latency_ms)
    try:
        params = pb.ModelInferResponse.FromString(reply).parameters
    except Exception:  # noqa: BLE001 - an unparseable reply carries no verdict
        return outcome
    if "bastion.verdict" in params:
        outcome.verdict = params["bastion.verdict"].string_param
    if "bastion.mode" in params:
        outcome.mode = params["bastion.mode"].string_param
    if "bastion.reasons" in params and params["bastion.reasons"].string_param:
        outcome.reasons = params["bastion.reasons"].string_param.split(",")
    for key in params:
        if key.startswith(SCORE_PREFIX):
            outcome.scores[key[len(SCORE_PREFIX):]] = float(params[key].double_param)
    return outcome


def _outcome_from_error(record, err: grpc.aio.AioRpcError, latency_ms: float) -> Outcome:
    code = err.code().name
    outcome = Outcome(record.id, record.label, record.family, code, latency_ms=latency_ms)
    trailers = {}
    try:
        trailers = {k: v for k, v in (err.trailing_metadata() or ()) if isinstance(v, str)}
    except Exception:  # noqa: BLE001
        pass
    if code in REFUSAL_CODES:
        outcome.verdict = trailers.get("bastion-verdict") or (
            "throttle" if code == "RESOURCE_EXHAUSTED" else "block")
        outcome.mode = "enforce"
        if trailers.get("bastion-reasons"):
            outcome.reasons = trailers["bastion-reasons"].split(",")
    else:
        outcome.detail = (err.details() or "")[:300]
    return outcome


async def replay_online(records, target: str, concurrency: int, rate: float | None,
                        timeout: float, progress: bool,
                        connect_timeout: float = 15.0) -> list[Outcome]:
    """Send every record's request bytes to ``target``'s ModelInfer, at most ``concurrency`` at
    a time and (with ``rate``) no faster than ``rate`` per second."""
    from bastion.protos import SERVICE
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
               ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
    results: list[Outcome | None] = [None] * len(records)
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        try:
            await asyncio.wait_for(channel.channel_ready(), connect_timeout)
        except asyncio.TimeoutError:
            raise ReplayError(f"bastion replay: cannot reach {target} within "
                              f"{connect_timeout:.0f}s", EXIT_RUNTIME) from None
        infer = channel.unary_unary(f"/{SERVICE}/ModelInfer")
        slots = asyncio.Semaphore(max(1, concurrency))
        bar = progress_bar(len(records), progress, "replay")
        loop = asyncio.get_running_loop()

        async def one(index: int, record) -> None:
            started = time.perf_counter()
            try:
                try:
                    reply = await infer(record.payload, timeout=timeout)
                except grpc.aio.AioRpcError as err:
                    results[index] = _outcome_from_error(
                        record, err, (time.perf_counter() - started) * 1000)
                else:
                    results[index] = _outcome_from_reply(
                        record, reply, (time.perf_counter() - started) * 1000)
            finally:
                slots.release()
                bar.update(1)

        tasks = []
        began = loop.time()
        try:
            for index, record in enumerate(records):
                if rate:
                    delay = began + index / rate - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                await slots.acquire()
                tasks.append(asyncio.create_task(one(index, record)))
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            bar.close()
    return [r for r in results if r is not None]

"""Micro-batching: the one place where concurrent requests' work for a model is gathered.

Callers ``await batcher.submit(item)``; items arriving within ``max_wait_ms`` of the first one
(or until ``max_batch`` are queued) are handed together to ``run_batch`` in a worker thread, off
the event loop, and each caller gets its own result back. ONNX Runtime releases the GIL, so a
batch runs while the loop keeps accepting requests.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class MicroBatcher(Generic[T, R]):
    def __init__(self, run_batch: Callable[[Sequence[T]], Sequence[R]], max_batch: int = 16,
                 max_wait_ms: float = 2.0, threads: int = 1, name: str = "batcher"):
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000
        self.executor = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix=name)
        self._pending: list[tuple[T, asyncio.Future]] = []
        self._flush_handle: asyncio.TimerHandle | None = None
        self.batches = 0
        self.items = 0

    async def submit(self, item: T) -> R:
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        self._pending.append((item, future))
        if len(self._pending) >= self.max_batch:
            self._flush(loop)
        elif self._flush_handle is None:
            self._flush_handle = loop.call_later(self.max_wait_s, self._flush, loop)
        return await future

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        while self._pending:
            batch, self._pending = self._pending[:self.max_batch], self._pending[self.max_batch:]
            loop.create_task(self._run(batch))

    async def _run(self, batch: list[tuple[T, asyncio.Future]]) -> None:
        items = [item for item, future in batch if not future.cancelled()]
        futures = [future for _, future in batch if not future.cancelled()]
        if not items:
            return
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(self.executor, self.run_batch, items)
            if len(results) != len(items):
                raise RuntimeError(f"run_batch returned {len(results)} results for "
                                   f"{len(items)} items")
        except Exception as err:  # noqa: BLE001 - every waiter gets the failure
            for future in futures:
                if not future.done():
                    future.set_exception(err)
            return
        self.batches += 1
        self.items += len(items)
        for future, result in zip(futures, results):
            if not future.done():
                future.set_result(result)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

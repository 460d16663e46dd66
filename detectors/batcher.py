"""Micro-batching: the one place where concurrent requests' work for a model is gathered.

Callers ``await batcher.submit(item)`` (or ``submit_many``); items arriving within
``max_wait_ms`` of the first one (or until ``max_batch`` are queued) are handed together to
``run_batch`` in a worker thread, off the event loop, and each caller gets its own result back.
ONNX Runtime releases the GIL, so a batch runs while the loop keeps accepting requests.

Overload (Envoy's overload manager, per model): at most ``max_concurrency`` batches run at once
and at most ``max_queue`` items wait for them. Past that, ``submit`` raises :class:`Overloaded`
at once instead of queueing, so the wait of every admitted item stays bounded (about
``max_queue / max_batch + 1`` batch times) and memory does not grow with the offered load; the
pipeline turns it into RESOURCE_EXHAUSTED (or the stage's on_error).
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

# Items allowed to wait when the caller names no bound: 8 full batches per running slot, and
# never fewer than 128 (a request with many texts must fit an idle queue).
DEFAULT_QUEUE_BATCHES = 8
MIN_DEFAULT_QUEUE = 128


class Overloaded(Exception):
    """The model's queue is full: the item was not queued (shed)."""

    def __init__(self, name: str, waiting: int, max_queue: int):
        super().__init__(f"{name}: {waiting} items already waiting (max_queue {max_queue})")
        self.name, self.waiting, self.max_queue = name, waiting, max_queue


def default_max_queue(max_batch: int, max_concurrency: int) -> int:
    return max(MIN_DEFAULT_QUEUE, DEFAULT_QUEUE_BATCHES * max_batch * max_concurrency)


class MicroBatcher(Generic[T, R]):
    def __init__(self, run_batch: Callable[[Sequence[T]], Sequence[R]], max_batch: int = 16,
                 max_wait_ms: float = 2.0, threads: int = 1, name: str = "batcher",
                 max_queue: int | None = None, max_concurrency: int | None = None):
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.run_batch = run_batch
        self.name = name
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000
        self.max_concurrency = max(1, max_concurrency or threads)
        self.max_queue = max_queue or default_max_queue(max_batch, self.max_concurrency)
        if self.max_queue < 1:
            raise ValueError("max_queue must be >= 1")
        self.executor = concurrent.futures.ThreadPoolExecutor(max(threads, self.max_concurrency),
                                                              thread_name_prefix=name)
        self._pending: list[tuple[T, asyncio.Future]] = []      # the batch being gathered
        self._ready: collections.deque = collections.deque()    # full batches waiting for a slot
        self._ready_items = 0
        self._flush_handle: asyncio.TimerHandle | None = None
        self.running = 0
        self.batches = 0
        self.items = 0
        self.shed = 0
        self.max_waiting_seen = 0

    @property
    def waiting(self) -> int:
        """Items queued and not yet running."""
        return len(self._pending) + self._ready_items

    async def submit(self, item: T) -> R:
        return (await self.submit_many([item]))[0]

    async def submit_many(self, items: Sequence[T]) -> list[R]:
        """All of ``items`` are queued, or none (Overloaded): a request is shed whole. An idle
        queue takes any number, so one large request is never refused on its own."""
        loop = asyncio.get_running_loop()
        waiting = self.waiting
        if waiting and waiting + len(items) > self.max_queue:
            self.shed += len(items)
            raise Overloaded(self.name, waiting, self.max_queue)
        futures = []
        for item in items:
            future: asyncio.Future = loop.create_future()
            self._pending.append((item, future))
            futures.append(future)
            if len(self._pending) >= self.max_batch:
                self._seal(loop)
        if self._pending and self._flush_handle is None:
            self._flush_handle = loop.call_later(self.max_wait_s, self._seal, loop)
        self.max_waiting_seen = max(self.max_waiting_seen, self.waiting)
        return list(await asyncio.gather(*futures))

    def _seal(self, loop: asyncio.AbstractEventLoop) -> None:
        """Close the batch being gathered and start what the free slots allow."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        while self._pending:
            batch, self._pending = self._pending[:self.max_batch], self._pending[self.max_batch:]
            self._ready.append(batch)
            self._ready_items += len(batch)
        self._start(loop)

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        while self._ready and self.running < self.max_concurrency:
            batch = self._ready.popleft()
            self._ready_items -= len(batch)
            self.running += 1
            loop.create_task(self._run(batch))

    async def _run(self, batch: list[tuple[T, asyncio.Future]]) -> None:
        loop = asyncio.get_running_loop()
        try:
            await self._run_batch(batch, loop)
        finally:
            self.running -= 1
            self._start(loop)

    async def _run_batch(self, batch: list[tuple[T, asyncio.Future]],
                         loop: asyncio.AbstractEventLoop) -> None:
        items = [item for item, future in batch if not future.cancelled()]
        futures = [future for _, future in batch if not future.cancelled()]
        if not items:
            return
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

"""Background tasks of the sidecar (config and certificate watchers): one way to stop them."""
from __future__ import annotations

import asyncio


async def cancel_and_wait(task: asyncio.Task | None) -> None:
    """Cancel a background task and wait until it has ended (its cancellation swallowed), so a
    stop never returns while the task still runs."""
    if task is None:
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass

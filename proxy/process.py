"""Process-level helpers of the long-running commands (serve; the upstream, demo and benches
reuse them from above)."""
from __future__ import annotations

import asyncio
import signal


def stop_event() -> asyncio.Event:
    """An event the running loop sets on SIGTERM or SIGINT: the clean-stop signal of every
    long-running command (Kubernetes sends SIGTERM, a terminal SIGINT)."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    return stopping

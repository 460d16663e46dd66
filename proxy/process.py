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


async def serve_until_stopped(server, listen: str, banner, grace_s: float) -> None:
    """Listen on ``listen`` (plain-text gRPC), print ``banner(port)`` (the one line tools and
    tests read the real port from), serve until SIGTERM/SIGINT, then stop with ``grace_s``."""
    port = server.add_insecure_port(listen)
    if not port:
        raise OSError(f"cannot listen on {listen}")
    await server.start()
    print(banner(port), flush=True)
    await stop_event().wait()
    await server.stop(grace_s)

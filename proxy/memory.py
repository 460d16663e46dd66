"""The memory watermark: above it the sidecar stops accepting new inference work.

Envoy's overload manager stops accepting requests when heap use passes a threshold, so a burst
of large tensors or a slow upstream cannot grow the process until the kernel kills it (and every
request in flight with it). Here the resident set size (RSS, read from /proc/self/statm, cached
for ``CACHE_S`` so the check costs nothing per request) is compared with
``limits.max_memory_bytes``; above it, new ModelInfer / stream messages end RESOURCE_EXHAUSTED
with retry-after-ms (shed, counted in ``bastion_shed_requests_total{stage="memory"}``) while
in-flight work finishes and frees what it holds.
"""
from __future__ import annotations

import os
import time

CACHE_S = 0.1
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int:
    """This process's RSS in bytes (0 where /proc is not available)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


class MemoryWatermark:
    """``over()`` is True while RSS is above ``limit_bytes`` (None: never)."""

    def __init__(self, limit_bytes: int | None, read=resident_bytes, clock=time.monotonic):
        self.limit_bytes = limit_bytes
        self._read, self._clock = read, clock
        self._checked, self._rss = float("-inf"), 0

    @property
    def rss(self) -> int:
        now = self._clock()
        if now - self._checked >= CACHE_S:
            self._rss, self._checked = self._read(), now
        return self._rss

    def over(self) -> bool:
        return self.limit_bytes is not None and self.rss > self.limit_bytes

    def describe(self) -> str:
        mib = 1024 * 1024
        return (f"memory above the watermark ({self.rss / mib:.0f} MiB resident, "
                f"limits.max_memory_bytes {self.limit_bytes / mib:.0f} MiB)")

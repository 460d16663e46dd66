"""Admin HTTP endpoint: /metrics (Prometheus text format), /healthz, /readyz and /version (the
active defense version, the files it covers and the last loads, as JSON).

A few lines of asyncio instead of a web framework: three GET routes on the same event loop as the
proxy, so readiness reflects the proxy's own state without cross-thread signalling.
"""
from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

log = logging.getLogger("bastion.admin")


class AdminServer:
    def __init__(self, registry, is_ready: Callable[[], bool],
                 version_report: Callable[[], dict] | None = None):
        self.registry = registry
        self.is_ready = is_ready
        self.version_report = version_report
        self.server: asyncio.AbstractServer | None = None

    async def start(self, address: str) -> int:
        host, _, port = address.rpartition(":")
        self.server = await asyncio.start_server(self._handle, host.strip("[]"), int(port))
        return self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = await asyncio.wait_for(reader.readline(), timeout=5)
            while (await asyncio.wait_for(reader.readline(), timeout=5)) not in (b"\r\n", b"\n", b""):
                pass  # headers are not needed by any route
            parts = request_line.decode("latin-1").split()
            method, path = (parts[0], parts[1].split("?")[0]) if len(parts) >= 2 else ("", "")
            if method not in ("GET", "HEAD"):
                status, ctype, body = "405 Method Not Allowed", "text/plain", b"GET only\n"
            elif path == "/metrics":
                status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, generate_latest(self.registry)
            elif path == "/healthz":
                status, ctype, body = "200 OK", "text/plain", b"ok\n"
            elif path == "/readyz":
                ready = self.is_ready()
                status = "200 OK" if ready else "503 Service Unavailable"
                ctype, body = "text/plain", b"ready\n" if ready else b"not ready\n"
            elif path == "/version" and self.version_report is not None:
                status, ctype = "200 OK", "application/json"
                body = json.dumps(self.version_report(), indent=1).encode()
            else:
                status, ctype, body = "404 Not Found", "text/plain", b"not found\n"
            head = (f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                    "Connection: close\r\n\r\n").encode("latin-1")
            writer.write(head if method == "HEAD" else head + body)
            await writer.drain()
        except (asyncio.TimeoutError, ConnectionError, UnicodeDecodeError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

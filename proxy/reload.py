"""Live config reload: a file watcher that also sees Kubernetes ConfigMap symlink swaps, and SIGHUP.

A ConfigMap volume updates by pointing the `..data` symlink at a new timestamped folder, so the
config file's inode changes while its path does not. Polling `stat()` of the path (which follows
links) catches that, a plain edit, and a rename-over, with no platform-specific notifier.

A new config is validated and its pipelines built before anything changes; an invalid one is
logged and counted and the old snapshot keeps serving.
"""
from __future__ import annotations

import asyncio
import logging
import os
import pathlib
import time

from bastion.config import ConfigError, load_config
from bastion.proxy.state import SidecarState
from bastion.proxy.tasks import cancel_and_wait

log = logging.getLogger("bastion.reload")

# Keys bound to sockets and channels at start-up: a reload keeps the running values.
RESTART_ONLY = ("listen", "admin", "http_listen", "upstream", "limits", "shutdown", "reload",
                "tracing", "audit", "clients", "tls")


def _fingerprint(path: pathlib.Path) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_dev, st.st_mtime_ns, st.st_size, os.path.realpath(path))


class ConfigReloader:
    def __init__(self, path: pathlib.Path, state: SidecarState, metrics, on_reloaded=None):
        self.path = path
        self.on_reloaded = on_reloaded
        self.state = state
        self.metrics = metrics
        self._seen = _fingerprint(path)
        self._task: asyncio.Task | None = None
        self._lock = asyncio.Lock()

    def start(self, interval_s: float) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch(interval_s))

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    async def _watch(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            current = _fingerprint(self.path)
            if current is not None and current != self._seen:
                self._seen = current
                await self.reload("file changed")

    async def reload(self, why: str) -> bool:
        async with self._lock:
            started = time.perf_counter()
            try:
                # Parsing and building pipelines can take a while (models, rule sets): keep it
                # off the event loop so traffic is not stalled.
                new = await asyncio.to_thread(self._load)
                self.state.replace_snapshot(new)
            except ConfigError as err:
                log.error("config reload (%s) rejected, keeping the running config:\n%s", why, err)
                self.metrics.observe_reload(False)
                self.state.record_load("failure: " + str(err).splitlines()[0][:200])
                return False
            except Exception as err:  # noqa: BLE001 - a stage failing to build must not kill the sidecar
                log.exception("config reload (%s) failed, keeping the running config", why)
                self.metrics.observe_reload(False)
                self.state.record_load(f"failure: {type(err).__name__}")
                return False
            log.info("config reloaded (%s) in %.0f ms", why, (time.perf_counter() - started) * 1000)
            self.metrics.observe_reload(True)
        if self.on_reloaded is not None:
            await self.on_reloaded()
        return True

    def _load(self):
        config = load_config(self.path)
        running = self.state.current.config
        changed = [key for key in RESTART_ONLY if getattr(config, key) != getattr(running, key)]
        if changed:
            log.warning("config keys %s change only on restart; keeping the running values",
                        ", ".join(changed))
            config = config.model_copy(update={key: getattr(running, key) for key in RESTART_ONLY})
        return self.state.build(config)

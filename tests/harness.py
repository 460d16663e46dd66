"""Real processes for tests: the reference upstream, the sidecar, and helpers to wait on them.

Every process is started here and stopped by its PID (terminate, then kill after a grace period).
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import grpc

REPO = pathlib.Path(__file__).resolve().parent.parent


def fashion_mnist(split: str, count: int | None = None):
    """(images float32 [n, 1, 28, 28] in [0, 1], labels int64 [n]) from Debian's
    dataset-fashion-mnist (``split``: train | t10k), read by the demo model's training script."""
    import importlib.util
    path = REPO / "tools" / "training" / "train_fashion_mnist.py"
    spec = importlib.util.spec_from_file_location("train_fashion_mnist", path)
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    images, labels = train.load_split(split)
    return images[:count, None].astype("float32") / 255.0, labels[:count]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Proc:
    """A child process whose output is collected; ``wait_for`` matches a line of it."""

    def __init__(self, argv: list[str], env: dict | None = None, cwd: str | None = None):
        self.argv = argv
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.popen = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def _read(self) -> None:
        for line in self.popen.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def output(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 30.0) -> re.Match:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    match = regex.search(line)
                    if match:
                        return match
                seen = len(self.lines)
                if self.popen.poll() is not None and not self._reader.is_alive():
                    raise RuntimeError(f"{self.argv[:4]} exited with {self.popen.returncode} "
                                       f"before printing {pattern!r}:\n{self.output()[-3000:]}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{self.argv[:4]} did not print {pattern!r} within "
                                       f"{timeout}s:\n{self.output()[-3000:]}")
                self._cond.wait(min(left, 0.2))

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            os.kill(self.pid, sig)

    def stop(self, grace: float = 10.0) -> int:
        if self.popen.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.popen.wait(5)
        self._reader.join(5)
        return self.popen.returncode


def bastion(*args: str, env: dict | None = None, python: str | None = None,
            cwd: str | None = None) -> Proc:
    """``python -m bastion ARGS`` (python: this interpreter, or another environment's, e.g.
    a build of an older commit for an old-vs-new benchmark; run that one with a ``cwd``
    outside this checkout, or ``-m`` finds this checkout's ``bastion/`` first)."""
    return Proc([python or sys.executable, "-m", "bastion", *args], env=env, cwd=cwd)


class Upstream:
    def __init__(self, models: str | None = None, request_log: pathlib.Path | None = None,
                 port: int | None = None):
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.request_log = request_log
        args = ["upstream", "--listen", self.address]
        if models:
            args += ["--models", str(models)]
        if request_log:
            args += ["--request-log", str(request_log)]
        self.proc = bastion(*args)
        try:
            self.proc.wait_for(r"bastion upstream: serving", timeout=60)
        except BaseException:
            self.proc.stop()
            raise

    def requests_seen(self) -> int:
        if not self.request_log or not self.request_log.exists():
            return 0
        return len(self.request_log.read_text().splitlines())

    def stop(self) -> int:
        return self.proc.stop()


class Sidecar:
    def __init__(self, upstream: str, config: str | None = None, wait_ready: bool = True,
                 extra_args: tuple[str, ...] = (), env: dict | None = None,
                 python: str | None = None, cwd: str | None = None):
        self.port = free_port()
        self.admin_port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.admin = f"127.0.0.1:{self.admin_port}"
        args = ["serve", "--listen", self.address, "--admin", self.admin, "--upstream", upstream]
        self._config_dir = None
        if config is not None:
            self._config_dir = tempfile.TemporaryDirectory()
            path = pathlib.Path(self._config_dir.name) / "bastion.yaml"
            path.write_text(config)
            args += ["-c", str(path)]
        self.proc = bastion(*args, *extra_args, env=env, python=python, cwd=cwd)
        try:
            self.proc.wait_for(r"bastion: serving grpc=", timeout=30)
            if wait_ready:
                wait_health(self.address, serving=True)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> int:
        code = self.proc.stop()
        if self._config_dir is not None:
            self._config_dir.cleanup()
        return code


def wait_health(address: str, serving: bool = True, timeout: float = 20.0) -> None:
    """Wait until the sidecar's grpc.health.v1 reports (not) SERVING."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    want = (health_pb2.HealthCheckResponse.SERVING if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING)
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            with contextlib.suppress(grpc.RpcError):
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == want:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{address} health did not become {want}")
            time.sleep(0.1)

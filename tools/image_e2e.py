"""End to end through real processes: `bastion upstream` and `bastion serve` on 127.0.0.1,
called by tritonclient as an ordinary client would (one image per request, asking for
``logits`` only). Used by tools/eval_image_defense.py.

``Endpoint.classify`` answers, per image, the predicted class or -1 where the request was
refused; ``Endpoint.probabilities`` is the black-box attacker's view (softmax of the answered
logits; a refusal tells it nothing, see tools/image_blackbox.py).
"""
from __future__ import annotations

import concurrent.futures
import os
import pathlib
import sys
import tempfile

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.harness import bastion, free_port, wait_health  # noqa: E402

MODEL = "fashion-mnist"
REFUSED = -1
REFUSALS = ("PERMISSION_DENIED", "RESOURCE_EXHAUSTED")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Endpoint:
    """A tritonclient connection to ``address`` with a small pool of concurrent callers."""

    def __init__(self, address: str, workers: int = 4, model: str = MODEL):
        import tritonclient.grpc as grpcclient
        self._grpc = grpcclient
        self.address = address
        self.model = model
        self.clients = [grpcclient.InferenceServerClient(address) for _ in range(workers)]
        self.pool = concurrent.futures.ThreadPoolExecutor(workers)
        self.queries = 0

    def _one(self, worker: int, image: np.ndarray) -> np.ndarray | None:
        from tritonclient.utils import InferenceServerException
        grpc = self._grpc
        tensor = grpc.InferInput("image", [1, *image.shape], "FP32")
        tensor.set_data_from_numpy(image[None].astype(np.float32))
        try:
            result = self.clients[worker].infer(self.model, [tensor],
                                                outputs=[grpc.InferRequestedOutput("logits")])
        except InferenceServerException as err:
            # refused by a stage (PERMISSION_DENIED) or by the client's suspicion tier
            # (PERMISSION_DENIED when blocked, RESOURCE_EXHAUSTED when throttled)
            if any(code in str(err.status()) for code in REFUSALS):
                return None
            raise
        return result.as_numpy("logits")[0]

    def logits(self, images: np.ndarray) -> list[np.ndarray | None]:
        """Per image its logits, or None where the sidecar refused it."""
        workers = len(self.clients)
        self.queries += len(images)
        futures = [self.pool.submit(self._one, i % workers, image)
                   for i, image in enumerate(images)]
        return [f.result() for f in futures]

    def classify(self, images: np.ndarray) -> np.ndarray:
        return np.array([REFUSED if row is None else int(np.argmax(row))
                         for row in self.logits(images)], dtype=np.int64)

    def close(self) -> None:
        self.pool.shutdown()
        for client in self.clients:
            client.close()


class Upstream:
    """`bastion upstream` on a free port (long start timeout, as ``Sidecar``)."""

    def __init__(self, start_timeout: float = 300.0):
        self.address = f"127.0.0.1:{free_port()}"
        self.proc = bastion("upstream", "--listen", self.address)
        try:
            self.proc.wait_for(r"bastion upstream: serving", timeout=start_timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        self.proc.stop()


class Sidecar:
    """`bastion serve -c CONFIG` in front of ``upstream`` (like tests/harness.py's, with start
    timeouts long enough for a loaded machine: the evaluation runs at low priority)."""

    def __init__(self, upstream: str, config: str, start_timeout: float = 300.0):
        self._folder = tempfile.TemporaryDirectory()
        path = pathlib.Path(self._folder.name) / "bastion.yaml"
        path.write_text(config)
        self.address = f"127.0.0.1:{free_port()}"
        self.proc = bastion("serve", "--listen", self.address, "--admin",
                            f"127.0.0.1:{free_port()}", "--upstream", upstream, "-c", str(path))
        try:
            self.proc.wait_for(r"bastion: serving grpc=", timeout=start_timeout)
            wait_health(self.address, serving=True, timeout=start_timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        self.proc.stop()
        self._folder.cleanup()


class Deployment:
    """The reference upstream, and the sidecar with ``config`` (YAML text) in front of it."""

    def __init__(self, config: str | None):
        self.upstream = Upstream()
        self.sidecar = None
        try:
            if config is not None:
                self.sidecar = Sidecar(self.upstream.address, config)
        except BaseException:
            self.upstream.stop()
            raise
        self.address = self.sidecar.address if self.sidecar else self.upstream.address

    def pids(self) -> list[int]:
        return [p.proc.pid for p in (self.upstream, self.sidecar) if p is not None]

    def cpu(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.pids())

    def stop(self) -> None:
        if self.sidecar is not None:
            self.sidecar.stop()
        self.upstream.stop()

"""Live reload through a ConfigMap-style symlink swap under load, and graceful drain on SIGTERM."""
from __future__ import annotations

import os
import pathlib
import re
import signal
import threading
import time
import urllib.error
import urllib.request

import onnx
import pytest
import tritonclient.grpc as tc

from tests.harness import Upstream, bastion, free_port, wait_health
from tests.test_policy_integration import ATTACK, BENIGN, echo_model, inputs

CONFIG = """
reload: {{watch_interval_s: 0.2}}
shutdown: {{drain_delay_s: {delay}, grace_s: 10}}
models:
  echo:
    mode: enforce
    pipeline:
      - detect.signatures: {{inputs: [prompt], threshold: {threshold}}}
  echo-slow:
    pipeline:
      - debug.fault: {{delay_ms: 1500}}
"""


class ConfigMapDir:
    """Mimics a Kubernetes ConfigMap volume: bastion.yaml -> ..data/bastion.yaml, and ..data
    is a symlink to a timestamped folder that an update replaces atomically."""

    def __init__(self, root: pathlib.Path, text: str):
        self.root = root
        self.version = 0
        self._write(text)
        (root / "bastion.yaml").symlink_to("..data/bastion.yaml")

    @property
    def path(self) -> pathlib.Path:
        return self.root / "bastion.yaml"

    def _write(self, text: str) -> None:
        self.version += 1
        folder = self.root / f"..2026_11_21_{self.version:04d}"
        folder.mkdir()
        (folder / "bastion.yaml").write_text(text)
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(folder.name)
        os.replace(tmp, self.root / "..data")  # the atomic swap kubelet does

    def update(self, text: str) -> None:
        self._write(text)


def metric(admin: str, name: str, labels: str = "") -> float:
    text = urllib.request.urlopen(f"http://{admin}/metrics", timeout=5).read().decode()
    match = re.search(rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+-]+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def ready(admin: str) -> bool:
    try:
        return urllib.request.urlopen(f"http://{admin}/readyz", timeout=2).status == 200
    except urllib.error.HTTPError:
        return False


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    for name in ("echo", "echo-slow"):
        (root / name).mkdir()
        onnx.save(echo_model(), root / name / "model.onnx")
    server = Upstream(models=str(root))
    yield server
    assert server.stop() == 0


def start_sidecar(upstream, config_path):
    port, admin_port = free_port(), free_port()
    proc = bastion("serve", "-c", str(config_path), "--listen", f"127.0.0.1:{port}",
                   "--admin", f"127.0.0.1:{admin_port}", "--upstream", upstream.address)
    try:
        proc.wait_for("bastion: serving", timeout=30)
        wait_health(f"127.0.0.1:{port}")
    except BaseException:
        proc.stop()
        raise
    return proc, f"127.0.0.1:{port}", f"127.0.0.1:{admin_port}"


def test_reload_under_load_via_configmap_swap(upstream, tmp_path):
    configmap = ConfigMapDir(tmp_path, CONFIG.format(delay=0, threshold=100))
    proc, address, admin = start_sidecar(upstream, configmap.path)
    failures, successes = [], [0]
    stop = threading.Event()

    def load():
        client = tc.InferenceServerClient(address)
        while not stop.is_set():
            try:
                client.infer("echo", inputs(BENIGN))
                successes[0] += 1
            except Exception as err:  # noqa: BLE001 - every failure is collected and reported
                failures.append(str(err))
        client.close()

    workers = [threading.Thread(target=load) for _ in range(4)]
    for worker in workers:
        worker.start()
    try:
        client = tc.InferenceServerClient(address)
        client.infer("echo", inputs(ATTACK))  # threshold 100: allowed
        configmap.update(CONFIG.format(delay=0, threshold=1))
        swapped = time.monotonic()
        while True:
            try:
                client.infer("echo", inputs(ATTACK))
            except tc.InferenceServerException as err:
                assert "blocked by detect.signatures" in err.message()
                break
            assert time.monotonic() - swapped < 2.0, "new threshold not in effect within 2 s"
            time.sleep(0.05)
        assert metric(admin, "bastion_config_reloads_total", '{result="success"}') == 1

        configmap.update("models: {echo: {mode: sometimes}}\n")  # invalid
        deadline = time.monotonic() + 5
        while metric(admin, "bastion_config_reloads_total", '{result="failure"}') < 1:
            assert time.monotonic() < deadline, "invalid config was not noticed"
            time.sleep(0.1)
        assert ready(admin)
        with pytest.raises(tc.InferenceServerException):  # old config still serving
            client.infer("echo", inputs(ATTACK))
        client.close()
        time.sleep(0.5)
    finally:
        stop.set()
        for worker in workers:
            worker.join(10)
        code = proc.stop()
    assert failures == []
    assert successes[0] > 20
    assert code == 0
    assert "config reload (file changed) rejected" in proc.output()
    assert "models.echo.mode" in proc.output()


def test_sighup_reloads(upstream, tmp_path):
    path = tmp_path / "bastion.yaml"
    path.write_text(CONFIG.format(delay=0, threshold=100).replace("0.2", "60"))
    proc, address, admin = start_sidecar(upstream, path)
    try:
        path.write_text(CONFIG.format(delay=0, threshold=1).replace("0.2", "60"))
        proc.signal(signal.SIGHUP)
        proc.wait_for(r"config reloaded \(SIGHUP\)", timeout=5)
        with pytest.raises(tc.InferenceServerException):
            tc.InferenceServerClient(address).infer("echo", inputs(ATTACK))
    finally:
        assert proc.stop() == 0


def test_sigterm_drains_in_flight_requests(upstream, tmp_path):
    path = tmp_path / "bastion.yaml"
    path.write_text(CONFIG.format(delay=0.5, threshold=100))
    proc, address, admin = start_sidecar(upstream, path)
    results: list = []

    def slow_call():
        client = tc.InferenceServerClient(address)
        try:
            client.infer("echo-slow", inputs(BENIGN), client_timeout=20)
            results.append("ok")
        except Exception as err:  # noqa: BLE001
            results.append(f"error: {err}")
        client.close()

    threads = [threading.Thread(target=slow_call) for _ in range(8)]
    for thread in threads:
        thread.start()
    time.sleep(0.4)  # all eight are in flight (each takes 1.5 s)
    proc.signal(signal.SIGTERM)
    time.sleep(0.2)
    assert not ready(admin), "readiness must turn false first"
    for thread in threads:
        thread.join(20)
    assert results == ["ok"] * 8
    assert proc.popen.wait(20) == 0

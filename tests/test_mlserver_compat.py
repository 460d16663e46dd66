"""An upstream we did not write: Seldon MLServer behind the sidecar, called by unmodified tritonclient.

MLServer 1.7.1 (with its scikit-learn runtime) lives in its own virtualenv, made by
``scripts/setup-mlserver.sh`` (default ``<repo>/.venvs/mlserver``, or ``$BASTION_MLSERVER_VENV``),
because its pins clash with Bastion's. The model is trained and pickled with that venv's python so
the pickle matches the scikit-learn that loads it, and the expected predictions come from there too.

Every call is made twice, straight to MLServer and through ``bastion serve`` (pass-through, no
config), and the two answers must be the same.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import tempfile
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.harness import REPO, Proc, Sidecar, free_port

MODEL = "iris"
VENV = pathlib.Path(os.environ.get("BASTION_MLSERVER_VENV") or REPO / ".venvs" / "mlserver")
STARTUP_TIMEOUT = 90.0

# Runs inside the MLServer venv: train, pickle with joblib, and write the batch and what
# scikit-learn predicts for it (JSON: floats round-trip exactly).
TRAIN = r"""
import json, sys
import joblib
import numpy as np
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

out = sys.argv[1]
X, y = load_iris(return_X_y=True)
model = LogisticRegression(max_iter=1000).fit(X, y)
joblib.dump(model, f"{out}/model.joblib")
batch = X[::7]  # 22 rows from all three classes
json.dump({"batch": batch.tolist(),
           "predict": model.predict(batch).tolist(),
           "predict32": model.predict(batch.astype(np.float32)).tolist()},
          open(f"{out}/expected.json", "w"))
"""


def _venv_bin(name: str) -> pathlib.Path:
    path = VENV / "bin" / name
    if not path.exists():
        pytest.fail(f"MLServer virtualenv not found: {path} is missing. "
                    f"Run scripts/setup-mlserver.sh (or point BASTION_MLSERVER_VENV at one).",
                    pytrace=False)
    return path


def _wait_ready(proc: Proc, address: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    client = grpcclient.InferenceServerClient(address)
    try:
        while True:
            if proc.popen.poll() is not None:
                raise RuntimeError(f"mlserver exited with {proc.popen.returncode}:\n"
                                   f"{proc.output()[-3000:]}")
            try:
                if client.is_server_ready(client_timeout=2) and client.is_model_ready(MODEL,
                                                                                     client_timeout=2):
                    return
            except InferenceServerException:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"mlserver at {address} not ready within {timeout}s:\n"
                                   f"{proc.output()[-3000:]}")
            time.sleep(0.25)
    finally:
        client.close()


@pytest.fixture(scope="module")
def mlserver():
    python = _venv_bin("python")
    mlserver_bin = _venv_bin("mlserver")
    with tempfile.TemporaryDirectory(prefix="bastion-mlserver-") as tmp:
        root = pathlib.Path(tmp)
        subprocess.run([str(python), "-c", TRAIN, str(root)], check=True, timeout=120)
        expected = json.loads((root / "expected.json").read_text())
        (root / "model-settings.json").write_text(json.dumps({
            "name": MODEL,
            "implementation": "mlserver_sklearn.SKLearnModel",
            "parameters": {"uri": str(root / "model.joblib"), "version": "v1"},
        }))
        grpc_port, http_port = free_port(), free_port()
        (root / "settings.json").write_text(json.dumps({
            "host": "127.0.0.1",
            "grpc_port": grpc_port,
            "http_port": http_port,
            "metrics_port": free_port(),
            "metrics_endpoint": None,   # no metrics server
            "parallel_workers": 0,      # models in the main process: one PID to stop
            "debug": False,
        }))
        address = f"127.0.0.1:{grpc_port}"
        proc = Proc([str(mlserver_bin), "start", str(root)], cwd=str(root))
        try:
            _wait_ready(proc, address, STARTUP_TIMEOUT)
            yield {"address": address, "http": f"127.0.0.1:{http_port}", "expected": expected,
                   "proc": proc}
        finally:
            proc.stop()


@pytest.fixture(scope="module")
def sidecar(mlserver):
    """Pass-through (no models configured) on both fronts; MLServer's own REST port is the
    REST front's http_target for the routes it does not inspect."""
    http_port = free_port()
    proc = Sidecar(upstream=mlserver["address"],
                   config=f'upstream: {{http_target: "http://{mlserver["http"]}"}}\n',
                   extra_args=("--http-listen", f"127.0.0.1:{http_port}"))
    proc.http = f"127.0.0.1:{http_port}"
    yield proc
    assert proc.stop() == 0


@pytest.fixture(scope="module")
def clients(mlserver, sidecar):
    direct = grpcclient.InferenceServerClient(mlserver["address"])
    proxied = grpcclient.InferenceServerClient(sidecar.address)
    yield direct, proxied
    direct.close()
    proxied.close()


def both(clients, call):
    """Apply ``call`` to the direct and the proxied client; return both results."""
    return tuple(call(client) for client in clients)


@pytest.mark.parametrize("probe", ["is_server_live", "is_server_ready"])
def test_server_health_same(clients, probe):
    direct, proxied = both(clients, lambda c: getattr(c, probe)(client_timeout=10))
    assert direct is True
    assert proxied == direct


def test_model_ready_same(clients):
    direct, proxied = both(clients, lambda c: c.is_model_ready(MODEL, client_timeout=10))
    assert direct is True
    assert proxied == direct


def test_server_metadata_same(clients):
    direct, proxied = both(clients, lambda c: c.get_server_metadata(client_timeout=10))
    assert direct.name == "mlserver"
    assert proxied == direct


def test_model_metadata_same(clients):
    direct, proxied = both(clients, lambda c: c.get_model_metadata(MODEL, client_timeout=10))
    assert direct.name == MODEL
    assert proxied == direct


def _infer(client, batch: np.ndarray, datatype: str, request_id: str):
    inp = grpcclient.InferInput("input-0", list(batch.shape), datatype)
    inp.set_data_from_numpy(batch)
    return client.infer(MODEL, [inp], request_id=request_id, client_timeout=30)


@pytest.mark.parametrize("datatype", ["FP64", "FP32"])
def test_infer_same_and_matches_sklearn(clients, mlserver, datatype):
    expected = mlserver["expected"]
    batch = np.asarray(expected["batch"], dtype=np.float64 if datatype == "FP64" else np.float32)
    want = np.asarray(expected["predict"] if datatype == "FP64" else expected["predict32"])
    direct, proxied = both(clients, lambda c: _infer(c, batch, datatype, f"req-{datatype}"))

    d, p = direct.get_response(), proxied.get_response()
    assert d.model_name == p.model_name == MODEL
    assert p.model_version == d.model_version
    assert p.id == d.id == f"req-{datatype}"
    assert [o.name for o in p.outputs] == [o.name for o in d.outputs] and d.outputs
    for d_out, p_out in zip(d.outputs, p.outputs):
        assert p_out.datatype == d_out.datatype
        assert list(p_out.shape) == list(d_out.shape)
        assert p_out.parameters == d_out.parameters
        d_arr, p_arr = direct.as_numpy(d_out.name), proxied.as_numpy(p_out.name)
        assert d_arr.dtype == p_arr.dtype
        assert np.array_equal(d_arr, p_arr), d_out.name
    assert p.parameters == d.parameters
    # The sklearn runtime's default output is `predict`, one label per row.
    assert np.array_equal(direct.as_numpy("predict").reshape(-1), want)
    # Whole reply, byte for byte.
    assert p.SerializeToString(deterministic=True) == d.SerializeToString(deterministic=True)


def test_unknown_model_error_same(clients, mlserver):
    batch = np.asarray(mlserver["expected"]["batch"][:2], dtype=np.float64)

    def call(client):
        inp = grpcclient.InferInput("input-0", list(batch.shape), "FP64")
        inp.set_data_from_numpy(batch)
        with pytest.raises(InferenceServerException) as info:
            client.infer("no-such-model", [inp], client_timeout=30)
        return info.value.status(), info.value.message()

    direct, proxied = both(clients, call)
    assert direct[0] == "StatusCode.NOT_FOUND", direct
    assert "no-such-model" in direct[1]
    assert proxied == direct


# ---- the REST front against MLServer's own REST port ---------------------------------------------

@pytest.fixture(scope="module")
def rest_clients(mlserver, sidecar):
    import tritonclient.http as httpclient
    direct = httpclient.InferenceServerClient(mlserver["http"])
    proxied = httpclient.InferenceServerClient(sidecar.http)
    yield direct, proxied
    direct.close()
    proxied.close()


def _rest_infer(client, batch: np.ndarray, binary: bool):
    import tritonclient.http as httpclient
    inp = httpclient.InferInput("input-0", list(batch.shape), "FP64")
    inp.set_data_from_numpy(batch, binary_data=binary)
    return client.infer(MODEL, [inp], request_id="rest-1", outputs=[
        httpclient.InferRequestedOutput("predict", binary_data=binary)])


def test_rest_infer_same_as_mlserver_rest(rest_clients, mlserver):
    """tritonclient.http (JSON tensors) straight to MLServer's REST port and through Bastion's
    REST front (which forwards over gRPC): the same outputs, and sklearn's predictions."""
    expected = mlserver["expected"]
    batch = np.asarray(expected["batch"], dtype=np.float64)
    direct, proxied = both(rest_clients, lambda c: _rest_infer(c, batch, binary=False))
    assert np.array_equal(direct.as_numpy("predict").reshape(-1), expected["predict"])
    assert np.array_equal(proxied.as_numpy("predict"), direct.as_numpy("predict"))
    d, p = direct.get_response(), proxied.get_response()
    assert p["model_name"] == d["model_name"] == MODEL and p["id"] == d["id"] == "rest-1"
    assert p["outputs"][0]["datatype"] == d["outputs"][0]["datatype"]
    assert p["outputs"][0]["shape"] == d["outputs"][0]["shape"]


def test_rest_binary_data_through_the_front_to_mlserver(rest_clients, mlserver):
    """Triton's binary tensor data extension, which MLServer's own REST port does not speak
    (it answers 422), works through the front: the tensors travel to MLServer over gRPC."""
    expected = mlserver["expected"]
    batch = np.asarray(expected["batch"], dtype=np.float64)
    answer = _rest_infer(rest_clients[1], batch, binary=True)
    assert np.array_equal(answer.as_numpy("predict").reshape(-1), expected["predict"])
    assert answer.get_response()["outputs"][0]["parameters"]["binary_data_size"] > 0


def test_rest_metadata_and_health_same_as_mlserver_rest(rest_clients):
    direct, proxied = both(rest_clients, lambda c: (
        c.is_server_live(), c.is_server_ready(), c.is_model_ready(MODEL),
        c.get_model_metadata(MODEL)["name"], c.get_server_metadata()["name"]))
    assert direct == (True, True, True, MODEL, "mlserver")
    assert proxied == direct


def test_rest_routes_not_inspected_reach_mlserver_rest(mlserver, sidecar):
    """MLServer's model repository extension (not an OIP route Bastion inspects) through the
    front's http_target: the same answer as calling MLServer's REST port."""
    import urllib.request

    def post(address):
        request = urllib.request.Request(f"http://{address}/v2/repository/index", data=b"{}",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.loads(reply.read())

    direct, proxied = post(mlserver["http"]), post(sidecar.http)
    assert direct[0] == 200 and any(m["name"] == MODEL for m in direct[1])
    assert proxied == direct

"""Kubernetes manifests (deploy/k8s) and the GPU image (Dockerfile.gpu), checked without a cluster.

Every overlay is rendered (with `kubectl kustomize` where kubectl is installed, else with
deploy/k8s/render.py) and every object is validated: built-in kinds against the Kubernetes JSON
schemas that the `kubernetes-validate` package ships (strict: unknown fields are errors), the
PodMonitor custom resource structurally here. Then the deployment's promises are checked: the model
server is reachable only through the sidecar, config updates arrive as a symlink swap, draining
fits in the termination grace period, and the pod runs unprivileged.
"""
from __future__ import annotations

import functools
import re
import shutil
import subprocess
import sys
import tomllib

import pytest
import yaml

from bastion.config import parse_config
from tests.harness import REPO

try:
    import kubernetes_validate
except ImportError:  # reported by the validation test as a failure, never skipped
    kubernetes_validate = None

K8S = REPO / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu", "mlserver")
# Schemas validated against: the oldest Kubernetes the manifests target (gRPC probes are GA from
# 1.27) and the newest schema set the pinned kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
EXPECTED_KINDS = {"ConfigMap", "Secret", "Deployment", "Service", "NetworkPolicy", "PodMonitor"}
SIDECAR, MODEL_SERVER = "bastion", "model-server"
HTTP_PORT, GRPC_PORT, ADMIN_PORT = 8000, 8001, 8002
LOOPBACK = "127.0.0.1"


# --- rendering -----------------------------------------------------------------------------------

def _kubectl() -> str | None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return None
    probe = subprocess.run([kubectl, "kustomize", "--help"], capture_output=True, timeout=60)
    return kubectl if probe.returncode == 0 else None


def _render_kubectl(kubectl: str, overlay: str) -> list[dict]:
    out = subprocess.run([kubectl, "kustomize", str(K8S / "overlays" / overlay)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"kubectl kustomize {overlay} failed:\n{out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d is not None]


def _render_py(overlay: str) -> list[dict]:
    out = subprocess.run([sys.executable, str(K8S / "render.py"), str(K8S / "overlays" / overlay)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"render.py {overlay} failed:\n{out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d is not None]


@functools.cache
def rendered(overlay: str) -> list[dict]:
    kubectl = _kubectl()
    return _render_kubectl(kubectl, overlay) if kubectl else _render_py(overlay)


def one(overlay: str, kind: str) -> dict:
    found = [d for d in rendered(overlay) if d["kind"] == kind]
    assert len(found) == 1, f"{overlay}: expected one {kind}, got {len(found)}"
    return found[0]


def pod_spec(overlay: str) -> dict:
    return one(overlay, "Deployment")["spec"]["template"]["spec"]


def container(overlay: str, name: str) -> dict:
    found = [c for c in pod_spec(overlay)["containers"] if c["name"] == name]
    assert len(found) == 1, f"{overlay}: expected one container {name!r}"
    return found[0]


def bastion_config(overlay: str):
    data = one(overlay, "ConfigMap")["data"]
    # parse_config is the sidecar's own validation: the embedded config must load as is.
    return parse_config(yaml.safe_load(data["bastion.yaml"]), f"{overlay} ConfigMap bastion.yaml")


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


def host_of(address: str) -> str:
    return address.rpartition(":")[0]


def named_port(overlay: str, container_name: str, port: int | str) -> int:
    if isinstance(port, int):
        return port
    ports = {p["name"]: p["containerPort"] for p in container(overlay, container_name)["ports"]
             if "name" in p}
    assert port in ports, f"{overlay}: {container_name} has no port named {port!r}"
    return ports[port]


def pod_labels(overlay: str) -> dict:
    return one(overlay, "Deployment")["spec"]["template"]["metadata"]["labels"]


def quantity(value) -> float:
    value = str(value)
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
             "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    for suffix in sorted(units, key=len, reverse=True):
        if value.endswith(suffix):
            return float(value[:-len(suffix)]) * units[suffix]
    return float(value)


def sleep_seconds(handler: dict) -> int:
    """Seconds a preStop hook waits: `sleep: {seconds}` or `exec: [sleep, N]`."""
    if "sleep" in handler:
        return int(handler["sleep"]["seconds"])
    command = handler["exec"]["command"]
    match = re.fullmatch(r"(?:/bin/|/usr/bin/)?sleep (\d+)", " ".join(command))
    assert match, f"preStop is not a plain sleep: {command}"
    return int(match.group(1))


# --- rendering and schema validation -------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_the_expected_objects(overlay):
    docs = rendered(overlay)
    assert {d["kind"] for d in docs} == EXPECTED_KINDS
    assert len(docs) == len(EXPECTED_KINDS)
    for doc in docs:
        assert doc["metadata"].get("namespace") == "bastion", doc["kind"]
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "bastion"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates(overlay, version):
    if kubernetes_validate is None:
        pytest.fail("kubernetes-validate is not installed: pip install kubernetes-validate==1.37.0")
    checked, errors = set(), []
    for doc in rendered(overlay):
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            check_podmonitor(overlay, doc)  # custom resource: not in the schema set
        else:
            # strict: fields the schema does not know are errors. A kind the schema set lacks
            # raises SchemaNotFoundError, which fails the test rather than skipping the object.
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as err:
                errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {err.message} at "
                              f"{'.'.join(str(p) for p in err.path) or '(top level)'}")
        checked.add(doc["kind"])
    assert not errors, f"{overlay} against Kubernetes {version}:\n" + "\n".join(errors)
    assert checked == EXPECTED_KINDS  # nothing left unvalidated


PODMONITOR_SPEC_KEYS = {"selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel",
                        "podTargetLabels", "sampleLimit", "targetLimit"}
PODMONITOR_ENDPOINT_KEYS = {"port", "portNumber", "path", "interval", "scrapeTimeout", "scheme",
                            "honorLabels", "honorTimestamps", "relabelings", "metricRelabelings",
                            "params", "enableHttp2", "followRedirects"}
DURATION = re.compile(r"^(\d+(ms|s|m|h))+$")


def check_podmonitor(overlay: str, doc: dict) -> None:
    """monitoring.coreos.com/v1 PodMonitor, by hand: its CRD schema is not in kubernetes-validate."""
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    assert doc["kind"] == "PodMonitor"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
    spec = doc["spec"]
    assert set(spec) <= PODMONITOR_SPEC_KEYS, set(spec) - PODMONITOR_SPEC_KEYS
    match_labels = spec["selector"]["matchLabels"]
    assert match_labels and match_labels.items() <= pod_labels(overlay).items()
    endpoints = spec["podMetricsEndpoints"]
    assert len(endpoints) == 1
    endpoint = endpoints[0]
    assert set(endpoint) <= PODMONITOR_ENDPOINT_KEYS, set(endpoint) - PODMONITOR_ENDPOINT_KEYS
    assert named_port(overlay, SIDECAR, endpoint["port"]) == ADMIN_PORT
    assert endpoint["path"] == "/metrics"
    for key in ("interval", "scrapeTimeout"):
        if key in endpoint:
            assert DURATION.match(endpoint[key]), f"{key}: {endpoint[key]!r}"


def test_render_py_matches_kubectl_kustomize():
    kubectl = _kubectl()
    if kubectl is None:
        pytest.skip("kubectl is not installed; render.py alone rendered the overlays")
    for overlay in OVERLAYS:
        ident = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
        reference = {ident(d): d for d in _render_kubectl(kubectl, overlay)}
        ours = {ident(d): d for d in _render_py(overlay)}
        assert ours == reference, f"render.py and kubectl kustomize disagree on {overlay}"


def test_render_py_refuses_what_it_does_not_implement(tmp_path):
    (tmp_path / "cm.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    (tmp_path / "kustomization.yaml").write_text("resources: [cm.yaml]\ncommonLabels: {a: b}\n")
    out = subprocess.run([sys.executable, str(K8S / "render.py"), str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "commonLabels" in out.stderr


# --- the model server is reachable only through the sidecar --------------------------------------

def model_server_endpoints(overlay: str) -> dict[str, tuple[str, int]]:
    """{protocol: (host, port)} the model server listens on, read from its args or env."""
    server = container(overlay, MODEL_SERVER)
    if "tritonserver" in server["image"]:
        args = dict(a[2:].split("=", 1) for a in server["args"] if a.startswith("--") and "=" in a)
        assert "tritonserver" in server["args"][:1] + server.get("command", [])[:1]
        for flag in ("allow-sagemaker", "allow-vertex-ai"):
            assert args.get(flag, "false") == "false"  # their listeners would bind 0.0.0.0
        return {p: (args[f"{p}-address"], int(args[f"{p}-port"])) for p in ("grpc", "http", "metrics")}
    if "mlserver" in server["image"]:
        env = {e["name"]: e.get("value") for e in server["env"]}
        host = env["MLSERVER_HOST"]  # MLServer binds HTTP, gRPC and metrics to this one host
        return {p: (host, int(env[f"MLSERVER_{p.upper()}_PORT"])) for p in ("grpc", "http", "metrics")}
    raise AssertionError(f"{overlay}: unknown model server image {server['image']}")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_model_server_listens_on_loopback_only(overlay):
    endpoints = model_server_endpoints(overlay)
    for protocol, (host, port) in endpoints.items():
        assert host == LOOPBACK, f"{overlay}: model server {protocol} binds {host}"
        assert port not in (HTTP_PORT, GRPC_PORT, ADMIN_PORT), \
            f"{overlay}: {protocol} port {port} collides"
    assert "ports" not in container(overlay, MODEL_SERVER)
    spec = pod_spec(overlay)
    assert not spec.get("hostNetwork")
    for c in spec["containers"]:
        assert all("hostPort" not in p for p in c.get("ports", [])), c["name"]
        if c["name"] != SIDECAR:
            assert not c.get("ports"), f"{c['name']} publishes ports"
    # The sidecar forwards to exactly that gRPC endpoint, and the REST routes it does not
    # inspect to that REST endpoint.
    assert bastion_config(overlay).upstream.target == "%s:%d" % endpoints["grpc"]
    assert bastion_config(overlay).upstream.http_target == "http://%s:%d" % endpoints["http"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_targets_the_sidecar_serving_ports_only(overlay):
    service = one(overlay, "Service")
    ports = {p["port"]: named_port(overlay, SIDECAR, p["targetPort"])
             for p in service["spec"]["ports"]}
    assert ports == {GRPC_PORT: GRPC_PORT, HTTP_PORT: HTTP_PORT}  # never the admin port
    assert service["spec"]["selector"].items() <= pod_labels(overlay).items()
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_networkpolicy_admits_only_the_sidecar_ports(overlay):
    policy = one(overlay, "NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels(overlay).items()
    assert "Ingress" in policy["policyTypes"]
    admitted = {}
    for rule in policy["ingress"]:
        assert rule.get("ports"), "a rule without ports admits every port"
        for port in rule["ports"]:
            assert port.get("protocol", "TCP") == "TCP" and "endPort" not in port
            admitted[named_port(overlay, SIDECAR, port["port"])] = rule.get("from")
    assert set(admitted) == {HTTP_PORT, GRPC_PORT, ADMIN_PORT}
    # The admin port only from the monitoring namespace.
    assert admitted[ADMIN_PORT] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]


# --- config: a directory mount, valid, consistent with the pod ------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_config_is_mounted_as_a_directory(overlay):
    sidecar = container(overlay, SIDECAR)
    configmap = one(overlay, "ConfigMap")
    volumes = {v["name"]: v for v in pod_spec(overlay)["volumes"]}
    mounts = [m for m in sidecar["volumeMounts"]
              if volumes[m["name"]].get("configMap", {}).get("name") == configmap["metadata"]["name"]]
    assert len(mounts) == 1
    mount = mounts[0]
    # subPath mounts never see ConfigMap updates: the file would be frozen at pod start.
    assert "subPath" not in mount and "subPathExpr" not in mount
    assert "items" not in volumes[mount["name"]]["configMap"]
    args = sidecar["args"]
    config_path = args[args.index("-c") + 1]
    assert config_path == f"{mount['mountPath']}/bastion.yaml"
    assert "bastion.yaml" in configmap["data"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_embedded_config_is_valid_and_matches_the_pod(overlay):
    config = bastion_config(overlay)
    sidecar = container(overlay, SIDECAR)
    assert port_of(config.listen) == named_port(overlay, SIDECAR, "grpc") == GRPC_PORT
    assert port_of(config.http_listen) == named_port(overlay, SIDECAR, "http") == HTTP_PORT
    assert port_of(config.admin) == named_port(overlay, SIDECAR, "admin") == ADMIN_PORT
    # The kubelet probes and Prometheus scrape the pod IP, so admin must not be loopback-only.
    assert host_of(config.admin) in ("0.0.0.0", "[::]")
    assert sidecar["readinessProbe"]["grpc"]["port"] == GRPC_PORT
    for probe in ("livenessProbe", "startupProbe"):
        get = sidecar[probe]["httpGet"]
        assert get["path"] == "/healthz" and named_port(overlay, SIDECAR, get["port"]) == ADMIN_PORT


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_termination_grace_covers_the_drain(overlay):
    shutdown = bastion_config(overlay).shutdown
    drain = shutdown.drain_delay_s + shutdown.grace_s
    spec = pod_spec(overlay)
    grace_period = spec["terminationGracePeriodSeconds"]
    assert grace_period >= drain + 2      # the sidecar exits within drain + grace + 2 s
    # The sidecar drains on SIGTERM by itself; the model server must outlive that drain.
    assert "lifecycle" not in container(overlay, SIDECAR)
    server = container(overlay, MODEL_SERVER)
    server_sleep = sleep_seconds(server["lifecycle"]["preStop"])
    assert server_sleep >= drain
    exit_timeout = next((int(a.split("=", 1)[1]) for a in server.get("args", [])
                         if a.startswith("--exit-timeout-secs=")), 0)
    assert grace_period > server_sleep + exit_timeout


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_client_key_secret_reaches_the_sidecar(overlay):
    """Header identities hash with one key on every replica (shared Redis limits need it)."""
    secret = one(overlay, "Secret")
    env = {e["name"]: e for e in container(overlay, SIDECAR)["env"]}
    ref = env["BASTION_CLIENT_KEY_SECRET"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
    assert bastion_config(overlay).clients.key_secret_env == "BASTION_CLIENT_KEY_SECRET"


# --- unprivileged pod, probes, scraping, resources -----------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_runs_unprivileged(overlay):
    spec = pod_spec(overlay)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert spec.get("automountServiceAccountToken") is False
    sidecar = container(overlay, SIDECAR)["securityContext"]
    assert sidecar["runAsUser"] == 10001 and sidecar["runAsNonRoot"] is True
    assert sidecar["readOnlyRootFilesystem"] is True
    for c in spec["containers"]:
        ctx = c["securityContext"]
        assert ctx["capabilities"]["drop"] == ["ALL"] and "add" not in ctx["capabilities"]
        assert ctx["allowPrivilegeEscalation"] is False and not ctx.get("privileged")
        assert ctx.get("runAsUser", 0) != 0


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_prometheus_can_scrape_the_admin_port(overlay):
    annotations = one(overlay, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(ADMIN_PORT)
    assert annotations["prometheus.io/path"] == "/metrics"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_sidecar_has_requests_and_limits(overlay):
    resources = container(overlay, SIDECAR)["resources"]
    for resource in ("cpu", "memory"):
        assert quantity(resources["requests"][resource]) <= quantity(resources["limits"][resource])


# --- overlays --------------------------------------------------------------------------------------

def test_gpu_overlay_puts_the_model_server_on_a_gpu():
    server = container("gpu", MODEL_SERVER)
    assert str(server["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    sidecar = container("gpu", SIDECAR)
    assert sidecar["image"].endswith("-gpu")
    env = {e["name"]: e.get("value") for e in sidecar["env"]}
    assert env["BASTION_ONNX_PROVIDERS"] == "CUDAExecutionProvider,CPUExecutionProvider"
    for overlay in ("cpu", "mlserver"):
        assert "nvidia.com/gpu" not in container(overlay, MODEL_SERVER)["resources"].get("limits", {})
        assert container(overlay, SIDECAR)["image"].endswith("-cpu")


def test_model_server_images_are_pinned():
    assert re.fullmatch(r"nvcr\.io/nvidia/tritonserver:\d\d\.\d\d-py3",
                        container("cpu", MODEL_SERVER)["image"])
    assert container("gpu", MODEL_SERVER)["image"] == container("cpu", MODEL_SERVER)["image"]
    mlserver = container("mlserver", MODEL_SERVER)
    assert mlserver["image"] == "seldonio/mlserver:1.7.1"
    assert "args" not in mlserver  # replaced whole: nothing of Triton's command line is left


def test_deployment_runs_the_images_default_command():
    cmd = re.search(r"^CMD (\[.*\])$", (REPO / "Dockerfile").read_text(), re.M)
    for overlay in OVERLAYS:
        assert container(overlay, SIDECAR)["args"] == yaml.safe_load(cmd.group(1))


# --- Dockerfile.gpu ---------------------------------------------------------------------------------

def _package_folders() -> set[str]:
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    return set(setuptools["package-dir"].values())


def test_gpu_dockerfile_installs_with_the_ci_script():
    dockerfile = (REPO / "Dockerfile.gpu").read_text()
    base = re.search(r"^FROM (\S+)", dockerfile, re.M).group(1)
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.\d+\.\d+-cudnn-runtime-ubuntu22\.04", base)
    assert match, base
    assert re.search(r"^RUN .*scripts/install\.sh --gpu", dockerfile, re.M | re.S)
    assert "--gpu)" in (REPO / "scripts" / "install.sh").read_text()
    assert "python3.11" in dockerfile
    if match.group(1) == "12":
        # onnxruntime-gpu 1.27+ on PyPI links CUDA 13 libraries; a CUDA 12 image must stay below.
        assert "onnxruntime-gpu<1.27" in dockerfile
    # Every folder the wheel is built from, plus what the build and install step read.
    for folder in sorted(_package_folders() | {"scripts"}):
        assert f"COPY {folder} ./{folder}" in dockerfile, folder
    assert re.search(r"^COPY pyproject\.toml README\.md \./$", dockerfile, re.M)


def test_gpu_dockerfile_runs_like_the_cpu_one():
    gpu = (REPO / "Dockerfile.gpu").read_text()
    cpu = (REPO / "Dockerfile").read_text()
    assert re.search(r"^USER 10001$", gpu, re.M)
    assert re.search(r"useradd .*--uid 10001", gpu)
    assert re.search(r"^EXPOSE 8000 8001 8002$", gpu, re.M)
    for directive in ("HEALTHCHECK", "ENTRYPOINT", "CMD"):
        pattern = rf"^{directive} .*(?:\\\n.*)*"
        assert re.search(pattern, gpu, re.M).group(0) == re.search(pattern, cpu, re.M).group(0)
    assert "/healthz" in re.search(r"^HEALTHCHECK .*\n.*", gpu, re.M).group(0)

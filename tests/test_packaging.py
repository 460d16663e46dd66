"""Packaging promises: one `bastion` namespace, no torch at runtime, image installs like CI."""
from __future__ import annotations

import re
import subprocess
import sys
import zipfile

from tests.harness import REPO


def test_wheel_installs_only_the_bastion_namespace(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), str(REPO)], check=True, timeout=300)
    wheel = next(tmp_path.glob("*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"bastion"}
    for package in ("proxy", "detectors", "transforms", "protos", "upstream"):
        assert f"bastion/{package}/__init__.py" in names
    for shipped in ("bastion/demo_models/fashion-mnist/model.onnx",
                    "bastion/demo_models/text-classifier/model.onnx",
                    "bastion/protos/grpc_predict_v2.proto", "bastion/data/text_sample.jsonl",
                    "bastion/data/signatures/default.yaml"):
        assert shipped in names


def test_sidecar_runtime_never_imports_torch():
    code = ("import sys, bastion.cli, bastion.proxy.server, bastion.upstream.server, bastion.demo; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_dockerfile_installs_with_the_ci_script():
    dockerfile = (REPO / "Dockerfile").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    assert re.search(r"^RUN scripts/install\.sh --runtime", dockerfile, re.M)
    assert "scripts/install.sh --test" in ci
    # Every package folder the wheel needs is copied into the image.
    for folder in ("bastion", "proxy", "detectors", "transforms", "protos", "scripts"):
        assert f"COPY {folder} ./{folder}" in dockerfile


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci_lines = [l.strip() for l in (REPO / ".ci" / "run").read_text().splitlines()
                if l.strip() and not l.startswith("#")]
    command = ci_lines[-1]
    assert command in readme, f"README does not print the CI test command {command!r}"


def test_generated_protos_are_current(tmp_path):
    """The committed stubs equal a fresh generation (grpcio-tools pinned in the test extra)."""
    import shutil
    copy = tmp_path / "repo"
    shutil.copytree(REPO / "protos", copy / "protos")
    shutil.copytree(REPO / "scripts", copy / "scripts")
    subprocess.run([sys.executable, "scripts/gen_protos.py"], cwd=copy, check=True, timeout=120)
    for generated in sorted((REPO / "protos").glob("*_pb2*.py*")):
        assert (copy / "protos" / generated.name).read_text() == generated.read_text(), generated.name

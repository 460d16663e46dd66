"""Packaging promises: one `bastion` namespace, no torch at runtime, image installs like CI."""
from __future__ import annotations

import pathlib
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
    for package in ("proxy", "detectors", "transforms", "protos", "reference_server", "replay", "core"):
        assert f"bastion/{package}/__init__.py" in names
    for shipped in ("bastion/demo_models/fashion-mnist/model.onnx",
                    "bastion/demo_models/text-classifier/model.onnx",
                    "bastion/demo_models/text-generator/generator.json",
                    "bastion/protos/grpc_predict_v2.proto", "bastion/data/text_sample.jsonl",
                    "bastion/data/signatures/default.yaml"):
        assert shipped in names


def test_sidecar_runtime_never_imports_torch():
    code = ("import sys, bastion.cli, bastion.proxy.server, bastion.reference_server.server, bastion.demo; "
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


# Every third-party module the tests (and the tools they run) import comes from a distribution
# that `pip install -e .[test]` brings in, directly or through a dependency: CI installs into a
# fresh virtualenv, so an undeclared one would fail there, but this says which one and why.
TEST_TOOLS = ("tools/training/train_fashion_mnist.py", "tools/training/build_demo_defenses.py",
              "tools/linf_attack.py", "tools/measure_signatures.py")


def _top_level_imports(path):
    import ast
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _declared_distributions(root="bastion-sidecar", extras=("test",)):
    """The installed distributions `root[extras]` requires, transitively, markers evaluated."""
    from importlib import metadata
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    seen, todo = set(), [(root, tuple(extras))]
    while todo:
        name, wanted = todo.pop()
        key = (canonicalize_name(name), wanted)
        if key in seen:
            continue
        seen.add(key)
        for line in metadata.requires(name) or ():
            req = Requirement(line)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in ("",) + wanted):
                try:
                    metadata.distribution(req.name)
                except metadata.PackageNotFoundError:
                    continue   # an optional dependency not installed here (e.g. a platform's)
                todo.append((req.name, tuple(sorted(req.extras))))
    return {name for name, _ in seen}


def test_every_module_the_tests_import_is_declared():
    from importlib import metadata
    from packaging.utils import canonicalize_name
    files = sorted((REPO / "tests").glob("*.py")) + [REPO / t for t in TEST_TOOLS]
    # The repository's own modules and folders (tools/, tools/training/*.py put on sys.path).
    tracked = subprocess.run(["git", "ls-files", "*.py"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.split()
    local = ({pathlib.PurePath(p).stem for p in tracked}
             | {pathlib.PurePath(p).parts[0] for p in tracked} | {p.stem for p in files})
    imported = set().union(*(_top_level_imports(p) for p in files))
    third_party = sorted(imported - local - set(sys.stdlib_module_names))
    providers = metadata.packages_distributions()
    declared = _declared_distributions()
    undeclared = {}
    for module in third_party:
        dists = {canonicalize_name(d) for d in providers.get(module, ())}
        if not dists & declared:
            undeclared[module] = sorted(dists) or "not installed"
    assert not undeclared, f"imported by tests but not in pyproject's test extra: {undeclared}"


def test_bastion_help_lists_every_command_with_what_it_does():
    import argparse
    from bastion.cli import build_parser
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    commands = {choice.dest: choice.help for choice in sub._choices_actions}
    assert set(commands) == set(sub.choices) and len(commands) >= 8, commands
    out = subprocess.run([sys.executable, "-m", "bastion", "--help"], capture_output=True,
                         text=True, check=True).stdout
    listed = set(re.findall(r"^    (\S+)\s", out, re.M))
    assert listed == set(commands), (listed, out)
    assert all(commands.values()), commands        # each says what it does
    # The description names no command or all of them (it once named 4 of 8).
    named = {c for c in commands if re.search(rf"\b{re.escape(c)}\b", parser.description)}
    assert named in (set(), set(commands)), named
    # The README's usage block shows every command too.
    readme = (REPO / "README.md").read_text()
    assert all(f"bastion {name}" in readme for name in commands), \
        [n for n in commands if f"bastion {n}" not in readme]

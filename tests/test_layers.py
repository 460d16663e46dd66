"""Layers point down: protocol <- stage core <- transforms, detectors <- config <- proxy <- CLI
(docs/architecture.md, "Layers").

Read from the source with ``ast`` (nothing is imported), so an import inside a function, a
relative import or a ``TYPE_CHECKING`` import counts like any other: a lazy import that breaks a
loop still is a loop.
"""
from __future__ import annotations

import ast
import pathlib

import pytest

from tests.harness import REPO

# Package name -> folder, as pyproject.toml's package-dir maps them.
PACKAGE_DIRS = {"bastion": "bastion", "bastion.proxy": "proxy", "bastion.detectors": "detectors",
                "bastion.transforms": "transforms", "bastion.protos": "protos"}

# The layers, lowest first: a module imports its own layer and those below. Modules in none of
# them (CLI commands, replay, demo, the reference model server, tools) sit on top.
LAYERS = (
    ("protocol", ("bastion.protos",)),
    ("stage core", ("bastion.core",)),
    ("stages", ("bastion.transforms", "bastion.detectors")),
    ("config", ("bastion.config", "bastion.stage_config", "bastion.stage_catalog",
                "bastion.clients_config", "bastion.output_config", "bastion.shipped_profiles",
                "bastion.defense_version")),
    ("proxy", ("bastion.proxy",)),
)


def package_modules(root: pathlib.Path) -> dict[str, pathlib.Path]:
    """Dotted module name -> file, for every module of the package (generated *_pb2* excluded)."""
    modules: dict[str, pathlib.Path] = {}
    for package, folder in PACKAGE_DIRS.items():
        top = root / folder
        for path in sorted(top.rglob("*.py")):
            relative = path.relative_to(top)
            # Only folders that are packages (data folders may hold stray scripts).
            if "_pb2" in path.name or not all((top / parent / "__init__.py").exists()
                                              for parent in relative.parents):
                continue
            parts = relative.with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


def _resolve(name: str, modules: dict[str, pathlib.Path]) -> str | None:
    """The package module that importing ``name`` loads: itself, else its nearest parent."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str, path: pathlib.Path, modules: dict[str, pathlib.Path]) -> set[str]:
    """Package modules that ``module`` imports anywhere in its file."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[:len(base) - node.level + (1 if is_package else 0)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # `from pkg import name`: the submodule pkg.name if there is one, else pkg itself.
            targets = [f"{prefix}.{alias.name}" if f"{prefix}.{alias.name}" in modules else prefix
                       for alias in node.names]
        else:
            continue
        for target in targets:
            resolved = _resolve(target, modules)
            if resolved is not None and resolved != module:
                found.add(resolved)
    return found


def import_graph(root: pathlib.Path = REPO) -> dict[str, set[str]]:
    modules = package_modules(root)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path (first module repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Imports that point up: stages or the config schema reaching into the server."""
    problems = []
    for module, targets in sorted(graph.items()):
        below_proxy = (module.startswith(("bastion.detectors", "bastion.transforms"))
                       or module == "bastion.config")
        if below_proxy:
            problems += [f"{module} imports {target}" for target in sorted(targets)
                         if target == "bastion.proxy" or target.startswith("bastion.proxy.")]
    return problems


def layer_of(module: str) -> int:
    if module == "bastion":
        return 0  # the package root holds only __version__ and imports nothing
    for rank, (_, prefixes) in enumerate(LAYERS):
        if any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes):
            return rank
    return len(LAYERS)


def _layer_name(rank: int) -> str:
    return LAYERS[rank][0] if rank < len(LAYERS) else "CLI and tools"


def imports_above(graph: dict[str, set[str]]) -> list[str]:
    return [f"{module} ({_layer_name(layer_of(module))}) imports {target} "
            f"({_layer_name(layer_of(target))})"
            for module, targets in sorted(graph.items()) for target in sorted(targets)
            if layer_of(target) > layer_of(module)]


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_every_package_folder_is_read(graph):
    for module in ("bastion.config", "bastion.cli", "bastion.proxy.server",
                   "bastion.detectors.base", "bastion.transforms.base", "bastion.protos",
                   "bastion.reference_server.server"):
        assert module in graph
    assert not any("_pb2" in module for module in graph)
    # Imports are resolved, relative and function-level ones included.
    assert "bastion.config" in graph["bastion.proxy.server"]
    assert "bastion.proxy.server" in graph["bastion.cli"]  # imported inside a function


def test_stages_and_config_never_import_the_server(graph):
    assert upward_imports(graph) == []


def test_every_layer_imports_only_its_own_and_those_below(graph):
    assert imports_above(graph) == []


def test_no_import_cycles(graph):
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checks_catch_what_they_guard(tmp_path):
    """Relative, function-level and TYPE_CHECKING imports all make edges and loops."""
    for folder in PACKAGE_DIRS.values():
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text("")
    (tmp_path / "bastion" / "config.py").write_text(
        "def parse():\n    from bastion.proxy import pipeline\n")
    (tmp_path / "proxy" / "pipeline.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from bastion import config\n")
    (tmp_path / "detectors" / "x.py").write_text("from ..proxy.pipeline import run\n")
    (tmp_path / "protos" / "m_pb2.py").write_text("import bastion.config\n")
    (tmp_path / "protos" / "codec.py").write_text("def f():\n    import bastion.detectors.x\n")
    graph = import_graph(tmp_path)
    assert "bastion.protos.m_pb2" not in graph
    assert imports_above(graph) == [
        "bastion.config (config) imports bastion.proxy.pipeline (proxy)",
        "bastion.detectors.x (stages) imports bastion.proxy.pipeline (proxy)",
        "bastion.protos.codec (protocol) imports bastion.detectors.x (stages)"]
    assert upward_imports(graph) == ["bastion.config imports bastion.proxy.pipeline",
                                     "bastion.detectors.x imports bastion.proxy.pipeline"]
    assert find_cycle(graph) == ["bastion.config", "bastion.proxy.pipeline", "bastion.config"]

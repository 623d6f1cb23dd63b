"""Layering: the compiler loads no torch, and the stage packages import each other one way.

Data flows data -> models -> pruning -> train -> export -> compile -> validate / bench / report ->
pipeline -> cli (README, "Layout"); what export writes and compile reads is
``clicktrain_deploy.contract`` (numpy + onnx only).
"""
from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from .conftest import REPO

PACKAGE = "clicktrain_deploy"
# Source folders and the package they are installed as (pyproject's package-dir).
SOURCES = {REPO / "clicktrain_deploy": PACKAGE, REPO / "passes": f"{PACKAGE}.passes",
           REPO / "models": f"{PACKAGE}.models"}
STAGES = ("data", "models", "pruning", "train", "export", "compile", "passes", "validate", "bench",
          "report", "pipeline", "cli")

# Run in a fresh interpreter: import one module and report every attempt to import torch (who
# asked, and the stack). With "block", torch behaves as if it were not installed, so a module of
# ours that needs it fails to import, while third-party optional probes (``tvm_ffi`` tries
# ``import torch`` whenever it loads, for DLPack) fall back as they do on a machine without torch.
_PROBE = r"""
import importlib, json, sys, traceback

block = sys.argv[2] == "block"
attempts = []

class Watch:
    def find_spec(self, name, path=None, target=None):
        if name != "torch" and not name.startswith("torch."):
            return None
        frames = [f for f in traceback.extract_stack()[:-1] if "importlib" not in f.filename]
        attempts.append({"importer": frames[-1].filename,
                         "stack": "".join(traceback.format_list(frames[-12:]))})
        if block:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by test_layering)", name=name)
        return None

sys.meta_path.insert(0, Watch())
importlib.import_module(sys.argv[1])
print(json.dumps({"torch_loaded": "torch" in sys.modules, "attempts": attempts}))
"""


def _probe(module: str, mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", _PROBE, module, mode], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, f"import {module} with torch {mode}ed failed:\n{done.stderr[-4000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def _ours(attempts: list[dict]) -> list[dict]:
    """Attempts made by a file of this repository (not by an installed third-party package)."""
    return [a for a in attempts if Path(a["importer"]).resolve().is_relative_to(REPO)
            and ".venv" not in Path(a["importer"]).resolve().relative_to(REPO).parts]


def test_the_contract_loads_no_torch_at_all():
    result = _probe("clicktrain_deploy.contract", "watch")
    assert not result["torch_loaded"], "import clicktrain_deploy.contract loads torch:\n" + \
        "\n".join(a["stack"] for a in result["attempts"])


@pytest.mark.parametrize("module", ["clicktrain_deploy.contract", "clicktrain_deploy.compile.build",
                                    "clicktrain_deploy.compile.frontend"])
def test_the_contract_and_the_compiler_import_no_torch(module):
    """Our code asks for torch nowhere on the way, and the module imports without it (TVM's
    ``tvm_ffi`` imports torch by itself where torch is installed, so sys.modules alone cannot
    tell; blocking torch does)."""
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} does not exist yet (the compile frontend is being written, issue 12)")
    result = _probe(module, "block")
    ours = _ours(result["attempts"])
    assert not ours, f"import {module} imports torch from our code:\n" + "\n".join(a["stack"] for a in ours)
    assert not result["torch_loaded"]


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name (``__init__`` as the package itself)."""
    found = {}
    for folder, name in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([name, *parts])] = path
    return found


def _known_prefix(name: str, known: set[str]) -> str | None:
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Package modules that ``name`` imports anywhere in its file (top level, functions and
    ``TYPE_CHECKING`` blocks alike: a lazy import is still a dependency)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets |= {_known_prefix(a.name, known) for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:  # ``from . import x`` may name a module
                full = f"{base}.{alias.name}"
                targets.add(full if full in known else _known_prefix(base, known))
    return targets - {None, name}


def _unit(module: str) -> str | None:
    """The layering unit of a module: its stage package, or itself for the shared top-level
    modules (contract, errors, config, ...); None for the package root and ``__main__``, the API
    facade and the entry point above everything."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] == "__main__":
        return None
    return parts[1]


def _graph() -> tuple[dict[str, set[str]], dict[tuple[str, str], list[str]]]:
    modules = _modules()
    known = set(modules)
    edges: dict[str, set[str]] = defaultdict(set)
    why: dict[tuple[str, str], list[str]] = defaultdict(list)
    for name, path in modules.items():
        source = _unit(name)
        for target in _imports(name, path, known):
            if source is None or _unit(target) is None or source == _unit(target):
                continue
            edges[source].add(_unit(target))
            why[source, _unit(target)].append(f"{name} -> {target}")
    return edges, why


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one unit (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(set(edges) | {w for ws in edges.values() for w in ws}):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_is_read():
    edges, why = _graph()
    assert "export" in edges["pipeline"] and "contract" in edges["passes"]
    assert any("clicktrain_deploy.passes.onnx_passes -> clicktrain_deploy.contract" in e
               for e in why["passes", "contract"])


def test_no_import_cycle_between_stage_packages():
    edges, why = _graph()
    cycles = _cycles(edges)
    lines = []
    for component in cycles:
        lines.append(" <-> ".join(component))
        lines += [f"    {edge}" for a in component for b in component if b in edges.get(a, ())
                  for edge in why[a, b]]
    assert not cycles, "import cycles between stage packages (and the shared modules):\n" + "\n".join(lines)


def test_cli_is_at_the_top():
    edges, why = _graph()
    importers = sorted(edge for (a, b), found in why.items() if b == "cli" for edge in found)
    assert not importers, f"only the entry point may import the CLI: {importers}"


def test_the_contract_imports_nothing_of_the_package_but_errors():
    modules = _modules()
    imported = _imports(f"{PACKAGE}.contract", modules[f"{PACKAGE}.contract"], set(modules))
    assert imported <= {f"{PACKAGE}.errors"}, imported
    text = modules[f"{PACKAGE}.errors"].read_text()
    assert not [n for n in ast.walk(ast.parse(text)) if isinstance(n, (ast.Import, ast.ImportFrom))
                and not (isinstance(n, ast.ImportFrom) and n.module == "__future__")]


def test_stage_names_are_the_layout():
    """Every stage package in STAGES exists, so a renamed one is not silently left unchecked."""
    units = {_unit(m) for m in _modules()} - {None}
    assert set(STAGES) <= units, set(STAGES) - units

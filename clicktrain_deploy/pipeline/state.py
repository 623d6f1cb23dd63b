"""``pipeline.json``: per stage, the hash of its inputs, its status, outputs and timing.

A stage's inputs hash covers the recipe fields that decide its result, the files of earlier
stages it reads (their bytes, hashed now), the source of the code it runs (``code_digest``) and
the versions of the libraries that decide its output (``LIBRARIES``). Written atomically after
every change, so an interrupted run leaves the interrupted stage marked ``running``.

The code a stage runs is found statically: the modules its factory imports (the stages import
lazily, inside their factories) and, transitively, every module of the package those import
(function-level imports included, and every parent package's ``__init__``, which Python runs
first), with the C/C++ sources and templates of each package in that closure. Editing a kernel
generator thus re-runs the compile, validate and benchmark stages (and the report) and not
training; editing the trainer re-runs everything. Every import statement counts, including those
under ``if TYPE_CHECKING:``, so a module the package loads by computed name (the package's lazy
``__init__``) is covered as long as it is also imported there (``tests/test_pipeline.py`` checks).
"""
from __future__ import annotations

import ast
import datetime
import hashlib
import importlib.util
import inspect
import json
import textwrap
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from ..errors import ClickTrainError
from ..fileio import atomic_write_json

FORMAT = "clicktrain-deploy/pipeline"
VERSION = 1


class PipelineStateError(ClickTrainError):
    """``pipeline.json`` is unreadable or from another format."""


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


PACKAGE = "clicktrain_deploy"
# installed from folders outside clicktrain_deploy/ (pyproject's package-dir)
MAPPED_PACKAGES = ("clicktrain_deploy.models", "clicktrain_deploy.passes")
SOURCE_SUFFIXES = (".py", ".c", ".cc", ".j2")
# distributions whose version decides a stage's output (tvm: compiler and runtime)
LIBRARIES = ("torch", "apache-tvm", "apache-tvm-ffi", "onnx", "onnxruntime")


def package_dirs() -> dict[str, Path]:
    """Where each package of the installation lives: module name prefix -> folder."""
    dirs = {}
    for name in (PACKAGE, *MAPPED_PACKAGES):
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise PipelineStateError(f"package {name} not found: is clicktrain-deploy installed?")
        dirs[name] = Path(list(spec.submodule_search_locations)[0])
    return dirs


def module_file(name: str, dirs: dict[str, Path]) -> Path | None:
    """The source file of module ``name`` of the package (its ``__init__.py`` for a package),
    or None when ``name`` is not a module of ours (an attribute, another distribution)."""
    prefix = max((p for p in dirs if name == p or name.startswith(p + ".")), key=len, default=None)
    if prefix is None:
        return None
    base = dirs[prefix].joinpath(*name[len(prefix):].split(".")[1:])
    for path in (base / "__init__.py", base.with_name(base.name + ".py")):
        if path.is_file():
            return path
    return None


def _imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """Absolute names every import statement under ``node`` may load (module or module.attribute)."""
    names: list[str] = []
    for child in ast.walk(node):
        if isinstance(child, ast.Import):
            names += [alias.name for alias in child.names]
        elif isinstance(child, ast.ImportFrom):
            if child.level:
                parts = module.split(".")
                keep = len(parts) - child.level + (1 if is_package else 0)
                base = ".".join(parts[:keep] + ([child.module] if child.module else []))
            else:
                base = child.module or ""
            names += [base, *(f"{base}.{alias.name}" for alias in child.names)]
    return names


def code_closure(entries: list[str], dirs: dict[str, Path] | None = None,
                 shallow: frozenset[str] = frozenset(), exclude: frozenset[str] = frozenset()) -> dict[str, Path]:
    """Every source file of the package that running ``entries`` (module names) may execute:
    the static import closure, parent packages' ``__init__`` and each package's non-Python
    sources (``SOURCE_SUFFIXES``), by a name relative to its package folder. Of the modules in
    ``shallow`` only the module-level imports are followed (``pipeline.stages``: each factory
    imports its own stage's code); modules in ``exclude`` (code the stage's settings never run, and
    what only they import) are left out."""
    dirs = dirs if dirs is not None else package_dirs()
    files: dict[str, Path] = {}
    seen: set[str] = set()
    todo = list(entries)
    while todo:
        name = todo.pop()
        if name in seen or name in exclude:
            continue
        seen.add(name)
        path = module_file(name, dirs)
        if path is None:
            continue
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parents run first
        files[name] = path
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), str(path))
        if name in shallow:
            tree = ast.Module([stmt for stmt in tree.body if not isinstance(
                stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))], [])
        todo += _imported(tree, name, is_package)
        if is_package:
            for other in sorted(path.parent.iterdir()):
                if other.suffix in SOURCE_SUFFIXES and other.suffix != ".py":
                    files[f"{name}/{other.name}"] = other
    return dict(sorted(files.items()))


def factory_entries(factory: Callable) -> list[str]:
    """The module that defines ``factory`` and every module its body imports."""
    module = factory.__module__
    tree = ast.parse(textwrap.dedent(inspect.getsource(factory)))
    return [module, *_imported(tree, module, is_package=False)]


def library_versions() -> dict[str, str | None]:
    """Installed version of each of ``LIBRARIES`` (None where one is not installed)."""
    versions: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions


def code_digest(factory: Callable, dirs: dict[str, Path] | None = None,
                exclude: frozenset[str] = frozenset()) -> str:
    """sha256 over the source files the stage ``factory`` builds runs (``code_closure``, less
    ``exclude``) and ``library_versions()``: what, besides its settings and input files, decides
    its output."""
    sha = hashlib.sha256()
    closure = code_closure(factory_entries(factory), dirs, shallow=frozenset({factory.__module__}), exclude=exclude)
    for name, path in closure.items():
        sha.update(f"{name}\0{file_digest(path)}\0".encode())
    sha.update(json.dumps(library_versions(), sort_keys=True).encode())
    return sha.hexdigest()


def inputs_digest(settings: dict, reads: dict[str, Path], code: str = "") -> str:
    """sha256 over the settings, the bytes of every file read (by its name), the stage's
    ``code_digest`` and the package version."""
    files = {name: file_digest(path) if path.is_file() else None for name, path in reads.items()}
    text = json.dumps({"settings": settings, "files": files, "code": code,
                       "version": version("clicktrain-deploy")}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class StageRecord:
    inputs: str                      # inputs hash the stage last started with
    status: str                      # "running", "done", "skipped" (finished without doing its
                                     # job, e.g. no GPU to validate on: ``summary`` says why) or "failed"
    started_at: str
    seconds: float = 0.0
    outputs: dict[str, str] = field(default_factory=dict)  # path relative to the run folder -> sha256
    summary: str = ""
    error: str | None = None
    code: str = ""                   # its code_digest (part of ``inputs``)


FINISHED = ("done", "skipped")  # statuses a re-run may keep


@dataclass
class PipelineState:
    path: Path
    stages: dict[str, StageRecord] = field(default_factory=dict)
    targets: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> "PipelineState":
        if not path.exists():
            return cls(path)
        try:
            raw = json.loads(path.read_text())
            if raw.get("format") != FORMAT or raw.get("version") != VERSION:
                raise ValueError(f"format {raw.get('format')!r} version {raw.get('version')!r}")
            stages = {name: StageRecord(**record) for name, record in raw["stages"].items()}
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise PipelineStateError(f"{path}: not a readable pipeline state ({exc}); delete it to "
                                     "start the pipeline afresh") from None
        return cls(path, stages, raw.get("targets", []))

    def save(self) -> None:
        atomic_write_json(self.path, {"format": FORMAT, "version": VERSION, "targets": self.targets,
                                      "stages": {name: asdict(r) for name, r in self.stages.items()}})

    def start(self, name: str, inputs: str, code: str = "") -> None:
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self.stages[name] = StageRecord(inputs, "running", now, code=code)
        self.save()

    def finish(self, name: str, seconds: float, outputs: list[Path], summary: str,
               status: str = "done") -> None:
        """``status`` "done", or "skipped" for a stage that finished without doing its job."""
        if status not in FINISHED:
            raise ValueError(f"finish: status {status!r}")
        record = self.stages[name]
        record.status, record.seconds, record.summary, record.error = status, round(seconds, 2), summary, None
        record.outputs = {str(p.relative_to(self.path.parent)): file_digest(p) for p in outputs}
        self.save()

    def fail(self, name: str, seconds: float, error: str) -> None:
        record = self.stages[name]
        record.status, record.seconds, record.error = "failed", round(seconds, 2), error
        self.save()

"""Users' own models: a callable named by ``package.module:callable`` or ``path/net.py:callable``.

``create_user_model`` imports the callable, calls it with the recipe's ``kwargs`` and returns the
``nn.Module`` it builds. ``num_classes`` and ``in_channels`` (from the data) are passed only where
the callable's signature names them and ``kwargs`` does not already give them, so a net with fixed
widths needs neither; ``kwargs`` always wins.

A file is imported under a private module name (``_clicktrain_user.<stem>_<hash of its path>``,
registered in ``sys.modules`` so pickling and tracing find its classes) and executed again on
every call, so edits to it are seen. Its own folder is on ``sys.path`` while it executes (so it may
import modules beside it) and is taken off again afterwards. Every failure (file missing, a
syntax or import error inside it, no such callable, a callable that raises or returns something
that is not an ``nn.Module``) raises ``ModelError`` naming the file or the callable.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import nn

from clicktrain_deploy.errors import ModelError

USER_PACKAGE = "_clicktrain_user"
# Arguments a model may take that the data decides.
DATA_ARGUMENTS = ("num_classes", "in_channels")


def split_spec(spec: str) -> tuple[str, str]:
    """``"where:callable"`` -> ``(where, callable)``; the last colon splits (Windows drives)."""
    where, colon, attr = spec.rpartition(":")
    if not colon or not where or not attr:
        raise ValueError(f"{spec!r} must be '<module or file>:<callable>'")
    return where, attr


def import_file(path: str | Path) -> ModuleType:
    """Execute the Python file ``path`` as a fresh module (see the module docstring)."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise ModelError(f"model.file {path}: file not found")
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:12]
    name = f"{USER_PACKAGE}.{''.join(c if c.isalnum() else '_' for c in path.stem)}_{digest}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ModelError(f"model.file {path}: not an importable Python file")
    module = importlib.util.module_from_spec(spec)
    saved_path, saved_module = list(sys.path), sys.modules.get(name)
    sys.modules[name] = module
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        _forget(name, saved_module)
        raise ModelError(f"model.file {path}: syntax error at line {exc.lineno}: {exc.msg}") from None
    except ImportError as exc:
        _forget(name, saved_module)
        raise ModelError(f"model.file {path}: import failed: {exc}") from exc
    except Exception as exc:
        _forget(name, saved_module)
        raise ModelError(f"model.file {path}: raised {type(exc).__name__} while importing: {exc}") from exc
    finally:
        sys.path[:] = saved_path
    return module


def _forget(name: str, saved: ModuleType | None) -> None:
    if saved is None:
        sys.modules.pop(name, None)
    else:
        sys.modules[name] = saved


def load_callable(factory: str | None = None, file: str | None = None) -> tuple[Callable, str]:
    """The callable that ``factory`` ("package.module:callable") or ``file``
    ("path/net.py:callable", absolute or relative to the working directory) names, and a label
    for messages. Dotted attributes (``module:Class.build``) are followed."""
    if (factory is None) == (file is None):
        raise ValueError("give exactly one of factory and file")
    where, attr = split_spec(factory or file)  # type: ignore[arg-type]
    if factory is not None:
        label = f"model.factory {factory!r}"
        try:
            module = importlib.import_module(where)
        except Exception as exc:
            raise ModelError(f"{label}: cannot import {where!r}: {type(exc).__name__}: {exc}") from exc
    else:
        module = import_file(where)
        label = f"model.file {Path(where).expanduser().resolve()}:{attr}"
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ModelError(f"{label}: {where!r} has no attribute {part!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ModelError(f"{label}: {attr!r} is a {type(target).__name__}, not a callable")
    return target, label


def data_arguments(fn: Callable, kwargs: dict[str, Any], num_classes: int,
                   in_channels: int) -> dict[str, Any]:
    """``num_classes``/``in_channels`` for the parameters of ``fn`` that name them (not ``**kw``)
    and that ``kwargs`` does not set."""
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins and some C extensions have no signature
        return {}
    values = {"num_classes": num_classes, "in_channels": in_channels}
    return {name: values[name] for name in DATA_ARGUMENTS
            if name in parameters and name not in kwargs
            and parameters[name].kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                          inspect.Parameter.KEYWORD_ONLY)}


def create_user_model(*, factory: str | None = None, file: str | None = None,
                      kwargs: dict[str, Any] | None = None, num_classes: int,
                      in_channels: int) -> nn.Module:
    """Call the named callable with ``kwargs`` (plus the data's arguments it takes) and check
    that it returns an ``nn.Module``."""
    fn, label = load_callable(factory, file)
    kwargs = dict(kwargs or {})
    arguments = {**data_arguments(fn, kwargs, num_classes, in_channels), **kwargs}
    try:
        model = fn(**arguments)
    except Exception as exc:
        raise ModelError(f"{label}: calling it with {arguments} raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ModelError(f"{label}: returned a {type(model).__name__}, not a torch.nn.Module")
    return model

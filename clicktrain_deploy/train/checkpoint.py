"""Checkpoints: one file per epoch in ``<output_dir>/checkpoints``, written atomically.

A checkpoint holds everything to continue bit-for-bit: model, optimizer, LR scheduler, pruning
method state (ClickTrain: library, masks, phase; PruneTrain: live channels, lasso coefficient;
ADMM: its variables), the distillation teacher's weights (None without distillation), torch's
RNG state, the recipe and the metrics so far.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ..config import parse_recipe
from ..errors import CheckpointError
from ..fileio import atomic_write
from ..pruning.method import PruningMethod, create_method

FORMAT = "clicktrain-deploy/checkpoint"
VERSION = 1
_NAME = re.compile(r"epoch-(\d{4})\.pt$")


def checkpoint_path(output_dir: str | Path, epoch: int) -> Path:
    """Path of the checkpoint written after ``epoch`` (0-based) completed."""
    return Path(output_dir) / "checkpoints" / f"epoch-{epoch:04d}.pt"


def save_checkpoint(output_dir: str | Path, epoch: int, state: dict, keep: int) -> Path:
    """Write ``state`` as the checkpoint of ``epoch``; keep only the newest ``keep`` files."""
    path = checkpoint_path(output_dir, epoch)
    atomic_write(path, lambda f: torch.save({"format": FORMAT, "version": VERSION, **state}, f))
    for old in list_checkpoints(output_dir)[:-keep]:
        old.unlink()
    return path


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Per-epoch checkpoints in ``output_dir``, oldest first."""
    folder = Path(output_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _NAME.search(p.name))


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint file (or the newest one in a run folder) and check its format."""
    path = Path(path)
    if path.is_dir():
        found = list_checkpoints(path)
        if not found:
            raise CheckpointError(f"{path}: no checkpoints/epoch-*.pt in this run folder")
        path = found[-1]
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a clicktrain-deploy checkpoint")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {state.get('version')} is not "
                              f"supported (this build reads version {VERSION})")
    state["path"] = str(path)
    return state


def restore_model(saved: dict) -> tuple[torch.nn.Module, PruningMethod]:
    """Rebuild the trained model (shrunk as PruneTrain left it) and its pruning method from a
    checkpoint; ``method.masks`` is empty where no conv is pattern-pruned. A user's model
    (``model.factory``/``model.file``) must still be importable; its ``model.weights`` file is not
    read (the checkpoint holds the weights and any shrink they needed)."""
    from .weights import build_recipe_model

    recipe = parse_recipe(saved["recipe"], saved["path"])
    model, _ = build_recipe_model(recipe.model, len(saved["data"]["classes"]),
                                  saved["data"]["input_shape"][0], shrink=saved.get("base_shrink"),
                                  load=False)
    method = create_method(model, recipe.pruning)
    method.load_state_dict(saved["pruner"])
    model.load_state_dict(saved["model"])
    return model, method

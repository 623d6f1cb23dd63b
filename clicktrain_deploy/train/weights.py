"""Building a recipe's model and loading pretrained weights into it (``model.weights``).

The weights file is a plain state_dict (``torch.save(model.state_dict(), path)``) or one of our
checkpoints (``checkpoints/epoch-NNNN.pt``). A PruneTrain checkpoint records the live channels of
its shrunk model: the fresh model is shrunk to them first (the way ``--resume`` does), then the
weights are loaded. Loading is strict: every key of the model must be in the file with the same
shape and the file may hold no other key; otherwise ``ModelError`` names the file, the missing
and unexpected keys and every shape mismatch (key, file's shape, model's shape).

The shrink (``Shrink``: the PruneTrain settings and channels, per step) is recorded in our own checkpoints
(key ``"base_shrink"``), so a run started from PruneTrain weights is resumed, exported and
reported without the weights file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ModelError
from ..pruning.config import PruningConfig
from ..pruning.method import create_method

# Methods whose checkpoints change the model's shapes (``PruningMethod.load_state_dict`` shrinks).
SHAPE_CHANGING_METHODS = ("prunetrain",)
_LISTED = 8
# Shrink steps, applied in order to a fresh model: each a PruneTrain run's [pruning] table and
# method state ({"pruning": ..., "pruner": ...}); a chain when PruneTrain weights start a run
# whose checkpoint starts another.
Shrink = list[dict[str, Any]]


def read_weights(path: str | Path) -> tuple[dict[str, Tensor], Shrink | None]:
    """The state_dict in ``path`` and the shrink its model needs: for one of our checkpoints, the
    shrink its run started from (``base_shrink``) and, for a PruneTrain run, its own channels;
    None when the shapes are the fresh model's."""
    from .checkpoint import FORMAT, VERSION

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model.weights {path}: file not found")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, foreign, or a pickled object that is not plain data
        raise ModelError(f"model.weights {path}: not a readable state_dict or checkpoint "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                         "save one with torch.save(model.state_dict(), path)") from None
    if isinstance(loaded, dict) and loaded.get("format") == FORMAT:
        if loaded.get("version") != VERSION:
            raise ModelError(f"model.weights {path}: checkpoint version {loaded.get('version')} is "
                             f"not supported (this build reads version {VERSION})")
        pruning = loaded["recipe"].get("pruning", {})
        shrink = list(loaded.get("base_shrink") or [])
        if pruning.get("method") in SHAPE_CHANGING_METHODS:
            shrink.append({"pruning": pruning, "pruner": loaded["pruner"]})
        return loaded["model"], shrink or None
    if not isinstance(loaded, dict) or not all(isinstance(k, str) and isinstance(v, Tensor)
                                               for k, v in loaded.items()):
        raise ModelError(f"model.weights {path}: holds a {type(loaded).__name__} that is neither a "
                         "state_dict (names -> tensors) nor a clicktrain-deploy checkpoint")
    return loaded, None


def apply_shrink(model: nn.Module, shrink: Shrink | None, source: str = "model.weights") -> None:
    """Shrink a fresh ``model`` to the channels PruneTrain recorded, step by step (no-op for None)."""
    for step in shrink or []:
        try:
            method = create_method(model, PruningConfig.model_validate(step["pruning"]))
            method.load_state_dict(step["pruner"])
        except Exception as exc:
            raise ModelError(f"{source}: cannot shrink the model to the checkpoint's channels: "
                             f"{exc}") from exc


def _listed(keys: list[str]) -> str:
    more = f" and {len(keys) - _LISTED} more" if len(keys) > _LISTED else ""
    return ", ".join(keys[:_LISTED]) + more


def load_state_strictly(model: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """``model.load_state_dict(state)`` after checking keys and shapes, with an error that names
    ``source``, the missing and unexpected keys and each shape mismatch."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} (file {tuple(state[k].shape)}, model {tuple(own[k].shape)})"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_listed(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_listed(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): {_listed(shapes)}")
        raise ModelError(f"{source}: does not fit the model ({type(model).__name__}): "
                         + "; ".join(parts))
    model.load_state_dict(state)


def load_weights(model: nn.Module, path: str | Path) -> Shrink | None:
    """Load ``path`` into ``model`` strictly (shrinking it first for a PruneTrain checkpoint);
    returns the shrink applied (None when the shapes stayed)."""
    state, shrink = read_weights(path)
    apply_shrink(model, shrink, f"model.weights {path}")
    load_state_strictly(model, state, f"model.weights {path}")
    return shrink


def build_recipe_model(model_config, num_classes: int, in_channels: int,
                       shrink: Shrink | None = None, load: bool = True
                       ) -> tuple[nn.Module, Shrink | None]:
    """The recipe's model (``ModelConfig``): built, then shrunk by a recorded ``shrink`` or, when
    ``load`` and ``model_config.weights`` is set, loaded from the weights file. Returns the model
    and the shrink it carries."""
    model = model_config.build(num_classes, in_channels)
    if shrink is not None:
        apply_shrink(model, shrink, "checkpoint base_shrink")
    elif load and model_config.weights is not None:
        shrink = load_weights(model, model_config.weights)
    return model, shrink


@torch.no_grad()
def check_logits(model: nn.Module, input_shape: tuple[int, ...] | list[int], num_classes: int,
                 label: str) -> None:
    """One forward pass of a zero image in eval mode: the model must return (1, num_classes)."""
    was_training = model.training
    model.eval()
    try:
        out = model(torch.zeros(1, *input_shape))
    except Exception as exc:
        raise ModelError(f"model {label}: a forward pass on a {tuple(input_shape)} image failed: "
                         f"{type(exc).__name__}: {exc}") from exc
    finally:
        model.train(was_training)
    if not isinstance(out, Tensor) or tuple(out.shape) != (1, num_classes):
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ModelError(f"model {label}: returns {got} for one {tuple(input_shape)} image; the data "
                         f"has {num_classes} classes, so logits must be (N, {num_classes})")

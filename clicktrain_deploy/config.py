"""Recipes: one TOML or YAML file with model, data, schedule, pruning, deploy and output folder.

Unknown or invalid fields raise ``RecipeError`` naming the file and the dotted field path.
"""
from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .compile.targets import TARGETS
from .data import DATASETS
from .errors import RecipeError
from .models import MODELS
from .pruning.config import PruningConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


_FACTORY = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_CALLABLE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


class ModelConfig(_Strict):
    """Which model: exactly one of ``name`` (registry), ``factory`` ("package.module:callable")
    or ``file`` ("path/net.py:callable", relative to the recipe file); ``kwargs`` for the callable;
    ``weights``: a state_dict or checkpoint file (relative to the recipe file) loaded strictly
    before training. With none of name/factory/file the model is ``resnet20``."""

    name: str | None = None
    factory: str | None = None
    file: str | None = None
    kwargs: dict[str, Any] = {}
    weights: str | None = None

    @field_validator("factory")
    @classmethod
    def _factory_spec(cls, value: str | None) -> str | None:
        if value is not None and not _FACTORY.match(value):
            raise ValueError(f"{value!r} must be 'package.module:callable'")
        return value

    @field_validator("file")
    @classmethod
    def _file_spec(cls, value: str | None) -> str | None:
        if value is None:
            return value
        path, colon, attr = value.rpartition(":")
        if not colon or not path.endswith(".py") or not _CALLABLE.match(attr):
            raise ValueError(f"{value!r} must be 'path/to/net.py:callable'")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> "ModelConfig":
        given = [f for f in ("name", "factory", "file") if getattr(self, f) is not None]
        if len(given) > 1:
            raise ValueError(f"give exactly one of model.name, model.factory, model.file "
                             f"(got {', '.join(given)})")
        if not given:
            self.name = "resnet20"
        if self.name is not None:
            if self.name not in MODELS:
                raise ValueError(f"unknown model {self.name!r}; known: {', '.join(MODELS.names())}")
            if self.kwargs:
                raise ValueError("model.kwargs is for model.factory or model.file; registry "
                                 "models take only num_classes and in_channels, from the data")
        return self

    @property
    def label(self) -> str:
        """How messages name the model: the registry name, or the factory/file spec."""
        return self.name or self.factory or Path(str(self.file)).name

    def resolve_paths(self, base: Path) -> None:
        """Make ``file`` and ``weights`` absolute against ``base`` (the recipe's folder)."""
        if self.file is not None:
            path, _, attr = self.file.rpartition(":")
            self.file = f"{(base / Path(path).expanduser()).resolve()}:{attr}"
        if self.weights is not None:
            self.weights = str((base / Path(self.weights).expanduser()).resolve())

    def build(self, num_classes: int, in_channels: int):
        """The ``nn.Module`` this section describes, with fresh (unloaded) weights."""
        from .models import build_model

        return build_model(name=self.name, factory=self.factory, file=self.file, kwargs=self.kwargs,
                           num_classes=num_classes, in_channels=in_channels)


class DataConfig(_Strict):
    name: str = "fashion_mnist"
    root: str | None = None
    train_subset: int | None = Field(None, ge=10)
    # Class-balanced share of the test split evaluated after each epoch (None: all of it).
    test_subset: int | None = Field(None, ge=10)
    batch_size: int = Field(128, ge=1)
    test_batch_size: int = Field(1000, ge=1)
    crop_padding: int = Field(2, ge=0)
    flip: bool = True
    # image_folder only: crop size (None: the model's default input size, 224 for the ImageNet
    # models and user models, 32 for the CIFAR-style ones) and planes.
    image_size: int | None = Field(None, ge=8)
    channels: Literal[1, 3] = 3
    # image_folder only: DataLoader worker processes decoding images (None: min(4, cores));
    # how fast, not what is trained.
    workers: int | None = Field(None, ge=0)
    # image_folder only: skip (and count) unreadable images instead of stopping at the first.
    skip_corrupt: bool = False
    # Normalisation per channel in [0, 1] units; None: the dataset's own (image folders: computed
    # on ``stats_images`` training images, then recorded in the checkpoint and model info).
    mean: list[float] | None = Field(None, min_length=1)
    std: list[float] | None = Field(None, min_length=1)
    stats_images: int = Field(500, ge=1)

    @model_validator(mode="after")
    def _known(self) -> "DataConfig":
        if self.name not in DATASETS:
            raise ValueError(f"unknown dataset {self.name!r}; known: {', '.join(DATASETS.names())}")
        if self.name == "image_folder" and not self.root:
            raise ValueError("data.root is required for image_folder")
        if (self.mean is None) != (self.std is None):
            raise ValueError("give both data.mean and data.std, or neither")
        if self.mean is not None and len(self.mean) != len(self.std):
            raise ValueError(f"data.mean has {len(self.mean)} values, data.std {len(self.std)}")
        if self.std is not None and min(self.std) <= 0:
            raise ValueError(f"data.std values must be > 0, got {self.std}")
        return self

    def resolve_image_size(self, model: "ModelConfig") -> None:
        """Fill ``image_size`` from the model when the recipe leaves it out: a registry model's
        default input size, 224 for a user's model."""
        if self.image_size is None:
            self.image_size = (MODELS.get(model.name).default_config.input_size[-1]
                               if model.name is not None else 224)

    def loader_options(self) -> dict:
        """Keyword arguments the chosen loader takes beyond its root (``load_data`` takes mean
        and std for every dataset)."""
        options = {} if self.mean is None else {"mean": self.mean, "std": self.std}
        if self.name == "image_folder":
            options.update(image_size=self.image_size or 224, channels=self.channels,
                           workers=self.workers, skip_corrupt=self.skip_corrupt,
                           stats_images=self.stats_images)
        return options


class ScheduleConfig(_Strict):
    epochs: int = Field(10, ge=1)
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    lr_schedule: Literal["cosine", "multistep", "constant"] = "cosine"
    milestones: list[int] = []
    gamma: float = Field(0.1, gt=0)
    threads: int | None = Field(None, ge=1)
    # Before each evaluation, recompute BatchNorm statistics over this many training batches
    # (0 = off); only evaluation sees them, so training itself is unchanged.
    bn_recalibration_batches: int = Field(20, ge=0)
    # Epochs where the LR schedule starts over (cosine: a new cosine to 0 up to the next restart),
    # at peak ``restart_lr`` (default ``lr``): pruning after training restarts it per phase.
    restarts: list[int] = []
    restart_lr: float | None = Field(None, gt=0)
    # Activation layout in training: torch's CPU convs and BatchNorm run faster channels_last,
    # and the pattern kernels read it without a copy at their boundary.
    memory_format: Literal["contiguous", "channels_last"] = "contiguous"
    # From the hard prune on, run each pattern-pruned conv on our generated kernels (forward and
    # both gradients) where a measurement at the hard prune finds them faster than torch's conv.
    sparse_kernels: bool = False

    @field_validator("restarts")
    @classmethod
    def _increasing(cls, value: list[int]) -> list[int]:
        if any(b <= a for a, b in zip(value, value[1:])):
            raise ValueError(f"restarts must be strictly increasing, got {value}")
        return value


class DeployConfig(_Strict):
    """What ``clicktrain-deploy run`` does after training: targets, validation, benchmark."""

    targets: list[str] = Field(default_factory=lambda: ["x86", "cortex-a72"], min_length=1)
    # Real test images compared per runtime: onnxruntime vs torch and host builds vs onnxruntime;
    # emulated_images for builds run under qemu (about a second each).
    validate_images: int = Field(1000, ge=1)
    emulated_images: int = Field(10, ge=1)
    # A runtime passes when max |diff| <= atol + rtol * max |reference logit|.
    atol: float = Field(1e-4, ge=0)
    rtol: float = Field(1e-4, ge=0)
    bench_threads: list[int] = Field(default_factory=lambda: [1, 2], min_length=1)
    bench_rounds: int = Field(5, ge=1)

    @field_validator("targets")
    @classmethod
    def _known_targets(cls, targets: list[str]) -> list[str]:
        unknown = [t for t in targets if t not in TARGETS]
        if unknown:
            raise ValueError(f"unknown target {unknown[0]!r}; known: {', '.join(TARGETS.names())}")
        if len(set(targets)) != len(targets):
            raise ValueError(f"targets listed twice: {targets}")
        return targets

    @field_validator("bench_threads")
    @classmethod
    def _positive_threads(cls, threads: list[int]) -> list[int]:
        if any(t < 1 for t in threads):
            raise ValueError(f"thread counts must be >= 1, got {threads}")
        return threads


class Recipe(_Strict):
    """A whole training job. ``output_dir`` is relative to the recipe file's folder."""

    output_dir: str = "runs/default"
    seed: int = 0
    keep_checkpoints: int = Field(2, ge=1)
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    pruning: PruningConfig = PruningConfig()
    deploy: DeployConfig = DeployConfig()

    @model_validator(mode="after")
    def _phases_fit(self) -> "Recipe":
        p, epochs = self.pruning, self.schedule.epochs
        if p.method in ("clicktrain", "admm"):
            if p.select_epoch >= epochs:
                raise ValueError(f"pruning.select_epoch ({p.select_epoch}) must be < "
                                 f"schedule.epochs ({epochs})")
            if not p.select_epoch <= p.hard_prune_epoch <= epochs:
                raise ValueError(f"pruning.hard_prune_epoch ({p.hard_prune_epoch}) must be "
                                 f"between select_epoch ({p.select_epoch}) and epochs ({epochs})")
        if p.method == "admm" and p.hard_prune_epoch == p.select_epoch:
            raise ValueError(f"pruning.hard_prune_epoch ({p.hard_prune_epoch}) must be after "
                             f"select_epoch for admm: the ADMM phase needs at least one epoch")
        if p.method in ("clicktrain", "admm") and p.select_epoch == 0 and self.model.weights is None:
            what = ("masks are chosen from the initial weights' importance" if p.method == "clicktrain"
                    else "ADMM after training needs a trained model")
            raise ValueError(f"pruning.select_epoch = 0 with method {p.method!r}: {what}; give "
                             f"model.weights (a trained model) or a dense warm-up (select_epoch >= 1)")
        if p.regrow_every and self.schedule.sparse_kernels:
            raise ValueError("pruning.regrow_every moves the masks in the hard phase, and "
                             "schedule.sparse_kernels fixes its kernels' tables at the hard prune: "
                             "give one or the other")
        restarts = self.schedule.restarts
        if restarts and not (0 < restarts[0] and restarts[-1] < epochs):
            raise ValueError(f"schedule.restarts ({restarts}) must lie in 1..{epochs - 1}")
        return self

    @model_validator(mode="after")
    def _data_image_size(self) -> "Recipe":
        self.data.resolve_image_size(self.model)
        return self


def _format_errors(source: str, error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(recipe)"
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"{source}: {where}: {message}")
    return "\n".join(lines)


def parse_recipe(raw: dict, source: str = "<recipe>", base_dir: str | Path | None = None) -> Recipe:
    """Validate a recipe given as a dict (``source`` names it in errors). With ``base_dir``,
    ``model.file`` and ``model.weights`` are made absolute against it; without, relative paths
    stay relative to the working directory."""
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(_format_errors(source, exc)) from None
    if base_dir is not None:
        recipe.model.resolve_paths(Path(base_dir))
    return recipe


def read_recipe_file(path: str | Path) -> dict:
    """The raw fields of a .toml, .yaml or .yml recipe file, not yet validated."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            raw = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            raw = yaml.safe_load(text) or {}
        else:
            raise RecipeError(f"{path}: recipe must be .toml, .yaml or .yml")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise RecipeError(f"{path}: not valid {path.suffix[1:].upper()}: {exc}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe must be a table of fields")
    return raw


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a .toml, .yaml or .yml recipe; output_dir, model.file and model.weights
    (relative to the recipe file's folder) are made absolute."""
    path = Path(path)
    recipe = parse_recipe(read_recipe_file(path), str(path), base_dir=path.parent)
    recipe.output_dir = str((path.parent / recipe.output_dir).resolve())
    return recipe

"""Settings of pattern + connectivity pruning (the ``[pruning]`` table of a recipe)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .patterns import PATTERN_LIBRARIES


class PruneTrainConfig(BaseModel):
    """PruneTrain (Lym et al., SC'19): group lasso on the input and output channels of every conv
    (input neurons of the classifier); every ``interval`` epochs, channels whose weights are all
    below ``threshold`` in magnitude are removed from the model."""

    model_config = ConfigDict(extra="forbid")

    # The lasso coefficient is fixed at the first step so that the penalty is this share of the
    # total loss (the paper's configs use 0.2).
    penalty_ratio: float = Field(0.2, gt=0.0, lt=1.0)
    interval: int = Field(2, ge=1)
    threshold: float = Field(1e-4, gt=0.0)


class AdmmConfig(BaseModel):
    """Pruning after training, PatDNN style: ADMM from ``select_epoch`` to ``hard_prune_epoch``
    with penalty ``rho`` toward the pattern set and the connectivity set; the auxiliary and dual
    variables are updated every ``update_interval`` steps."""

    model_config = ConfigDict(extra="forbid")

    rho: float = Field(0.1, gt=0.0)
    update_interval: int = Field(50, ge=1)


# ClickTrain's accuracy levers: (field, value that leaves training as it was).
CLICKTRAIN_LEVERS = {"allocation": "uniform", "distill_alpha": 0.0, "reselect_every": 0,
                     "lasso_schedule": "constant", "regrow_every": 0}


class PruningConfig(BaseModel):
    """What to prune, how hard, and when (epochs count from 0).

    Phases: dense warm-up until ``select_epoch``; at its start, importance is estimated and the
    masks chosen; group lasso (``lasso``) pulls the weights to be removed toward zero until
    ``hard_prune_epoch``; from then on the masks are enforced after every optimizer step.
    The accuracy levers (``CLICKTRAIN_LEVERS``) are ClickTrain's and off by default.
    """

    model_config = ConfigDict(extra="forbid")

    # clicktrain: during training; prunetrain: channel pruning during training; admm: pattern
    # pruning after dense training (phases from select_epoch / hard_prune_epoch); dense: none.
    method: Literal["clicktrain", "prunetrain", "admm", "dense"] = "clicktrain"
    # Which convs: shell globs over module names; only 3x3 convs (groups=1) are pruned.
    include: list[str] = ["*"]
    exclude: list[str] = []
    skip_first_conv: bool = True
    # How hard: share of kernel groups removed per layer, layer-wide ranking.
    connectivity_ratio: float = Field(0.72, ge=0.0, lt=1.0)
    layer_ratios: dict[str, float] = {}
    # "global": per-layer ratios from one ranking of kernel groups over all pruned layers (each
    # group's importance relative to its layer's mean) until the convs the paper counts reach
    # target_compression, each layer removing between min_layer_ratio and max_layer_ratio of its
    # groups; connectivity_ratio and layer_ratios are then unused. "erk": the same target and
    # bounds, each layer keeping a share of its kernel groups proportional to
    # (C_in + C_out) / (C_in * C_out) (Erdos-Renyi, as RigL allocates): narrow layers keep more.
    allocation: Literal["uniform", "global", "erk"] = "uniform"
    target_compression: float = Field(8.0, gt=1.0)
    min_layer_ratio: float = Field(0.3, ge=0.0, lt=1.0)
    max_layer_ratio: float = Field(0.9, ge=0.0, lt=1.0)
    # Output-channel block size B (kernels of one block share pattern and connectivity);
    # "auto" = 16 where it divides C_out, else the largest of 8, 4, 2, 1 that does.
    block_size: int | Literal["auto"] = "auto"
    layer_block_sizes: dict[str, int] = {}
    # Patterns: "dynamic" generates library_size patterns from the model's own importance;
    # a registered name (clicktrain4/8/12) uses that fixed library.
    patterns: str = "dynamic"
    library_size: int = Field(8, ge=1, le=126)
    require_centre: bool = True
    # When: epochs, and how many batches the importance estimate sums over.
    select_epoch: int = Field(1, ge=0)
    hard_prune_epoch: int = Field(3, ge=0)
    importance_batches: int = Field(8, ge=1)
    lasso: float = Field(1e-2, ge=0.0)
    # "ramp": the lasso coefficient grows linearly from 0 to lasso over the lasso phase.
    lasso_schedule: Literal["constant", "ramp"] = "constant"
    # Re-select patterns and connectivity every this many epochs of the lasso phase (0 = never).
    reselect_every: int = Field(0, ge=0)
    # Regrowth in the hard phase (RigL-style): at the start of every regrow_every-th epoch after
    # the hard prune, each layer swaps a share of its kept kernel groups, the weakest by weight
    # magnitude, for as many removed ones with the largest squared gradient (each taking the
    # library pattern that holds most of it; their weights start at 0). The share is
    # regrow_fraction, decayed by a cosine that reaches 0 at the end of training. 0 = never.
    regrow_every: int = Field(0, ge=0)
    regrow_fraction: float = Field(0.3, gt=0.0, le=1.0)
    # Distillation from the model at selection (end of the dense warm-up) in the lasso and hard
    # phases: loss = (1 - alpha) * CE + alpha * T^2 * KL(teacher || student) at temperature T.
    distill_alpha: float = Field(0.0, ge=0.0, le=1.0)
    distill_temperature: float = Field(4.0, gt=0.0)
    # Mixup (alpha) in the hard-pruning phase, as the authors' code does; 0 = off.
    mixup_alpha: float = Field(0.0, ge=0.0)
    # Method-specific settings ([pruning.prunetrain], [pruning.admm]).
    prunetrain: PruneTrainConfig = PruneTrainConfig()
    admm: AdmmConfig = AdmmConfig()

    @field_validator("patterns")
    @classmethod
    def _known_library(cls, value: str) -> str:
        if value != "dynamic" and value not in PATTERN_LIBRARIES:
            known = ", ".join(["dynamic", *PATTERN_LIBRARIES.names()])
            raise ValueError(f"unknown pattern library {value!r}; known: {known}")
        return value

    @field_validator("layer_ratios")
    @classmethod
    def _ratios_in_range(cls, value: dict[str, float]) -> dict[str, float]:
        for glob, ratio in value.items():
            if not 0.0 <= ratio < 1.0:
                raise ValueError(f"ratio for {glob!r} must be in [0, 1), got {ratio}")
        return value

    @field_validator("block_size")
    @classmethod
    def _block_positive(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError(f"block_size must be >= 1 or 'auto', got {value}")
        return value

    @field_validator("layer_block_sizes")
    @classmethod
    def _blocks_positive(cls, value: dict[str, int]) -> dict[str, int]:
        bad = {glob: size for glob, size in value.items() if size < 1}
        if bad:
            raise ValueError(f"block sizes must be >= 1, got {bad}")
        return value

    @model_validator(mode="after")
    def _levers_fit(self) -> "PruningConfig":
        if self.method != "clicktrain":
            used = [f for f, off in CLICKTRAIN_LEVERS.items() if getattr(self, f) != off]
            if used:
                raise ValueError(f"pruning.{used[0]} is a ClickTrain lever; method "
                                 f"{self.method!r} does not use it")
        if self.allocation != "uniform" and self.layer_ratios:
            raise ValueError(f"pruning.layer_ratios sets ratios by hand, allocation "
                             f"{self.allocation!r} chooses them: give one or the other")
        if self.min_layer_ratio > self.max_layer_ratio:
            raise ValueError(f"pruning.min_layer_ratio ({self.min_layer_ratio}) must be <= "
                             f"max_layer_ratio ({self.max_layer_ratio})")
        if self.reselect_every and self.select_epoch + self.reselect_every >= self.hard_prune_epoch:
            raise ValueError(f"pruning.reselect_every ({self.reselect_every}) re-selects at "
                             f"select_epoch + {self.reselect_every}, which must be before "
                             f"hard_prune_epoch ({self.hard_prune_epoch})")
        return self

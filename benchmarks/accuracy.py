"""Issue #15's accuracy tables: one resumable runner for every accuracy experiment.

What it measures, per run (one row at one seed): final and best test accuracy (%), conv
compression as the paper counts (every conv but the 1x1 shortcuts; ``paper_conv_compression`` of
the run's last epoch in ``metrics.jsonl``), training FLOPs, and the wall time of the training
process end to end (interpreter start-up, data loading, every epoch, evaluation). PruneTrain rows
also record the channels removed and the training FLOPs as a share of the same run's first epoch
(the unshrunk model) repeated over every epoch.

Experiments are the rows of ``STUDIES`` below: each is a base recipe plus dotted-key overrides, a
seed (or several), and optionally ``weights_from``: start from another row's final checkpoint
(``model.weights``; the row waits for that one). Every recipe is validated by the project's
parser before anything trains; a row it rejects (say, a field that has not landed yet) is
reported "pending: <reason>" and the other rows still run.

Each run is its own process (``python -m clicktrain_deploy train --config <folder>/recipe.yaml
--resume --quiet``) at ``schedule.threads = --threads`` (1), ``--jobs`` (2) at a time, in
``--runs-dir``/<row>/seed<k> (default runs/accuracy), which also holds the recipe it ran, its log
(``train.log``) and ``row.json`` (the row's identity and the timed segments of its process).
Resumable: a run recorded in ``<out>.json`` with the same recipe is skipped; a folder holding
checkpoints of an interrupted run resumes from the newest one (the trainer's ``--resume``), and
its wall time is the sum of its process's segments (``resumed: true``; the time an interruption
lost is in it; each segment's start epoch, wall time and load are in ``segments``). A folder
whose run had another recipe is moved aside (``<folder>.superseded-<time>``), never deleted.
Ctrl-C or SIGTERM stops the children, records their segments and leaves the JSON valid (every
write is atomic). A run that fails (its log's last error is shown) is retried on the next run.

Wall times: with ``--jobs 2`` two 1-thread runs share the machine (and whatever else runs on it),
so a run's wall time depends on what ran beside it. Compare wall times only between rows run side
by side (same date, ``cpu`` and ``load_average`` in the JSON), never across invocations.

Results: ``<out>.json`` (default benchmarks/results/accuracy.json) = {"runs": [...]}, one record
per finished run, and ``<out>.md``, rewritten from it after each finished run: one table per study,
rows in definition order, pending rows as pending.

    .venv/bin/python benchmarks/accuracy.py --list                     # rows and their status
    .venv/bin/python benchmarks/accuracy.py --dry-run                  # validate every recipe
    .venv/bin/python benchmarks/accuracy.py --study ablation10         # 13 rows x 10 epochs
    .venv/bin/python benchmarks/accuracy.py --study pretrained         # dense 5 -> clicktrain 5 vs 10
    .venv/bin/python benchmarks/accuracy.py --study bar30              # 2 rows x 2 seeds x 30 epochs
    .venv/bin/python benchmarks/accuracy.py --study admm_fair          # ADMM 10 + 3 + 4 epochs
    .venv/bin/python benchmarks/accuracy.py --study prunetrain_sweep   # 4 penalty ratios x 10 epochs
    .venv/bin/python benchmarks/accuracy.py --row a10-dense --row a10-clicktrain --jobs 2

Rows shared by studies (``a10-dense``, ``a10-clicktrain``) run once. Re-running a command after an
interruption continues where it stopped.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import fcntl
import hashlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from clicktrain_deploy.config import Recipe, parse_recipe, read_recipe_file
from clicktrain_deploy.errors import ClickTrainError, RecipeError
from clicktrain_deploy.fileio import atomic_write_json, atomic_write_text
from clicktrain_deploy.runfolder import RunFolder
from clicktrain_deploy.train.checkpoint import list_checkpoints
from clicktrain_deploy.train.trainer import RESUME_IGNORED

from training_bar import _cpu_name  # noqa: E402  (same folder)

REPO = Path(__file__).resolve().parents[1]
MAIN = "recipes/fashion_resnet20.toml"
ADMM = "recipes/fashion_resnet20_admm.toml"
PRUNETRAIN = "recipes/fashion_resnet20_prunetrain.toml"
STATE = "row.json"          # in a run folder: identity and timed segments of the run's process
RECIPE_FILE = "recipe.yaml"  # in a run folder: the resolved recipe the process trains
HEARTBEAT_S = 15.0           # a running segment's wall time is saved this often (a hard kill loses less)
POLL_S = 0.5


@dataclass(frozen=True)
class Row:
    """One experiment: ``recipe`` (relative to the repository) with ``overrides`` ("pruning.lasso":
    3e-2, ...), at each of ``seeds``; ``weights_from``: the name of a row whose final checkpoint
    (same seed) becomes ``model.weights``."""

    name: str
    overrides: dict = field(default_factory=dict)
    seeds: tuple[int, ...] = (0,)
    recipe: str = MAIN
    weights_from: str | None = None
    note: str = ""


@dataclass(frozen=True)
class Study:
    """A table: its rows (a ``Row`` defined here, or the name of a row an earlier study defines)
    and the row Δ is taken against (default: the study's first dense row)."""

    name: str
    title: str
    rows: tuple
    reference: str | None = None


DENSE = {"pruning.method": "dense"}

STUDIES: list[Study] = [
    Study("ablation10", "Ablations: full Fashion-MNIST, ResNet-20, 10 epochs, B=16 (main recipe), seed 0", (
        Row("a10-dense", DENSE),
        Row("a10-clicktrain", {}, note="main recipe as is: select 1, hard 3"),
        Row("a10-phases-30-40-30", {"pruning.select_epoch": 3, "pruning.hard_prune_epoch": 7}),
        Row("a10-lasso-3e-2", {"pruning.lasso": 3e-2}),
        Row("a10-lasso-ramp", {"pruning.lasso_schedule": "ramp"}),
        Row("a10-global-8x", {"pruning.allocation": "global", "pruning.target_compression": 8.0}),
        Row("a10-distill-0.5", {"pruning.distill_alpha": 0.5, "pruning.distill_temperature": 4.0}),
        Row("a10-reselect-1", {"pruning.reselect_every": 1}),
        Row("a10-combined", {"pruning.select_epoch": 3, "pruning.hard_prune_epoch": 7,
                             "pruning.allocation": "global", "pruning.target_compression": 8.0,
                             "pruning.distill_alpha": 0.5, "pruning.distill_temperature": 4.0},
            note="phases 30/40/30 + global allocation + distillation"),
    )),
    # Run on another machine (AMD EPYC): float order differs by CPU (the same recipe's epoch-1
    # accuracy is 85.27% here, 85.88% on the Xeon), so these rows compare with the dense run and
    # the main recipe re-run beside them, never with ablation10's rows.
    Study("ablation10_epyc", "Ablations on AMD EPYC: full Fashion-MNIST, ResNet-20, 10 epochs, B=16 "
          "(main recipe), seed 0, against dense and the main recipe re-run on this CPU", (
        Row("a10-dense-rerun", DENSE, note="a10-dense's recipe, on this CPU"),
        Row("a10-clicktrain-rerun", {}, note="the main recipe as is, on this CPU"),
        Row("a10-importance-32", {"pruning.importance_batches": 32}),
        Row("a10-mixup-0.2", {"pruning.mixup_alpha": 0.2}),
        # every other row recalibrates BatchNorm on 20 batches before each evaluation (the
        # default schedule.bn_recalibration_batches); this row measures what that is worth
        Row("a10-no-bn-recal", {"schedule.bn_recalibration_batches": 0}),
        # ratios from the layers' shapes (Erdos-Renyi): the 16-channel stage keeps ~69% of its
        # kernel groups, the 64-channel one ~21%, where uniform keeps 28% everywhere
        Row("a10-erk-8x", {"pruning.allocation": "erk", "pruning.target_compression": 8.0}),
        Row("a10-erk-8x-floor0", {"pruning.allocation": "erk", "pruning.target_compression": 8.0,
                                  "pruning.min_layer_ratio": 0.0}),
        # how the gap grows with compression: half the kernel groups removed (~4.5x) instead of 72%
        Row("a10-conn-0.5", {"pruning.connectivity_ratio": 0.5}, note="connectivity 0.5: ~4.5x"),
        Row("a10-patterns-only", {"pruning.connectivity_ratio": 0.0},
            note="no kernel removed: what the 4-of-9 patterns alone cost (~2.2x)"),
        # kernel groups chosen at selection (epoch 1) can be swapped in the hard phase: every epoch
        # the weakest kept groups by magnitude for the removed ones with the largest gradient
        Row("a10-regrow-1", {"pruning.regrow_every": 1, "pruning.regrow_fraction": 0.3},
            note="regrowth every hard epoch, 30% of kept groups at first, cosine decay"),
        # the phases row lost 0.79 points with 3 hard epochs instead of 7: does an 8th help?
        Row("a10-hard-2", {"pruning.hard_prune_epoch": 2}, note="select 1, hard prune 2: 10/10/80"),
    )),
    Study("pretrained", "Issue #14: ClickTrain from a trained dense model (5 + 5 epochs) vs from "
          "scratch (10), seed 0", (
        "a10-dense",
        Row("pre-dense5", {**DENSE, "schedule.epochs": 5}),
        Row("pre-clicktrain5-from-dense5", {"schedule.epochs": 5, "pruning.select_epoch": 0,
                                            "pruning.hard_prune_epoch": 2},
            weights_from="pre-dense5", note="model.weights = pre-dense5's final checkpoint"),
        "a10-clicktrain",
    ), reference="a10-dense"),
    # phases as the main recipe's 10/20/70: at 10 epochs the paper's 30/40/30 lost 0.79 points
    Study("bar30", "Issue #15 bar 1: dense vs ClickTrain, 30 epochs, seeds 0 and 1", (
        Row("b30-dense", {**DENSE, "schedule.epochs": 30}, seeds=(0, 1)),
        Row("b30-clicktrain", {"schedule.epochs": 30, "pruning.select_epoch": 3,
                               "pruning.hard_prune_epoch": 9}, seeds=(0, 1),
            note="main recipe's phases 10/20/70: select 3, hard prune 9"),
    )),
    Study("admm_fair", "Issue #15 bar 2: ADMM after training whose dense phase is as long as "
          "ClickTrain's whole run (10-epoch budget), seed 0", (
        "a10-dense-rerun",
        "a10-clicktrain-rerun",
        # As benchmarks/method_comparison.py schedules it: a finished dense run (its own cosine
        # over the 10 dense epochs), then ADMM and masked retraining, LR restarted at 0.01 each.
        # Twice ClickTrain's 10 epochs, as the bar 2 sets it.
        Row("admm20", {"schedule.epochs": 20, "schedule.restarts": [10, 15],
                       "schedule.restart_lr": 0.01, "pruning.select_epoch": 10,
                       "pruning.hard_prune_epoch": 15},
            recipe=ADMM, note="10 dense + 5 ADMM + 5 retraining epochs: twice ClickTrain's 10"),
    )),
    Study("prunetrain_sweep", "Issue #15 bar 3: PruneTrain, 10 epochs, penalty ratio sweep, seed 0", (
        "a10-dense-rerun",
        "a10-clicktrain-rerun",
        *(Row(f"pt10-ratio-{r}", {"pruning.prunetrain.penalty_ratio": r}, recipe=PRUNETRAIN)
          for r in (0.2, 0.4, 0.6, 0.8)),
    )),
    Study("sparse_training", "Issue #16: whole 10-epoch runs, channels_last, dense vs ClickTrain with the "
          "hard phase on our kernels, run side by side, seed 0", (
        Row("s10-dense-cl", {**DENSE, "schedule.memory_format": "channels_last"}),
        Row("s10-clicktrain-kernels", {"schedule.memory_format": "channels_last", "schedule.sparse_kernels": True},
            note="main recipe; pattern convs on our kernels from the hard prune where measured faster"),
    )),
    # the same pair on AMD EPYC (wall times compare only within one CPU, side by side)
    Study("sparse_training_epyc", "Issue #16 on AMD EPYC: the sparse_training pair re-run side by side, "
          "1 thread each, seed 0", (
        Row("s10-dense-cl-rerun", {**DENSE, "schedule.memory_format": "channels_last"},
            note="s10-dense-cl's recipe, on this CPU"),
        Row("s10-clicktrain-kernels-rerun", {"schedule.memory_format": "channels_last",
                                             "schedule.sparse_kernels": True},
            note="s10-clicktrain-kernels' recipe, on this CPU (today's kernels)"),
    )),
]


# -- rows and their recipes ---------------------------------------------------------------------

class Catalog:
    """The studies and the rows they define, in definition order, checked for consistency."""

    def __init__(self, studies: list[Study]) -> None:
        self.studies = {}
        self.rows: dict[str, Row] = {}
        self.home: dict[str, str] = {}
        self.member: dict[str, list[str]] = {}
        for study in studies:
            if study.name in self.studies:
                raise ValueError(f"study {study.name!r} defined twice")
            self.studies[study.name] = study
            for item in study.rows:
                name = item.name if isinstance(item, Row) else item
                if isinstance(item, Row):
                    if name in self.rows:
                        raise ValueError(f"row {name!r} defined twice")
                    self.rows[name], self.home[name] = item, study.name
                elif name not in self.rows:
                    raise ValueError(f"study {study.name}: row {name!r} is not defined by an earlier study")
                self.member.setdefault(name, []).append(study.name)
            if study.reference is not None and study.reference not in self.row_names(study):
                raise ValueError(f"study {study.name}: reference {study.reference!r} is not one of its rows")
        for row in self.rows.values():
            if row.weights_from is not None and (row.weights_from not in self.rows
                                                 or row.weights_from == row.name):
                raise ValueError(f"row {row.name}: weights_from {row.weights_from!r} is not another row")

    def row_names(self, study: Study) -> list[str]:
        return [item.name if isinstance(item, Row) else item for item in study.rows]

    def order(self) -> list[str]:
        return list(self.rows)


def _set_dotted(raw: dict, dotted: str, value) -> None:
    node, parts = raw, dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RecipeError(f"{dotted}: {part} is not a table")
    node[parts[-1]] = copy.deepcopy(value)


def _get_dotted(raw: dict, dotted: str, default=None):
    node = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


# What a run's identity leaves out: what the trainer's resume ignores (where it runs and how
# fast, not what it trains), and the deploy stages, which come after training.
_IGNORED = (*RESUME_IGNORED, "deploy")
# Recipe fields added after runs were recorded, with the value that trains as before the field
# existed: at that value they are left out, so the recorded runs keep their identity.
_ADDED_LATER = {"pruning.regrow_every": 0, "pruning.regrow_fraction": 0.3}


@dataclass
class Run:
    """One row at one seed, resolved: its folder, recipe (None when rejected) and identity."""

    row: Row
    seed: int
    study: str
    studies: list[str]
    folder: Path
    method: str
    block: object = "auto"
    epochs: int | None = None
    source: "Run | None" = None
    recipe: Recipe | None = None
    error: str | None = None
    identity: str | None = None

    @property
    def key(self) -> tuple[str, int]:
        return self.row.name, self.seed

    @property
    def label(self) -> str:
        return f"{self.row.name} seed {self.seed}"

    @property
    def final_checkpoint(self) -> Path:
        return RunFolder(self.folder).final_checkpoint(self.epochs or 1)


def _identity(dump: dict, source: Run | None) -> str:
    d = copy.deepcopy(dump)
    for dotted in (*_IGNORED, *_ADDED_LATER):
        *parents, last = dotted.split(".")
        node = d
        for part in parents:
            node = node.get(part, {})
        if dotted not in _ADDED_LATER or node.get(last) == _ADDED_LATER[dotted]:
            node.pop(last, None)
    if source is not None:  # the weights' path is the same whatever trained them: name that
        d["model"]["weights"] = {"row": source.row.name, "seed": source.seed, "identity": source.identity}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def plan(catalog: Catalog, names: list[str], runs_dir: Path, threads: int) -> dict[tuple, Run]:
    """Resolve every seed of the named rows (and the rows they take weights from), in definition
    order; a recipe the parser rejects leaves the run with ``error`` set."""
    runs: dict[tuple, Run] = {}

    def resolve(name: str, seed: int) -> Run:
        if (name, seed) in runs:
            return runs[(name, seed)]
        row = catalog.rows[name]
        path = Path(row.recipe) if Path(row.recipe).is_absolute() else REPO / row.recipe
        folder = runs_dir / row.name / f"seed{seed}"
        run = Run(row, seed, catalog.home[name], catalog.member[name], folder, method="?")
        try:
            raw = read_recipe_file(path)
            raw["output_dir"], raw["seed"] = str(folder), seed
            raw.setdefault("schedule", {})["threads"] = threads
            for dotted, value in row.overrides.items():
                _set_dotted(raw, dotted, value)
            run.method = str(_get_dotted(raw, "pruning.method", "clicktrain"))
            run.epochs = _get_dotted(raw, "schedule.epochs")
            run.block = _get_dotted(raw, "pruning.block_size", "auto")
            if row.weights_from is not None:
                src_row = catalog.rows[row.weights_from]
                src_seed = seed if seed in src_row.seeds else src_row.seeds[0]
                run.source = resolve(row.weights_from, src_seed)
                if run.source.error is not None:
                    raise RecipeError(f"waits for {run.source.label}, which is pending "
                                      f"({run.source.error})")
                _set_dotted(raw, "model.weights", str(run.source.final_checkpoint))
            recipe = parse_recipe(raw, row.name, base_dir=path.parent)
            run.recipe, run.epochs = recipe, recipe.schedule.epochs
            run.identity = _identity(recipe.model_dump(), run.source)
        except OSError as exc:
            run.error = f"{path}: {exc}"
        except ClickTrainError as exc:
            run.error = "; ".join(line.removeprefix(f"{row.name}: ") for line in str(exc).splitlines())
        runs[(name, seed)] = run
        return run

    for name in names:
        for seed in catalog.rows[name].seeds:
            resolve(name, seed)
    order = {n: i for i, n in enumerate(catalog.order())}
    return dict(sorted(runs.items(), key=lambda kv: (order[kv[0][0]], kv[0][1])))


def start_order(runs: list[Run]) -> list[Run]:
    """Seed-major, definition order within a seed: with 2 jobs one seed's rows (dense beside
    ClickTrain) run side by side, so their wall times compare."""
    return sorted(runs, key=lambda run: run.seed)


# -- run folders ------------------------------------------------------------------------------

def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _metrics(folder: Path) -> list[dict]:
    try:
        text = RunFolder(folder).metrics.read_text()
    except OSError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def folder_state(run: Run) -> tuple[str, int]:
    """("empty" | "stale" | "partial" | "complete", epochs done) of the run's folder; "stale":
    it holds a run of another recipe (or one this script did not start)."""
    checkpoints = list_checkpoints(run.folder)
    state = _read_json(run.folder / STATE)
    if not checkpoints:
        return "empty", 0
    if not state or state.get("identity") != run.identity:
        return "stale", 0
    done = int(checkpoints[-1].stem.split("-")[1]) + 1
    complete = (run.final_checkpoint.is_file() and RunFolder(run.folder).sparsity.is_file()
                and len(_metrics(run.folder)) == run.epochs)
    return ("complete" if complete else "partial"), done


def _block_size(sparsity: dict):
    sizes = sorted({layer["block_size"] for layer in sparsity.get("layers", [])})
    return None if not sizes else sizes[0] if len(sizes) == 1 else sizes


def _prunetrain_channels(folder: Path) -> dict:
    from clicktrain_deploy.train import load_checkpoint, restore_model

    _, method = restore_model(load_checkpoint(folder))
    total = sum(method.widths.values())
    kept = sum(len(ids) for ids in method.channels.values())
    return {"channels_removed": total - kept, "channels_total": total}


def collect(run: Run) -> dict:
    """The JSON record of a finished run, from its folder's files."""
    folder = run.folder
    metrics = _metrics(folder)
    sparsity = json.loads(RunFolder(folder).sparsity.read_text())
    ran = yaml.safe_load((folder / RECIPE_FILE).read_text())
    segments = (_read_json(folder / STATE) or {}).get("segments", [])
    first = metrics[0]["train_flops"] if metrics else 0
    record = {
        "row": run.row.name, "study": run.study, "studies": run.studies, "seed": run.seed,
        "method": ran["pruning"]["method"], "block_size": _block_size(sparsity),
        "epochs": ran["schedule"]["epochs"],
        "test_accuracy": metrics[-1]["test_accuracy"],
        "best_accuracy": max(m["test_accuracy"] for m in metrics),
        "accuracy_per_epoch": [m["test_accuracy"] for m in metrics],
        "compression": metrics[-1]["paper_conv_compression"],
        "train_flops": sum(m["train_flops"] for m in metrics),
        # against the unshrunk model of the first epoch run every epoch (only when it started fresh)
        "train_flops_share": (sum(m["train_flops"] for m in metrics) / (first * len(metrics))
                              if first and ran["model"]["weights"] is None else None),
        "wall_s": sum(s["wall_s"] for s in segments) if segments else None,
        "resumed": len(segments) > 1 or any(s.get("from_epoch") is not None for s in segments),
        "segments": segments,
        "cpu": segments[0]["cpu"] if segments else _cpu_name(),
        "date": (segments[-1].get("finished") or segments[-1]["started"])[:10] if segments
        else datetime.date.today().isoformat(),
        "load_average": segments[0]["load_average"] if segments else None,
        "threads": ran["schedule"]["threads"],
        "weights_from": ({"row": run.source.row.name, "seed": run.source.seed,
                          "checkpoint": ran["model"]["weights"]} if run.source else None),
        "identity": run.identity,
        "folder": str(folder),
        "recipe": ran,
    }
    if record["method"] == "prunetrain":
        record.update(_prunetrain_channels(folder))
    return record


# -- results ----------------------------------------------------------------------------------

def load_records(path: Path) -> dict[tuple, dict]:
    data = _read_json(path) or {}
    return {(r["row"], r["seed"]): r for r in data.get("runs", [])}


def save_record(path: Path, record: dict, order: list[str]) -> None:
    """Add ``record`` to the JSON on disk (re-read now: another invocation may have added runs),
    replacing an earlier one of the same row and seed; runs in definition order."""
    records = load_records(path)
    records[(record["row"], record["seed"])] = record
    rank = {n: i for i, n in enumerate(order)}
    runs = sorted(records.values(), key=lambda r: (rank.get(r["row"], len(rank)), r["row"], r["seed"]))
    atomic_write_json(path, {"runs": runs})


def status(run: Run, records: dict[tuple, dict]) -> tuple[str, str]:
    """(kind, text) of a run without touching it: done, pending (rejected recipe), or where its
    folder stands."""
    if run.error is not None:
        return "pending", f"pending: {run.error}"
    record = records.get(run.key)
    if record is not None and record.get("identity") == run.identity:
        return "done", (f"done: {record['test_accuracy']:.2f}%, {record['compression']:.2f}x, "
                        f"{_seconds(record['wall_s'])} ({record['date']})")
    state, done = folder_state(run)
    last = ((_read_json(run.folder / STATE) or {}).get("segments") or [None])[-1]
    failed = (state in ("empty", "partial") and last and last.get("ended")
              and last.get("exit_code") not in (0, None) and not last.get("interrupted"))
    if failed:
        return "todo", (f"failed last time (exit {last['exit_code']}, see {run.folder / 'train.log'}); "
                        f"{done}/{run.epochs} epochs kept, retried on the next run")
    if state == "complete":
        return "todo", "finished, not yet recorded (recorded on the next run)"
    if state == "partial":
        return "todo", f"partial: {done}/{run.epochs} epochs, resumes from its checkpoint"
    if state == "empty" and last:
        return "todo", "interrupted before its first checkpoint; starts over"
    if state == "stale":
        return "todo", "folder holds a run of another recipe (moved aside when this one starts)"
    if record is not None:
        return "todo", "recorded run had another recipe; not run since"
    return "todo", "not run"


# -- markdown ---------------------------------------------------------------------------------

def _seconds(value) -> str:
    return "-" if value is None else f"{value:.0f} s"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(catalog: Catalog, runs: dict[tuple, Run], records: dict[tuple, dict]) -> str:
    lines = ["# Accuracy tables", "",
             "Written by `benchmarks/accuracy.py` from `accuracy.json` after each finished run. "
             "Test accuracy: final epoch, %. Δ: mean over seeds of (row - the study's reference row "
             "at the same seed), points. Compression: conv weights as the paper counts (no 1x1 "
             "shortcuts). Wall time: the training process end to end, per seed (* resumed: the sum "
             "of its segments). Runs go two at a time at 1 thread each, sharing the machine: "
             "compare wall times only between rows run side by side (date, CPU and load average "
             "per run are in the JSON).", ""]
    for study in catalog.studies.values():
        names = catalog.row_names(study)
        reference = study.reference or next(
            (n for n in names if runs[(n, catalog.rows[n].seeds[0])].method == "dense"), None)

        def done(name: str, seed: int) -> dict | None:
            run = runs.get((name, seed))
            record = records.get((name, seed))
            ok = run is not None and run.error is None and record and record.get("identity") == run.identity
            return record if ok else None

        extra = any(runs[(n, catalog.rows[n].seeds[0])].method == "prunetrain" for n in names)
        head = ["row", "method", "B", "epochs", "seeds", "test acc per seed", "mean",
                f"Δ vs {reference or 'dense'}", "compression", "wall time"]
        if extra:
            head += ["channels removed", "training FLOPs vs unpruned"]
        lines += [f"## {study.name}", "", study.title, "", "| " + " | ".join(head) + " |",
                  "|" + "---|" * len(head)]
        used = []
        for name in names:
            row = catalog.rows[name]
            seed_runs = [runs[(name, s)] for s in row.seeds]
            recs = [done(name, s) for s in row.seeds]
            used += [r for r in recs if r]
            first = seed_runs[0]
            block = next((r["block_size"] for r in recs if r), None)
            if block is None:
                b = "-" if first.method in ("dense", "prunetrain") else str(first.block)
            else:
                b = "/".join(map(str, block)) if isinstance(block, list) else str(block)
            all_done = all(recs)
            per_seed = []
            for run, rec in zip(seed_runs, recs):
                text = status(run, records)[1]
                if rec:
                    per_seed.append(f"{rec['test_accuracy']:.2f}")
                elif run.error or text.startswith("failed"):
                    per_seed.append(_cell(text.partition(";")[0] if not run.error else text))
                else:
                    per_seed.append("pending")
            if len(row.seeds) > 1:
                per_seed = [f"s{s}: {text}" for s, text in zip(row.seeds, per_seed)]
            if all_done:
                mean = f"{statistics.mean(r['test_accuracy'] for r in recs):.2f}%"
                compression = f"{statistics.mean(r['compression'] for r in recs):.2f}x"
                refs = [done(reference, s) if reference else None for s in row.seeds]
                if reference is None:
                    delta = "-"
                elif name == reference:
                    delta = "reference"
                elif reference and all(refs):
                    gaps = [r["test_accuracy"] - f["test_accuracy"] for r, f in zip(recs, refs)]
                    delta = f"{statistics.mean(gaps):+.2f}"
                else:
                    delta = "pending"
            else:
                mean = compression = delta = "pending"
            wall = " / ".join((_seconds(r["wall_s"]) + ("*" if r["resumed"] else "")) if r else "pending"
                              for r in recs)
            cells = [name, first.method, b, str(first.epochs or "?"), ", ".join(map(str, row.seeds)),
                     " / ".join(per_seed), mean, delta, compression, wall]
            if extra:
                if first.method == "prunetrain" and all_done:
                    cells += [" / ".join(f"{r['channels_removed']}/{r['channels_total']} "
                                         f"({100 * r['channels_removed'] / r['channels_total']:.1f}%)"
                                         for r in recs),
                              " / ".join("-" if r["train_flops_share"] is None
                                         else f"{100 * r['train_flops_share']:.1f}%" for r in recs)]
                else:
                    cells += ["-" if first.method != "prunetrain" else "pending"] * 2
            lines.append("| " + " | ".join(cells) + " |")
        if used:
            dates = sorted({r["date"] for r in used})
            loads = [r["load_average"][0] for r in used if r.get("load_average")]
            lines += ["", f"Ran on {', '.join(sorted({r['cpu'] for r in used}))}, "
                      f"{dates[0]}{' to ' + dates[-1] if len(dates) > 1 else ''}"
                      + (f", 1-minute load average at start {min(loads):.2f} to {max(loads):.2f}"
                         if loads else "") + "."]
        notes = [f"{n}: {catalog.rows[n].note}" for n in names if catalog.rows[n].note]
        if notes:
            lines += [""] + [f"- {_cell(n)}" for n in notes]
        lines.append("")
    return "\n".join(lines)


# -- running ----------------------------------------------------------------------------------

def _die_with_parent() -> None:
    """In the child: get SIGTERM when the runner dies, even by SIGKILL (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


@dataclass
class _Active:
    run: Run
    proc: subprocess.Popen
    lock: object
    log: object
    started: float
    state: dict
    beat: float


class Runner:
    def __init__(self, catalog: Catalog, runs: dict[tuple, Run], out: Path, jobs: int) -> None:
        self.catalog, self.runs, self.jobs = catalog, runs, jobs
        self.json_path, self.md_path = out.with_suffix(".json"), out.with_suffix(".md")
        self.result: dict[tuple, str] = {}  # key -> "done" | "failed: ..." | "pending: ..." | ...

    def write_markdown(self) -> None:
        atomic_write_text(self.md_path, markdown(self.catalog, self.runs, load_records(self.json_path)))

    def _record(self, run: Run) -> None:
        record = collect(run)
        save_record(self.json_path, record, self.catalog.order())
        self.result[run.key] = "done"
        print(f"done   {run.label}: {record['test_accuracy']:.2f}% test, {record['compression']:.2f}x, "
              f"{_seconds(record['wall_s'])}{' (resumed)' if record['resumed'] else ''}", flush=True)
        self.write_markdown()

    def _start(self, run: Run) -> _Active | None:
        folder = run.folder
        folder.mkdir(parents=True, exist_ok=True)
        lock = open(folder / ".lock", "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            self.result[run.key] = "running in another invocation (folder locked)"
            print(f"busy   {run.label}: {folder} is being trained by another invocation", flush=True)
            return None
        state = _read_json(folder / STATE)
        if list_checkpoints(folder) and (not state or state.get("identity") != run.identity):
            fcntl.flock(lock, fcntl.LOCK_UN)
            lock.close()
            aside = folder.with_name(f"{folder.name}.superseded-{datetime.datetime.now():%Y%m%d-%H%M%S}")
            folder.rename(aside)
            print(f"moved  {folder} (a run of another recipe) to {aside.name}", flush=True)
            return self._start(run)
        if not state or state.get("identity") != run.identity:
            state = {"row": run.row.name, "seed": run.seed, "identity": run.identity, "segments": []}
        atomic_write_text(folder / RECIPE_FILE, yaml.safe_dump(run.recipe.model_dump(), sort_keys=False))
        checkpoints = list_checkpoints(folder)
        from_epoch = int(checkpoints[-1].stem.split("-")[1]) if checkpoints else None
        state["segments"].append({"started": _now(), "finished": None, "cpu": _cpu_name(),
                                  "load_average": [round(x, 2) for x in os.getloadavg()],
                                  "from_epoch": from_epoch, "wall_s": 0.0, "ended": False,
                                  "exit_code": None})
        atomic_write_json(folder / STATE, state)
        log = open(folder / "train.log", "a")
        log.write(f"--- {_now()} {run.label}"
                  + (f" resuming after epoch {from_epoch}" if from_epoch is not None else "") + "\n")
        log.flush()
        threads = str(run.recipe.schedule.threads or 1)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": threads,
               "MKL_NUM_THREADS": threads}
        command = [sys.executable, "-m", "clicktrain_deploy", "train", "--config",
                   str(folder / RECIPE_FILE), "--resume", "--quiet"]
        started = time.perf_counter()
        proc = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, preexec_fn=_die_with_parent)
        print(f"start  {run.label}" + (f" (resumes after epoch {from_epoch})" if from_epoch is not None
                                        else "") + f" -> {folder}", flush=True)
        return _Active(run, proc, lock, log, started, state, started)

    def _end_segment(self, active: _Active, code: int | None, interrupted: bool = False) -> None:
        segment = active.state["segments"][-1]
        segment.update(wall_s=time.perf_counter() - active.started, finished=_now(), ended=True,
                       exit_code=code)
        if interrupted:
            segment["interrupted"] = True
        atomic_write_json(active.run.folder / STATE, active.state)
        active.log.close()
        fcntl.flock(active.lock, fcntl.LOCK_UN)
        active.lock.close()

    def _failure(self, run: Run) -> str:
        try:
            tail = [l for l in (run.folder / "train.log").read_text().splitlines() if l.strip()]
        except OSError:
            tail = []
        errors = [l for l in tail if "error" in l.lower()]
        return (errors or tail or ["no output"])[-1].strip()

    def execute(self, todo: list[Run]) -> None:
        queue = list(todo)
        active: dict[tuple, _Active] = {}
        try:
            while queue or active:
                for run in list(queue):
                    if len(active) >= self.jobs:
                        break
                    source = run.source
                    if source is not None and self.result.get(source.key) != "done":
                        if source.key in self.result:  # it ended without a result
                            queue.remove(run)
                            self.result[run.key] = (f"pending: waits for {source.label} "
                                                    f"({self.result[source.key]})")
                            print(f"wait   {run.label}: {self.result[run.key]}", flush=True)
                        continue
                    queue.remove(run)
                    started = self._start(run)
                    if started is not None:
                        active[run.key] = started
                for key, a in list(active.items()):
                    code = a.proc.poll()
                    now = time.perf_counter()
                    if code is None:
                        if now - a.beat >= HEARTBEAT_S:
                            a.state["segments"][-1]["wall_s"] = now - a.started
                            atomic_write_json(a.run.folder / STATE, a.state)
                            a.beat = now
                        continue
                    del active[key]
                    self._end_segment(a, code)
                    if code == 0 and folder_state(a.run)[0] == "complete":
                        self._record(a.run)
                    else:
                        log = a.run.folder / "train.log"
                        self.result[key] = f"failed: {self._failure(a.run)} (see {log})"
                        print(f"FAILED {a.run.label}: {self.result[key]}", flush=True)
                        self.write_markdown()
                if active:
                    time.sleep(POLL_S)
        except KeyboardInterrupt:
            for a in active.values():
                try:
                    os.killpg(a.proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            for a in active.values():
                try:
                    a.proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(a.proc.pid, signal.SIGKILL)
                    a.proc.wait()
                self._end_segment(a, a.proc.returncode, interrupted=True)
                print(f"stopped {a.run.label}: resumes from its last checkpoint next time", flush=True)
            self.write_markdown()
            raise


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None, studies: list[Study] | None = None) -> int:
    catalog = Catalog(STUDIES if studies is None else studies)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--study", action="append", default=[], choices=list(catalog.studies),
                        help="run this study's rows (repeatable)")
    parser.add_argument("--row", action="append", default=[], help="run this row (repeatable)")
    parser.add_argument("--all", action="store_true", help="every study")
    parser.add_argument("--list", action="store_true", help="print rows and their status")
    parser.add_argument("--dry-run", action="store_true", help="validate every row's recipe; train nothing")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--threads", type=int, default=1, help="schedule.threads of every run")
    parser.add_argument("--runs-dir", type=Path, default=REPO / "runs" / "accuracy")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "accuracy",
                        help="results path without suffix: writes OUT.json and OUT.md")
    args = parser.parse_args(argv)
    unknown = [r for r in args.row if r not in catalog.rows]
    if unknown:
        parser.error(f"unknown row {unknown[0]!r}; rows: {', '.join(catalog.rows)}")
    if args.jobs < 1 or args.threads < 1:
        parser.error("--jobs and --threads must be >= 1")
    chosen = set(args.row)
    for name in catalog.studies if args.all else args.study:
        chosen |= set(catalog.row_names(catalog.studies[name]))
    if not chosen:
        if not (args.list or args.dry_run):
            parser.error("choose --study NAME, --row NAME or --all (see --list)")
        chosen = set(catalog.rows)
    names = [n for n in catalog.order() if n in chosen]
    runs_dir = args.runs_dir.resolve()
    everything = plan(catalog, catalog.order(), runs_dir, args.threads)  # the tables show every row
    selected = plan(catalog, names, runs_dir, args.threads)
    runs = {k: everything[k] for k in selected}
    records = load_records(args.out.with_suffix(".json"))

    if args.list or args.dry_run:
        width = max(len(r.label) for r in runs.values())
        shown = set(args.study) if (args.study or args.row) and not args.all else set(catalog.studies)
        shown |= {catalog.home[name] for name in args.row}
        for study in catalog.studies.values():
            if study.name not in shown:
                continue
            keys = [k for name in catalog.row_names(study) for k in runs if k[0] == name
                    and (study.name in args.study or not args.study and not args.row or args.all
                         or k[0] in args.row)]
            if not keys:
                continue
            print(f"{study.name}: {study.title}")
            for key in keys:
                run = runs[key]
                if args.dry_run:
                    text = (f"pending: {run.error}" if run.error else
                            f"ok: {run.method}, {run.epochs} epochs, B {run.recipe.pruning.block_size}"
                            + (f", weights from {run.source.label}" if run.source else "")
                            + f" -> {run.folder}")
                else:
                    text = status(run, records)[1]
                print(f"  {run.label:{width}}  {text}")
        return 0

    runner = Runner(catalog, everything, args.out, args.jobs)
    todo = []
    for key, run in runs.items():
        kind, text = status(run, records)
        if kind == "pending":
            runner.result[key] = text
            print(f"{text.split(':')[0]:6s} {run.label}: {text.partition(': ')[2]}", flush=True)
        elif kind == "done":
            runner.result[key] = "done"
            print(f"skip   {run.label}: recorded ({text})", flush=True)
        elif folder_state(run)[0] == "complete":
            runner._record(run)
        else:
            todo.append(run)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        runner.execute(start_order(todo))
    except KeyboardInterrupt:
        print("interrupted: finished runs are recorded; run the same command to continue", flush=True)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    runner.write_markdown()
    failed = [k for k, v in runner.result.items() if v.startswith("failed")]
    pending = [k for k, v in runner.result.items() if not v.startswith(("done", "failed"))]
    print(f"{sum(v == 'done' for v in runner.result.values())} done, {len(pending)} pending, "
          f"{len(failed)} failed; tables in {runner.md_path}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""The training loop, resumable per epoch; the pruning method's hooks run at fixed points of it."""
from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from torch import Tensor, nn

from .. import distributed
from ..config import Recipe, parse_recipe
from ..data import BatchIterator, ImageData, load_data, make_batches
from ..errors import CheckpointError, RecipeError
from ..fileio import atomic_write_json, atomic_write_text
from ..pruning.clicktrain import ConvChoice
from ..pruning.method import EpochContext, PruningMethod, create_method
from ..pruning.report import SparsityReport
from .checkpoint import checkpoint_path, list_checkpoints, load_checkpoint, save_checkpoint
from .flops import TRAINING_PASSES, forward_flops
from .weights import build_recipe_model, check_logits


@dataclass
class TrainResult:
    """What a finished run produced; files are under ``output_dir``."""

    output_dir: Path
    checkpoint: Path
    test_accuracy: float
    report: SparsityReport
    metrics: list[dict]
    model: nn.Module
    pruner: PruningMethod


CONV_SELECTION = "conv_selection.json"


def conv_selection_table(selection: list[ConvChoice]) -> Table:
    """The pruner's choice per conv as a rich table: name, weight shape, taken, reason."""
    taken = sum(c.taken for c in selection)
    table = Table(title=f"pattern pruning takes {taken} of {len(selection)} convs", title_justify="left")
    for column in ("conv", "weight shape", "pruned", "reason"):
        table.add_column(column)
    for c in selection:
        table.add_row(c.name, "x".join(map(str, c.shape)), "[green]yes[/]" if c.taken else "no",
                      c.reason)
    return table


def make_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe,
                   steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step LR multiplier: cosine to 0 over the run, step decay at milestones, or constant.

    With ``schedule.restarts`` the run is cut into segments at those epochs; each later segment
    starts over (cosine over the segment, milestones counted from its start) at ``restart_lr``.
    """
    s = recipe.schedule
    starts = [0, *(r * steps_per_epoch for r in s.restarts)]
    ends = [*starts[1:], s.epochs * steps_per_epoch]
    restart_scale = (s.restart_lr or s.lr) / s.lr

    def factor(step: int) -> float:
        segment = sum(step >= start for start in starts[1:])
        offset, total = step - starts[segment], ends[segment] - starts[segment]
        scale = restart_scale if segment else 1.0
        if s.lr_schedule == "cosine":
            return scale * 0.5 * (1 + math.cos(math.pi * offset / total))
        if s.lr_schedule == "multistep":
            return scale * s.gamma ** sum(offset >= m * steps_per_epoch for m in s.milestones)
        return scale

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def evaluate(model: nn.Module, batches: BatchIterator | distributed.ShardedBatches) -> tuple[float, float]:
    """Mean cross-entropy and top-1 accuracy (%) over a whole split (under torch.distributed,
    over the shards that the ranks pass together)."""
    model.eval()
    loss, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for inputs, labels in batches.epoch(0):
            logits = model(inputs)
            loss += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(1) == labels).sum())
            count += len(labels)
    loss, correct, count = distributed.all_reduce_sums(loss, correct, count)
    return loss / count, 100.0 * correct / count


def optimizer_step(loss: Tensor, optimizer: torch.optim.Optimizer, pruner: PruningMethod | None,
                   phase: str) -> float:
    """One update in a pruning phase: add the method's penalty (group lasso, ADMM), back-propagate,
    step, and let the method act on the weights (masks). Returns the penalty added (0 if none)."""
    penalty = pruner.penalty_term(loss, phase) if pruner else None
    optimizer.zero_grad(set_to_none=True)
    (loss if penalty is None else loss + penalty).backward()
    optimizer.step()
    if pruner:
        pruner.after_step(optimizer)
    return 0.0 if penalty is None else float(penalty.detach())


def distillation_loss(loss: Tensor, logits: Tensor, teacher_logits: Tensor, alpha: float,
                      temperature: float) -> tuple[Tensor, Tensor]:
    """(1 - alpha) * loss + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)), and
    the T^2 * KL term (batch mean). T^2 keeps the soft term's gradients on the scale of the hard
    one's whatever T (Hinton et al.). logits, teacher_logits: (N, classes), the same inputs."""
    t = temperature
    kl = nn.functional.kl_div(nn.functional.log_softmax(logits / t, 1),
                              nn.functional.log_softmax(teacher_logits / t, 1),
                              log_target=True, reduction="batchmean") * t * t
    return (1 - alpha) * loss + alpha * kl, kl


def snapshot_teacher(model: nn.Module) -> nn.Module:
    """A frozen copy of ``model`` to distil from: eval mode, no gradients; under torch.distributed
    each rank holds its own, identical since the weights and BN statistics are."""
    teacher = copy.deepcopy(model).eval()
    teacher.requires_grad_(False)
    return teacher


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches) -> None:
    """Recompute BatchNorm running statistics as plain averages over ``batches``.

    Running statistics only serve evaluation, so this leaves training untouched; it matters after
    the hard prune, when the exponential averages still remember the unpruned activations.
    Momentum and train/eval mode are restored afterwards.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    was_training = model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    for inputs, _ in batches:
        model(inputs)
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    model.train(was_training)


def _mixup(inputs: Tensor, labels: Tensor, alpha: float, generator: torch.Generator,
           rng: np.random.RandomState) -> tuple[Tensor, Tensor, float]:
    lam = float(rng.beta(alpha, alpha))
    perm = torch.randperm(len(inputs), generator=generator)
    return lam * inputs + (1 - lam) * inputs[perm], labels[perm], lam


# Fields that change neither what is trained nor the batches: a resumed run may change them.
RESUME_IGNORED = ("output_dir", "keep_checkpoints", "schedule.threads", "data.workers",
                  "schedule.memory_format", "schedule.sparse_kernels")


def _check_resumable(recipe: Recipe, saved: dict, path: str) -> None:
    """Refuse to resume under a recipe that would train differently from the saved one."""
    ignored = set(RESUME_IGNORED)
    if recipe.pruning.method == "dense" == saved["recipe"]["pruning"]["method"]:
        ignored |= {f"pruning.{key}" for key in recipe.pruning.model_fields}
    # deploy: after training; parsing the saved recipe gives fields it predates their defaults
    current, before = recipe.model_dump(exclude={"deploy"}), parse_recipe(saved["recipe"], path).model_dump()
    diffs = []
    for key, value in current.items():
        if isinstance(value, dict):
            diffs += [f"{key}.{k}" for k, v in value.items() if v != before.get(key, {}).get(k)]
        elif value != before.get(key):
            diffs.append(key)
    diffs = [d for d in diffs if d not in ignored]
    if diffs:
        raise CheckpointError(f"{path}: recipe differs from the one it was trained with in "
                              f"{', '.join(diffs)}; resume with the same recipe")


class _Run:
    """State of one training run: model, optimizer, pruner, data, metrics."""

    def __init__(self, recipe: Recipe, data: ImageData, saved: dict | None = None) -> None:
        self.recipe = recipe
        self.data_info = {"classes": data.classes, "input_shape": list(data.input_shape),
                          "mean": data.mean, "std": data.std}
        torch.manual_seed(recipe.seed)
        # Fresh runs load model.weights (shrinking first for a PruneTrain checkpoint); a resumed
        # run takes its weights from its checkpoint and only repeats the recorded shrink.
        self.model, self.base_shrink = build_recipe_model(
            recipe.model, len(data.classes), data.input_shape[0],
            shrink=saved.get("base_shrink") if saved else None, load=saved is None)
        check_logits(self.model, data.input_shape, len(data.classes), recipe.model.label)
        self.memory_format = (torch.channels_last if recipe.schedule.memory_format == "channels_last"
                              else torch.contiguous_format)
        self.model.to(memory_format=self.memory_format)
        self.pattern_kernels: list[dict] | None = None  # what install decided, once hard
        self.net = distributed.wrap(self.model)  # DDP when distributed: what training steps call
        d = recipe.data
        self.train_batches = make_batches(
            data.train, d.batch_size, data.mean, data.std, train=True, seed=recipe.seed,
            crop_padding=d.crop_padding, flip=d.flip)
        if len(self.train_batches) == 0:
            raise RecipeError(f"data.batch_size ({d.batch_size}) is larger than the "
                              f"{len(data.train)} training images")
        self.test_batches = make_batches(data.test, d.test_batch_size, data.mean, data.std,
                                         train=False, even=False)
        s = recipe.schedule
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=s.lr, momentum=s.momentum,
                                         weight_decay=s.weight_decay)
        self.scheduler = make_scheduler(self.optimizer, recipe, len(self.train_batches))
        self.pruner = create_method(self.model, recipe.pruning)
        self.teacher: nn.Module | None = None  # distillation: the model at the end of the dense phase
        self.metrics: list[dict] = []
        self.start_epoch = 0

    def state(self, epoch: int) -> dict:
        return {
            "epoch": epoch,
            "recipe": self.recipe.model_dump(),
            "data": self.data_info,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "pruner": self.pruner.state_dict(),
            "teacher": self.teacher.state_dict() if self.teacher is not None else None,
            "base_shrink": self.base_shrink,
            "rng": torch.get_rng_state(),
            "metrics": self.metrics,
        }

    def restore(self, saved: dict) -> None:
        self.pruner.load_state_dict(saved["pruner"])  # first: it may shrink the model (PruneTrain)
        self.model.load_state_dict(saved["model"])
        if saved.get("teacher") is not None:
            self.teacher = snapshot_teacher(self.model)
            self.teacher.load_state_dict(saved["teacher"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"])
        self.metrics = saved["metrics"]
        self.start_epoch = saved["epoch"] + 1

    def report(self) -> SparsityReport:
        return self.pruner.report(self.model)

    def context(self, epoch: int) -> EpochContext:
        return EpochContext(epoch, self.recipe.schedule.epochs, len(self.train_batches), self.model,
                            self.optimizer, lambda limit: self.train_batches.epoch(epoch, limit=limit),
                            nn.functional.cross_entropy)

    def train_epoch(self, epoch: int, progress: Progress, task) -> dict:
        recipe, pruner, p = self.recipe, self.pruner, self.recipe.pruning
        phase = pruner.phase(epoch)
        pruner.begin_epoch(self.context(epoch))
        self.net = distributed.wrap(self.model)  # again: a method may have reshaped the model
        if p.distill_alpha and phase != "dense" and self.teacher is None:
            self.teacher = snapshot_teacher(self.model)
        installed_now = self._install_pattern_kernels(phase)
        mixup = phase == "hard" and p.mixup_alpha > 0
        generator = torch.Generator().manual_seed(recipe.seed * 7_919 + epoch)
        rng = np.random.RandomState(recipe.seed * 7_919 + epoch)
        sparsity = 1.0 - 1.0 / self.report().compression["paper_convs"]
        flops_per_image = TRAINING_PASSES * forward_flops(self.model, self.data_info["input_shape"])
        self.model.train()
        loss_sum, penalty_sum, distill_sum, correct, count = 0.0, 0.0, 0.0, 0, 0
        progress.reset(task, total=len(self.train_batches), description=f"epoch {epoch} {phase}")
        started = time.perf_counter()
        for inputs, labels in self.train_batches.epoch(epoch):
            inputs = inputs.contiguous(memory_format=self.memory_format)
            if mixup:
                inputs, other, lam = _mixup(inputs, labels, p.mixup_alpha, generator, rng)
                logits = self.net(inputs)
                loss = (lam * nn.functional.cross_entropy(logits, labels)
                        + (1 - lam) * nn.functional.cross_entropy(logits, other))
            else:
                logits = self.net(inputs)
                loss = nn.functional.cross_entropy(logits, labels)
            if self.teacher is not None:  # it sees what the student saw, mixed or not
                with torch.no_grad():
                    teacher_logits = self.teacher(inputs)
                loss, kl = distillation_loss(loss, logits, teacher_logits, p.distill_alpha,
                                             p.distill_temperature)
                distill_sum += float(kl.detach()) * len(labels)
            penalty_sum += optimizer_step(loss, self.optimizer, pruner, phase) * len(labels)
            self.scheduler.step()
            loss_sum += float(loss.detach()) * len(labels)
            correct += int((logits.argmax(1) == labels).sum())
            count += len(labels)
            rate = count * distributed.world_size() / max(time.perf_counter() - started, 1e-9)
            progress.update(task, advance=1, stats=f"loss {loss_sum / count:.3f} "
                            f"acc {100 * correct / count:5.2f}% sparsity {100 * sparsity:4.1f}% "
                            f"{rate:,.0f} img/s")
        train_seconds = time.perf_counter() - started
        skipped = getattr(self.train_batches, "skipped", None)  # image folders' unreadable files
        skipped_train = skipped.count if skipped else 0
        loss_sum, penalty_sum, distill_sum, correct, count = distributed.all_reduce_sums(
            loss_sum, penalty_sum, distill_sum, correct, count)
        pruner.end_epoch(self.context(epoch))
        if recipe.schedule.bn_recalibration_batches:
            recalibrate_batchnorm(self.model, self.train_batches.epoch(
                epoch, limit=recipe.schedule.bn_recalibration_batches))
        distributed.average_buffers(self.model)
        test_loss, test_acc = evaluate(self.model, self.test_batches)
        skipped = getattr(self.test_batches, "skipped", None)
        skipped_train, skipped_test = distributed.all_reduce_sums(
            skipped_train, skipped.count if skipped else 0)
        report = self.report()
        levers = getattr(pruner, "epoch_metrics", None)  # ClickTrain's accuracy levers
        return {
            "epoch": epoch, "phase": phase, "lr": self.scheduler.get_last_lr()[0],
            "train_loss": loss_sum / count, "train_accuracy": 100 * correct / count,
            "lasso_penalty": penalty_sum / count, "test_loss": test_loss, "test_accuracy": test_acc,
            "pruned_layer_compression": report.compression["pruned_layers"],
            "paper_conv_compression": report.compression["paper_convs"],
            "epoch_seconds": train_seconds, "train_flops": flops_per_image * count,
            "images_per_second": count / train_seconds if train_seconds else 0.0,
            "skipped_train_images": int(skipped_train), "skipped_test_images": int(skipped_test),
            "distill_alpha": p.distill_alpha, "distill_temperature": p.distill_temperature,
            "distill_loss": distill_sum / count,
            "bn_recalibration_batches": recipe.schedule.bn_recalibration_batches,
            "memory_format": recipe.schedule.memory_format,
            "pattern_kernel_layers": sum(d["used"] for d in self.pattern_kernels or []),
            **({"pattern_kernels": self.pattern_kernels} if installed_now else {}),
            **(levers() if levers else {}),
        }

    def _install_pattern_kernels(self, phase: str) -> bool:
        """With ``schedule.sparse_kernels``, at the first hard epoch this process runs: put the
        pattern-pruned convs on our training kernels where measured faster (``pattern_kernels``
        holds the per-layer decisions). True when it installed them now."""
        layers = getattr(self.pruner, "pattern_layers", dict)()
        if not self.recipe.schedule.sparse_kernels or phase != "hard" or self.pattern_kernels is not None \
                or not layers:
            return False
        from .pattern_kernels import install  # loads TVM: only runs that ask for it
        sample = next(iter(self.train_batches.epoch(0, limit=1)))[0]
        decisions = install(self.model, layers, self.pruner.library.numpy(), sample, len(sample),
                            memory_format=self.memory_format)
        self.pattern_kernels = [d.to_dict() for d in decisions]
        return True


@distributed.in_process_group
def train(recipe: Recipe, resume: bool = False, progress: bool = True,
          console: Console | None = None) -> TrainResult:
    """Train ``recipe`` to the end, writing checkpoints, metrics and a sparsity report.

    Files in ``recipe.output_dir``: ``checkpoints/epoch-NNNN.pt`` (newest ``keep_checkpoints``),
    ``metrics.jsonl`` (one line per epoch) and ``sparsity.json`` (final report). With ``resume``,
    training continues after the newest checkpoint with identical masks and batches; without it,
    an output folder that already holds checkpoints is an error, so nothing is overwritten.

    Launched by torchrun (``WORLD_SIZE`` > 1), every rank runs this with the same recipe: rank 0
    reads the checkpoint for all and alone writes files and prints; see ``distributed``.
    """
    console = console or Console(stderr=True, quiet=not distributed.is_main())
    output = Path(recipe.output_dir)
    existing = distributed.from_main(lambda: list_checkpoints(output))
    if existing and not resume:
        raise CheckpointError(f"{output}: already holds checkpoints; pass --resume to continue "
                              "or choose another output_dir")
    if recipe.schedule.threads:
        torch.set_num_threads(recipe.schedule.threads)
    d = recipe.data
    data = load_data(d.name, d.root, d.train_subset, recipe.seed, d.test_subset, **d.loader_options())
    saved = distributed.from_main(lambda: load_checkpoint(existing[-1])) if existing else None
    if saved is not None:
        _check_resumable(recipe, saved, saved["path"])
    run = _Run(recipe, data, saved)
    if distributed.is_main():  # normalisation as trained (image folders: computed on a sample)
        atomic_write_json(output / "data.json", run.data_info)
    selection = getattr(run.pruner, "conv_selection", None)
    if selection is not None:
        if distributed.is_main():
            atomic_write_json(output / CONV_SELECTION, [c.to_dict() for c in selection])
        if progress:
            console.print(conv_selection_table(selection))
    if saved is not None:
        run.restore(saved)
        console.print(f"resuming after epoch {saved['epoch']} from {saved['path']}")
    checkpoint = existing[-1] if existing else None
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[stats]}"), TimeRemainingColumn()]
    shown = progress and distributed.is_main()
    with Progress(*columns, console=console, disable=not shown) as bar:
        task = bar.add_task("", total=1, stats="")
        for epoch in range(run.start_epoch, recipe.schedule.epochs):
            row = run.train_epoch(epoch, bar, task)
            run.metrics.append(row)
            distributed.check_identical(f"weights and BN statistics after epoch {epoch}",
                                        run.model.state_dict())
            distributed.check_method_state(f"{recipe.pruning.method} state (coefficients, masks, "
                                           f"method variables) after epoch {epoch}", run.pruner.state_dict())
            checkpoint = checkpoint_path(output, epoch)
            if distributed.is_main():
                save_checkpoint(output, epoch, run.state(epoch), recipe.keep_checkpoints)
                atomic_write_text(output / "metrics.jsonl",
                                  "".join(json.dumps(m) + "\n" for m in run.metrics))
            bar.console.print(
                f"epoch {epoch:3d} {row['phase']:10s} loss {row['train_loss']:.4f} "
                f"test acc {row['test_accuracy']:6.2f}%  compression "
                f"{row['paper_conv_compression']:.2f}x  {row['epoch_seconds']:.1f}s"
                + (f"  skipped {row['skipped_train_images']} train / {row['skipped_test_images']} "
                   "test unreadable images" if row["skipped_train_images"] + row["skipped_test_images"]
                   else ""))
    report = run.report()
    if distributed.is_main():
        atomic_write_json(output / "sparsity.json", report.to_dict())
    distributed.barrier()
    assert checkpoint is not None
    return TrainResult(output, Path(checkpoint), run.metrics[-1]["test_accuracy"], report, run.metrics,
                       run.model, run.pruner)

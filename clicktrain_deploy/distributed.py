"""torch.distributed plumbing: one recipe, N processes launched by ``torchrun``, identical masks.

A run is distributed when ``torchrun`` (or any launcher setting ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) starts it with ``WORLD_SIZE`` > 1. The backend
is NCCL when CUDA is available (each process on GPU ``LOCAL_RANK``) and gloo otherwise. Outside
such a launch every helper here is a no-op, so single-process code paths stay as they were.

Contract kept for training (see ``train.trainer``):
- the recipe's batch size is the *global* batch: each rank takes samples r, r + W, r + 2W, ...
  of every batch, the interleaving of torch's ``DistributedSampler``, so the union over ranks of
  step k is exactly the single-process batch k (same permutation and augmentation, which depend
  only on (seed, epoch));
- gradients are averaged by ``DistributedDataParallel``; importance scores are averaged before
  selection and the library and masks are compared across ranks (``check_identical``); a value a
  method fixes from the loss (PruneTrain's coefficient) is taken from the loss averaged over ranks
  (``mean_over_ranks``); after every epoch the weights and the method's whole state are compared;
- rank 0 alone reads checkpoints (``from_main``) and writes files.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Protocol, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .errors import DistributedError, RecipeError

T = TypeVar("T")


class Batches(Protocol):
    """What ``ShardedBatches`` wraps: a ``data.BatchIterator`` or anything shaped like it."""

    batch_size: int

    def __len__(self) -> int: ...

    def epoch(self, epoch: int, limit: int | None = None) -> Iterator[tuple[Tensor, Tensor]]: ...


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's global rank; from the launcher's ``RANK`` when no group is up (0 if none)."""
    return dist.get_rank() if is_distributed() else int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """Whether this process is rank 0, the one that reads checkpoints and writes files."""
    return rank() == 0


def device() -> torch.device:
    """Where this rank trains: its GPU under NCCL, else the CPU."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@contextlib.contextmanager
def process_group() -> Iterator[None]:
    """Join the process group the launcher describes (env://) and leave it on exit.

    Does nothing when a group is already up (the caller owns it) or the launch is single-process.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if not launched or (dist.is_available() and dist.is_initialized()):
        yield
        return
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise DistributedError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} "
                               "not set: launch with torchrun")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend)
    try:
        yield
    finally:
        dist.destroy_process_group()


def in_process_group(function: Callable[..., T]) -> Callable[..., T]:
    """Decorator: run ``function`` inside ``process_group()``."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs) -> T:
        with process_group():
            return function(*args, **kwargs)
    return wrapper


def wrap(model: nn.Module) -> nn.Module:
    """Move ``model`` to this rank's device; wrap it in DistributedDataParallel when distributed.

    Returns the module to call for training steps; ``model`` itself keeps the parameters (the
    same tensors), so state dicts, optimizers and pruners keep using it. Buffers (BatchNorm
    statistics) are not broadcast every step: batch statistics drive training, and
    ``average_buffers`` makes the running ones identical before evaluation and checkpoints.
    """
    model.to(device())
    if not is_distributed():
        return model
    ids = [device().index] if device().type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False)


def from_main(produce: Callable[[], T]) -> T:
    """``produce()`` evaluated on rank 0 and sent to every rank (an exception it raises is
    raised on every rank), so ranks agree even without a shared filesystem."""
    if not is_distributed():
        return produce()
    box: list = [None]
    if is_main():
        try:
            box = [(produce(), None)]
        except Exception as error:  # re-raised below, on every rank
            box = [(None, error)]
    dist.broadcast_object_list(box, src=0)
    value, error = box[0]
    if error is not None:
        raise error
    return value


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sums(*values: float) -> tuple[float, ...]:
    """Sum each value over ranks (float64); the values themselves when single-process."""
    if not is_distributed():
        return values
    summed = torch.tensor(values, dtype=torch.float64, device=device())
    dist.all_reduce(summed)
    return tuple(summed.tolist())


def mean_over_ranks(value: float) -> float:
    """``value`` averaged over ranks (float64); ``value`` itself when single-process. With
    even shards (``shard``) the mean of the ranks' batch-mean losses is the global batch's."""
    if not is_distributed():
        return value
    return all_reduce_sums(value)[0] / dist.get_world_size()


def average_(tensors: Iterable[Tensor]) -> None:
    """Replace each tensor, in place, by its mean over ranks."""
    if not is_distributed():
        return
    for tensor in tensors:
        dist.all_reduce(tensor)
        tensor.div_(dist.get_world_size())


def average_buffers(model: nn.Module) -> None:
    """Average floating-point buffers (BatchNorm running statistics) over ranks, in place."""
    average_(b for b in model.buffers() if b.is_floating_point())


def _update(sha, name: str, value: object) -> None:
    if isinstance(value, Tensor):
        t = value.detach().to("cpu").contiguous()
        sha.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        sha.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, Mapping):
        sha.update(f"{name}:map{len(value)};".encode())
        for key, item in value.items():
            _update(sha, f"{name}/{key}", item)
    elif isinstance(value, (list, tuple)):
        sha.update(f"{name}:seq{len(value)};".encode())
        for index, item in enumerate(value):
            _update(sha, f"{name}/{index}", item)
    elif value is None or isinstance(value, (bool, int, float, str)):
        sha.update(f"{name}={value!r};".encode())  # repr of a float is exact
    elif hasattr(value, "state_dict"):
        _update(sha, name, value.state_dict())
    else:
        raise TypeError(f"digest: {name}: cannot hash a {type(value).__name__}")


def digest(tensors: Mapping[str, object] | Iterable[object]) -> str:
    """SHA-256 over names, shapes, dtypes and bytes of ``tensors``; nested dicts and lists (a
    pruning method's ``state_dict``: coefficients, ADMM's Z/U/Y/V, masks) and their scalars too."""
    items = tensors.items() if isinstance(tensors, Mapping) else enumerate(tensors)
    sha = hashlib.sha256()
    for name, value in items:
        _update(sha, str(name), value)
    return sha.hexdigest()


def check_identical(what: str, tensors: Mapping[str, object] | Iterable[object]) -> None:
    """Raise ``DistributedError`` on every rank unless ``tensors`` (or a nested state, see
    ``digest``) are bit-identical on all."""
    if not is_distributed():
        return
    digests: list = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest(tensors))
    if len(set(digests)) > 1:
        differ = [r for r, d in enumerate(digests) if d != digests[0]]
        raise DistributedError(f"{what} differ across ranks: rank(s) {differ} disagree with rank 0")


def check_method_state(what: str, state: object) -> None:
    """``check_identical`` for a pruning method's whole ``state_dict()`` (None for dense)."""
    check_identical(what, {"state": state})


class ShardedBatches:
    """This rank's share of every batch of ``batches``, on this rank's device.

    Rank r of W takes samples r, r + W, ... of each batch (``DistributedSampler``'s interleave).
    With ``even`` the batch size must split evenly, so every rank's loss weighs alike when DDP
    averages gradients; without it (evaluation) a rank's share may be short or skipped if empty.
    """

    def __init__(self, batches: Batches, rank: int, world_size: int, device: torch.device, *,
                 even: bool) -> None:
        if even and batches.batch_size % world_size:
            raise RecipeError(f"data.batch_size ({batches.batch_size}) is the global batch and "
                              f"must split evenly over the {world_size} processes")
        self.batches = batches
        self.rank = rank
        self.world_size = world_size
        self.device = device

    def __len__(self) -> int:
        return len(self.batches)

    def epoch(self, epoch: int, limit: int | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        """This rank's part of each batch of ``epoch``: inputs (b, C, H, W), labels (b,)."""
        for inputs, labels in self.batches.epoch(epoch, limit):
            part = slice(self.rank, None, self.world_size)
            if len(labels[part]):
                yield inputs[part].contiguous().to(self.device), labels[part].to(self.device)


def shard(batches: Batches, *, even: bool = True) -> ShardedBatches:
    """``batches`` as this rank sees them (all of each batch when single-process)."""
    return ShardedBatches(batches, rank() if is_distributed() else 0, world_size(), device(), even=even)

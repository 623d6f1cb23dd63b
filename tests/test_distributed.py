"""torch.distributed training: a real 2-process gloo run on 127.0.0.1, resumed both ways.

The run: a single-process ClickTrain run writes epoch 0 (dense); torchrun with 2 processes
resumes it and trains epoch 1 (selection, group lasso) and epoch 2 (hard masks); the
single-process path then resumes the distributed epoch-1 checkpoint.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from torch import nn
from torch.utils.data.distributed import DistributedSampler

from clicktrain_deploy import distributed, parse_recipe, train
from clicktrain_deploy.data import BatchIterator
from clicktrain_deploy.data.datasets import Split
from clicktrain_deploy.errors import CheckpointError, DistributedError, RecipeError
from clicktrain_deploy.models import create_model
from clicktrain_deploy.pruning import create_method
from clicktrain_deploy.pruning.clicktrain import PrunedLayer, estimate_importance
from clicktrain_deploy.pruning.config import PruningConfig
from clicktrain_deploy.train import load_checkpoint, restore_model

from .conftest import REPO, small_recipe, without_wall_clock

WORKER = REPO / "tests" / "distributed_worker.py"


def _recipe(output_dir) -> dict:
    return small_recipe(output_dir, schedule={"epochs": 3}, data={"test_subset": 500})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Paths and results of: single-process epoch 0 -> 2 ranks epochs 1-2 -> single epoch 2."""
    base = tmp_path_factory.mktemp("distributed")
    single = train(parse_recipe(_recipe(base / "single")), progress=False)
    started = base / "dist" / "rank0" / "run" / "checkpoints"
    started.mkdir(parents=True)
    shutil.copy(single.output_dir / "checkpoints" / "epoch-0000.pt", started)
    recipe_file = base / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(_recipe("run")))  # relative: each rank's own folder
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(WORKER), str(recipe_file), str(base / "dist"), "--resume"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert launched.returncode == 0, launched.stderr[-4000:]
    dist_run = base / "dist" / "rank0" / "run"
    resumed_dir = base / "resumed"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copy(dist_run / "checkpoints" / "epoch-0001.pt", resumed_dir / "checkpoints")
    resumed = train(parse_recipe(_recipe(resumed_dir)), resume=True, progress=False)
    states = [torch.load(base / "dist" / f"state-rank{r}.pt", weights_only=False) for r in (0, 1)]
    return {"base": base, "single": single, "dist_run": dist_run, "states": states,
            "resumed": resumed}


def test_ranks_end_with_identical_masks_weights_and_metrics(runs):
    rank0, rank1 = runs["states"]
    assert rank0["model"].keys() == rank1["model"].keys()
    for key, value in rank0["model"].items():  # weights and BatchNorm statistics, bit for bit
        assert torch.equal(value, rank1["model"][key]), key
    assert rank0["pruner"]["hard"] and rank1["pruner"]["hard"]
    assert torch.equal(rank0["pruner"]["library"], rank1["pruner"]["library"])
    assert rank0["pruner"]["masks"].keys() == rank1["pruner"]["masks"].keys()
    for name, mask in rank0["pruner"]["masks"].items():
        assert torch.equal(mask["pattern_ids"], rank1["pruner"]["masks"][name]["pattern_ids"]), name
    assert without_wall_clock(rank0["metrics"]) == without_wall_clock(rank1["metrics"])
    assert [m["phase"] for m in rank0["metrics"]] == ["dense", "regularize", "hard"]


def test_only_rank_0_wrote_files_and_its_checkpoint_is_the_ranks_state(runs):
    assert list((runs["base"] / "dist" / "rank1").iterdir()) == []  # resumed without the file
    run = runs["dist_run"]
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "conv_selection.json", "data.json",
                                                     "metrics.jsonl", "sparsity.json"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "epoch-0000.pt", "epoch-0001.pt", "epoch-0002.pt"]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3
    saved = load_checkpoint(run)
    for key, value in runs["states"][0]["model"].items():
        assert torch.equal(saved["model"][key], value), key
    # epoch 0 came from the single-process checkpoint the distributed run resumed
    assert without_wall_clock(saved["metrics"][:1]) == without_wall_clock(runs["single"].metrics[:1])


def test_distributed_checkpoint_resumes_single_process_on_the_same_masks(runs):
    resumed = runs["resumed"]
    assert [m["phase"] for m in resumed.metrics] == ["dense", "regularize", "hard"]
    distributed_state = runs["states"][0]
    assert without_wall_clock(resumed.metrics[:2]) == without_wall_clock(distributed_state["metrics"][:2])
    model, pruner = restore_model(load_checkpoint(resumed.output_dir))
    assert torch.equal(pruner.library, distributed_state["pruner"]["library"])
    modules = dict(model.named_modules())
    for name, mask in pruner.masks.items():
        expected = distributed_state["pruner"]["masks"][name]["pattern_ids"]
        assert torch.equal(mask.pattern_ids, expected), name
        weight = modules[name].weight.detach()
        assert torch.equal(weight.ne(0), weight.ne(0) & mask.dense(pruner.library).bool()), name
    assert 7.0 < resumed.report.compression["pruned_layers"] < 8.0


def test_shards_follow_distributed_sampler_and_tile_each_global_batch():
    n, batch, world = 103, 12, 3
    split = Split(torch.zeros(n, 1, 4, 4, dtype=torch.uint8), torch.arange(n))  # label = index
    full = BatchIterator(split, batch, [0.0], [1.0], train=True, seed=5)
    order = torch.cat([labels for _, labels in full.epoch(2)])  # the epoch's permutation
    for rank in range(world):
        shards = distributed.ShardedBatches(full, rank, world, torch.device("cpu"), even=True)
        got = [labels for _, labels in shards.epoch(2)]
        sampler = DistributedSampler(order.tolist(), num_replicas=world, rank=rank, shuffle=False)
        expected = order[list(sampler)][: len(full) * batch // world]
        assert len(got) == len(full) and all(len(g) == batch // world for g in got)
        assert torch.equal(torch.cat(got), expected)
    steps = [list(distributed.ShardedBatches(full, r, world, torch.device("cpu"), even=True).epoch(2))
             for r in range(world)]
    for k, (_, labels) in enumerate(full.epoch(2)):
        assert sorted(torch.cat([steps[r][k][1] for r in range(world)]).tolist()) == sorted(labels.tolist())
    with pytest.raises(RecipeError, match=r"data.batch_size \(12\).*5 processes"):
        distributed.ShardedBatches(full, 0, 5, torch.device("cpu"), even=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _collectives(rank: int, port: int, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        distributed.check_identical("same", {"w": torch.ones(3)})
        try:
            distributed.check_identical("masks", [torch.tensor([rank])])
            mismatch = "not raised"
        except DistributedError as error:
            mismatch = str(error)
        scores = torch.tensor([1.0 + rank, 4.0])
        distributed.average_([scores])

        def fails_on_main():
            raise CheckpointError("run/checkpoints/epoch-0001.pt: truncated")
        try:
            distributed.from_main(fails_on_main)
            broadcast_error = "not raised"
        except CheckpointError as error:
            broadcast_error = str(error)
        # each rank scores its own images on a plain (not DDP) model: the sums are averaged
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Flatten(), nn.Linear(100, 3))
        images = torch.Generator().manual_seed(rank)
        batches = [(torch.randn(6, 1, 5, 5, generator=images), torch.randint(0, 3, (6,), generator=images))]
        importance = estimate_importance(model, [PrunedLayer("0", model[0], 1, 0.5)], batches,
                                         nn.functional.cross_entropy)["0"]
        results.put((rank, mismatch, scores.tolist(), distributed.all_reduce_sums(1.0, rank),
                     distributed.from_main(lambda: f"from rank {distributed.rank()}"), broadcast_error,
                     importance.flatten().tolist()))
    finally:
        dist.destroy_process_group()


def _on_two_ranks(worker) -> list:
    """``worker(rank, port, results)`` in two spawned gloo processes; their results, by rank."""
    results = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(worker, args=(_free_port(), results), nprocs=2, start_method="spawn")
    return sorted(results.get() for _ in range(2))


def test_collectives_average_broadcast_and_fail_loudly_on_every_rank():
    rows = _on_two_ranks(_collectives)
    for rank, mismatch, scores, sums, value, broadcast_error, _ in rows:
        assert mismatch == "masks differ across ranks: rank(s) [1] disagree with rank 0", rank
        assert scores == [1.5, 4.0] and sums == (2.0, 1.0) and value == "from rank 0"
        assert broadcast_error == "run/checkpoints/epoch-0001.pt: truncated"
    assert sum(rows[0][-1]) > 0 and rows[0][-1] == rows[1][-1]  # same scores on both ranks


def _prunetrain_coefficient(rank: int, port: int, results) -> None:
    """Each rank: the same ResNet-20, its own images; PruneTrain fixes its coefficient."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = create_model("resnet20", 10, 1)
        method = create_method(model, PruningConfig(method="prunetrain"))
        images = torch.Generator().manual_seed(100 + rank)
        inputs, labels = torch.randn(8, 1, 28, 28, generator=images), torch.randint(0, 10, (8,), generator=images)
        loss = nn.functional.cross_entropy(model(inputs), labels)
        term = method.penalty_term(loss, "regularize")
        lasso = float(term.detach()) / method.coefficient
        distributed.check_method_state("prunetrain state", method.state_dict())  # agrees: no raise
        caught = []
        # one ulp off on rank 1: the coefficient, then an ADMM-like nested variable
        diverged = dict(method.state_dict())
        if rank == 1:
            diverged["coefficient"] = float(torch.nextafter(torch.tensor(method.coefficient, dtype=torch.float64),
                                                            torch.tensor(1.0, dtype=torch.float64)))
        nested = {"variables": {"layers.0.0.conv1": {"Z": torch.zeros(4), "U": torch.zeros(4)}}, "steps": 50}
        if rank == 1:
            nested["variables"]["layers.0.0.conv1"]["U"][2] = 1e-30
        for what, state in [("coefficient", diverged), ("admm state", nested)]:
            try:
                distributed.check_method_state(what, state)
                caught.append("not raised")
            except DistributedError as error:
                caught.append(str(error))
        results.put((rank, float(loss.detach()), lasso, method.coefficient, caught))
    finally:
        dist.destroy_process_group()


def test_prunetrain_ranks_fix_one_coefficient_from_the_global_loss_and_diverged_state_is_caught():
    (_, loss0, lasso0, c0, caught0), (_, loss1, lasso1, c1, caught1) = _on_two_ranks(_prunetrain_coefficient)
    assert loss0 != loss1 and lasso0 == lasso1  # the shards differ, the weights do not
    assert c0 == c1  # bit for bit
    ratio = PruningConfig().prunetrain.penalty_ratio
    assert c0 == pytest.approx(ratio * (loss0 + loss1) / 2 / (lasso0 * (1 - ratio)), rel=1e-6)
    for caught in (caught0, caught1):  # every rank stops, naming what differs
        assert caught == ["coefficient differ across ranks: rank(s) [1] disagree with rank 0",
                          "admm state differ across ranks: rank(s) [1] disagree with rank 0"]


def _launch(recipe: dict, base, **env) -> subprocess.CompletedProcess:
    base.mkdir(parents=True)
    recipe_file = base / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe))
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(WORKER), str(recipe_file), str(base)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", **env})


def test_prunetrain_under_torchrun_same_coefficient_on_every_rank_and_divergence_stops_it(tmp_path):
    recipe = small_recipe("run", schedule={"epochs": 1}, data={"test_subset": 500},
                          pruning={"method": "prunetrain"})
    launched = _launch(recipe, tmp_path / "even")
    assert launched.returncode == 0, launched.stderr[-4000:]
    states = [torch.load(tmp_path / "even" / f"state-rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert states[0]["pruner"]["coefficient"] == states[1]["pruner"]["coefficient"] > 0
    saved = load_checkpoint(tmp_path / "even" / "rank0" / "run")
    assert saved["pruner"]["coefficient"] == states[1]["pruner"]["coefficient"]  # what a resume uses
    # one rank's coefficient one ulp off: the weights stay identical, the state check stops the run
    diverged = _launch(recipe, tmp_path / "diverged", DIVERGE_RANK="1")
    assert diverged.returncode != 0
    assert ("prunetrain state (coefficients, masks, method variables) after epoch 0 differ across ranks: "
            "rank(s) [1] disagree with rank 0") in diverged.stderr, diverged.stderr[-4000:]
    assert not (tmp_path / "diverged" / "rank0" / "run" / "checkpoints").exists()

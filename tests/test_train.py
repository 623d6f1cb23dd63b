"""Short real-data training runs: mask conformance, resume after kill -9, CLI behaviour."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from clicktrain_deploy import parse_recipe, train
from clicktrain_deploy.pruning.masks import REMOVED, removal_count
from clicktrain_deploy.train import load_checkpoint, restore_model

from .conftest import REPO, small_recipe, without_wall_clock


@pytest.fixture(scope="module")
def clicktrain_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    return train(parse_recipe(small_recipe(out)), progress=False)


def test_trained_model_conforms_to_its_masks(clicktrain_run):
    model, pruner = restore_model(load_checkpoint(clicktrain_run.output_dir))
    library = pruner.library
    assert len(library) == 8 and (library.sum(1) == 4).all()
    modules = dict(model.named_modules())
    for name, mask in pruner.masks.items():
        weight = modules[name].weight.detach()
        c_out, c_in = weight.shape[:2]
        ids = mask.kernel_pattern_ids()
        nonzero = weight.flatten(2).ne(0)
        # every kernel is removed (all zero) or has exactly its pattern's taps non-zero
        expected = library[ids.clamp_min(0)] & (ids != REMOVED)[..., None]
        assert torch.equal(nonzero, expected), name
        # blocks of B=4 output channels share patterns and connectivity
        assert torch.equal(ids.view(-1, 4, c_in), ids.view(-1, 4, c_in)[:, :1].expand(-1, 4, -1))
        groups = mask.pattern_ids.numel()
        assert int((mask.pattern_ids == REMOVED).sum()) == removal_count(groups, 0.7), name


def test_run_reports_compression_and_learns(clicktrain_run):
    report = clicktrain_run.report
    assert 7.0 < report.compression["pruned_layers"] < 8.0  # 9/4 / 0.3 = 7.5 at 70% removed
    assert report.compression["paper_convs"] > 7.0
    assert report.compression["all_weights"] < report.compression["all_convs"]
    assert clicktrain_run.test_accuracy > 40.0  # chance is 10%
    lines = (clicktrain_run.output_dir / "metrics.jsonl").read_text().splitlines()
    phases = [json.loads(l)["phase"] for l in lines]
    assert phases == ["dense", "regularize", "hard", "hard"]
    assert json.loads(lines[1])["lasso_penalty"] > 0


def test_resume_after_kill_gives_the_same_masks_weights_and_metrics(clicktrain_run, tmp_path):
    recipe = small_recipe(tmp_path / "killed")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    process = subprocess.Popen([sys.executable, "-m", "clicktrain_deploy", "train", "-c", str(path),
                                "--quiet"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    target = tmp_path / "killed" / "checkpoints" / "epoch-0002.pt"  # after selection and hardening
    deadline = time.time() + 300
    while not target.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, process.stderr.read().decode()
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done = sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir())
    assert "epoch-0003.pt" not in done  # the run really was cut short
    resumed = train(parse_recipe(recipe), resume=True, progress=False)
    assert without_wall_clock(resumed.metrics) == without_wall_clock(clicktrain_run.metrics)
    a = load_checkpoint(resumed.output_dir)
    b = load_checkpoint(clicktrain_run.output_dir)
    assert torch.equal(a["pruner"]["library"], b["pruner"]["library"])
    for name, mask in b["pruner"]["masks"].items():
        assert torch.equal(a["pruner"]["masks"][name]["pattern_ids"], mask["pattern_ids"])
    for key, value in b["model"].items():
        assert torch.equal(a["model"][key], value), key


def test_dense_method_trains_without_pruning(tmp_path):
    recipe = small_recipe(tmp_path, pruning={"method": "dense"}, schedule={"epochs": 1})
    result = train(parse_recipe(recipe), progress=False)
    assert result.report.compression["paper_convs"] == pytest.approx(1.0)
    assert result.report.layers == []


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clicktrain_deploy", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600)


def test_cli_refuses_to_overwrite_and_reports(clicktrain_run, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(small_recipe(clicktrain_run.output_dir)))
    before = sorted(p.stat().st_mtime_ns for p in (clicktrain_run.output_dir / "checkpoints").iterdir())
    refused = _cli("train", "-c", str(path))
    assert refused.returncode == 2 and "already holds checkpoints" in refused.stdout
    after = sorted(p.stat().st_mtime_ns for p in (clicktrain_run.output_dir / "checkpoints").iterdir())
    assert before == after
    shown = _cli("report", str(clicktrain_run.output_dir), "--json")
    assert shown.returncode == 0, shown.stderr
    report = json.loads(shown.stdout)
    assert len(report["layers"]) == 18 and len(report["library"]) == 8
    assert report["compression"] == pytest.approx(clicktrain_run.report.compression)


def test_cli_names_the_bad_field(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[pruning]\nselect_epoch = -1\n")
    result = _cli("train", "-c", str(path))
    assert result.returncode == 2
    assert "bad.toml: pruning.select_epoch" in result.stdout.replace("\n", "")
    assert not (tmp_path / "runs").exists()


def test_fixed_library_with_mixup_and_per_kernel_blocks(tmp_path):
    recipe = small_recipe(tmp_path, schedule={"epochs": 3},
                          pruning={"patterns": "clicktrain4", "block_size": 1, "mixup_alpha": 0.3})
    result = train(parse_recipe(recipe), progress=False)
    assert result.report.library == ["...|.XX|.XX", "...|XX.|XX.", ".XX|.XX|...", "XX.|XX.|..."]
    for layer in result.report.layers:
        assert layer.block_size == 1
        assert sum(layer.pattern_histogram.values()) == layer.kernels_kept

"""benchmarks/accuracy.py on real, tiny runs (ResNet-20, 256 Fashion-MNIST images, 1-2 epochs):
records, skipping on a second invocation, pending rows, weights_from, and resume of an
interrupted run. Results and run folders go to a temporary directory, never benchmarks/results."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
TINY = {"data.train_subset": 256, "data.test_subset": 100, "data.test_batch_size": 100,
        "schedule.epochs": 1, "schedule.bn_recalibration_batches": 2, "pruning.importance_batches": 2}


@pytest.fixture(scope="module")
def accuracy():
    sys.path.insert(0, str(BENCHMARKS))  # the script imports its neighbours (training_bar)
    spec = importlib.util.spec_from_file_location("accuracy_runner", BENCHMARKS / "accuracy.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]
    sys.path.remove(str(BENCHMARKS))


def tiny_studies(accuracy):
    Row, Study = accuracy.Row, accuracy.Study
    return [
        Study("tiny", "two rows", (
            Row("t-dense", {**TINY, "pruning.method": "dense", "schedule.epochs": 2}),
            Row("t-ct", {**TINY, "pruning.select_epoch": 0, "pruning.hard_prune_epoch": 0},
                weights_from="t-dense"),
        )),
        Study("broken", "a row the parser rejects beside one that runs", (
            Row("t-bad", {**TINY, "pruning.no_such_option": 1}),
            "t-dense",
        )),
    ]


@pytest.fixture(scope="module")
def first(accuracy, tmp_path_factory):
    root = tmp_path_factory.mktemp("accuracy")
    argv = ["--study", "tiny", "--study", "broken", "--jobs", "2",
            "--out", str(root / "results" / "acc"), "--runs-dir", str(root / "runs")]
    code = accuracy.main(argv, tiny_studies(accuracy))
    return {"root": root, "argv": argv, "code": code, "json": root / "results" / "acc.json",
            "md": root / "results" / "acc.md", "runs": root / "runs"}


def records(path: Path) -> dict:
    return {(r["row"], r["seed"]): r for r in json.loads(path.read_text())["runs"]}


def test_two_row_study_records_what_the_tables_need(first):
    assert first["code"] == 0
    runs = records(first["json"])
    assert set(runs) == {("t-dense", 0), ("t-ct", 0)}  # the rejected row is not a run
    for run in runs.values():
        for key in ("row", "study", "method", "block_size", "epochs", "seed", "test_accuracy",
                    "best_accuracy", "compression", "wall_s", "cpu", "date", "load_average",
                    "recipe", "resumed"):
            assert key in run, key
        assert 0 < run["test_accuracy"] <= 100 and run["best_accuracy"] >= run["test_accuracy"]
        assert run["compression"] >= 1 and run["wall_s"] > 0 and run["resumed"] is False
        assert run["study"] == "tiny" and run["recipe"]["schedule"]["threads"] == 1
        assert len(run["load_average"]) == 3 and run["cpu"]
    dense, ct = runs[("t-dense", 0)], runs[("t-ct", 0)]
    assert (dense["method"], dense["epochs"], dense["block_size"]) == ("dense", 2, None)
    assert (ct["method"], ct["epochs"], ct["block_size"]) == ("clicktrain", 1, 16)
    assert ct["compression"] > 2  # hard masks from the first step
    assert dense["recipe"]["output_dir"] == str(first["runs"] / "t-dense" / "seed0")
    text = first["md"].read_text()
    assert "## tiny" in text and "## broken" in text
    assert f"| t-ct | clicktrain | 16 | 1 | 0 | {ct['test_accuracy']:.2f} |" in text
    assert f"{ct['test_accuracy'] - dense['test_accuracy']:+.2f}" in text


def test_weights_from_loads_the_other_rows_final_checkpoint(first):
    ct = records(first["json"])[("t-ct", 0)]
    weights = Path(ct["recipe"]["model"]["weights"])
    assert weights == first["runs"] / "t-dense" / "seed0" / "checkpoints" / "epoch-0001.pt"
    assert weights.is_file() and ct["weights_from"]["row"] == "t-dense"
    assert ct["train_flops_share"] is None  # started from weights: no unshrunk first epoch


def test_rejected_override_is_pending_with_its_field(first, accuracy, capsys):
    text = first["md"].read_text()
    bad = next(line for line in text.splitlines() if line.startswith("| t-bad "))
    assert "pending: pruning.no_such_option" in bad
    assert not (first["runs"] / "t-bad").exists()
    accuracy.main(["--dry-run", "--out", str(first["root"] / "results" / "acc"),
                   "--runs-dir", str(first["runs"])], tiny_studies(accuracy))
    out = capsys.readouterr().out
    assert "t-bad seed 0" in out and "pending: pruning.no_such_option" in out
    assert "t-ct seed 0" in out and "weights from t-dense seed 0" in out


def test_second_invocation_skips_everything(first, accuracy, capsys):
    before = first["json"].read_bytes(), first["json"].stat().st_mtime_ns
    segments = [json.loads((first["runs"] / r / "seed0" / "row.json").read_text())["segments"]
                for r in ("t-dense", "t-ct")]
    assert accuracy.main(first["argv"], tiny_studies(accuracy)) == 0
    out = capsys.readouterr().out
    assert "skip   t-dense seed 0" in out and "skip   t-ct seed 0" in out and "start" not in out
    assert (first["json"].read_bytes(), first["json"].stat().st_mtime_ns) == before
    assert segments == [json.loads((first["runs"] / r / "seed0" / "row.json").read_text())["segments"]
                        for r in ("t-dense", "t-ct")]


def test_interrupted_run_resumes_from_its_checkpoint(first, accuracy, capsys):
    """As if stopped during its last epoch: the newest checkpoint, the final report and the
    record are gone; the next invocation resumes after epoch 0 and sums the two segments."""
    folder = first["runs"] / "t-dense" / "seed0"
    (folder / "checkpoints" / "epoch-0001.pt").unlink()
    (folder / "sparsity.json").unlink()
    metrics = (folder / "metrics.jsonl").read_text().splitlines()
    (folder / "metrics.jsonl").write_text(metrics[0] + "\n")
    data = json.loads(first["json"].read_text())
    data["runs"] = [r for r in data["runs"] if r["row"] != "t-dense"]
    first["json"].write_text(json.dumps(data))
    assert accuracy.main(["--row", "t-dense"] + first["argv"][4:], tiny_studies(accuracy)) == 0
    assert "start  t-dense seed 0 (resumes after epoch 0)" in capsys.readouterr().out
    run = records(first["json"])[("t-dense", 0)]
    assert run["resumed"] is True and len(run["segments"]) == 2
    assert run["wall_s"] == pytest.approx(sum(s["wall_s"] for s in run["segments"]))
    assert run["segments"][1]["from_epoch"] == 0 and len(run["accuracy_per_epoch"]) == 2
    assert "resuming after epoch 0" in (folder / "train.log").read_text()
    assert ("t-ct", 0) in records(first["json"])  # its source's identity did not change


def test_runs_start_seed_major_so_a_seeds_rows_run_side_by_side(accuracy, tmp_path):
    Row, Study = accuracy.Row, accuracy.Study
    catalog = accuracy.Catalog([Study("two-seeds", "rows x seeds", (
        Row("s-dense", {**TINY, "pruning.method": "dense"}, seeds=(0, 1)),
        Row("s-ct", TINY, seeds=(0, 1)),
    ))])
    runs = accuracy.plan(catalog, catalog.order(), tmp_path, threads=1)
    assert [r.label for r in runs.values()][:2] == ["s-dense seed 0", "s-dense seed 1"]
    assert [r.label for r in accuracy.start_order(list(runs.values()))] == [
        "s-dense seed 0", "s-ct seed 0", "s-dense seed 1", "s-ct seed 1"]


def test_a_field_added_later_keeps_recorded_identities_at_its_old_behaviour(accuracy):
    from clicktrain_deploy import parse_recipe

    dump = parse_recipe({}).model_dump()
    before = {**dump, "pruning": {k: v for k, v in dump["pruning"].items()
                                  if k not in ("regrow_every", "regrow_fraction")}}
    assert accuracy._identity(dump, None) == accuracy._identity(before, None)
    regrowing = {**dump, "pruning": {**dump["pruning"], "regrow_every": 1}}
    assert accuracy._identity(regrowing, None) != accuracy._identity(dump, None)

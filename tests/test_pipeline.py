"""``clicktrain-deploy run``: one real pipeline (tiny recipe, x86 + cortex-a72) shared by the tests;
caching, resume, bad input and the HTML report rendered in headless Chromium."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from onnx import numpy_helper

from clicktrain_deploy.compile.targets import NEON_DENSE, NEON_SPARSE, TARGETS, TargetSpec
from clicktrain_deploy.config import load_recipe, parse_recipe
from clicktrain_deploy.pipeline import STAGES as STAGE_KINDS, PipelineError, plan, run_pipeline
from clicktrain_deploy.pipeline import state as pipeline_state
from clicktrain_deploy.pipeline.runner import stage_digest
from clicktrain_deploy.runfolder import RunFolder
from clicktrain_deploy.validate import check_library, missing_device, runner_kind

from .conftest import REPO, small_recipe, without_wall_clock

STAGES = ["train", "export", "validate:onnxruntime", "compile:x86", "validate:x86", "compile:cortex-a72",
          "validate:cortex-a72", "benchmark:x86", "benchmark:cortex-a72", "report"]


def tiny_recipe(output_dir: Path, **overrides) -> dict:
    """2 epochs on 600 real training images (500 test), B=16 as the default recipe, both default
    targets, short benchmark."""
    recipe = small_recipe(output_dir, schedule={"epochs": 2}, pruning={"hard_prune_epoch": 1, "block_size": 16},
                          data={"test_subset": 500})
    recipe["deploy"] = {"targets": ["x86", "cortex-a72"], "validate_images": 50, "emulated_images": 2,
                        "bench_threads": [1], "bench_rounds": 1}
    for section, values in overrides.items():
        recipe[section] = {**recipe[section], **values}
    return recipe


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe))
    return path


def run(recipe: dict, tmp: Path, **options):
    return run_pipeline(load_recipe(write_recipe(tmp / "recipe.yaml", recipe)), progress=False, **options)


def actions(result) -> dict[str, str]:
    return {o.name: o.action for o in result.outcomes}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """The whole pipeline, run once: (recipe dict, result)."""
    tmp = tmp_path_factory.mktemp("pipeline")
    recipe = tiny_recipe(tmp / "run")
    return recipe, run(recipe, tmp)


@pytest.fixture
def copied(pipeline, tmp_path):
    """A copy of the finished run folder and its recipe, to change without touching the original."""
    recipe, result = pipeline
    shutil.copytree(result.folder.root, tmp_path / "run")
    return {**recipe, "output_dir": str(tmp_path / "run")}, RunFolder(tmp_path / "run")


def test_pipeline_trains_exports_compiles_validates_benchmarks_and_reports(pipeline):
    recipe, result = pipeline
    folder = result.folder
    assert [o.name for o in result.outcomes] == STAGES
    assert set(actions(result).values()) == {"ran"}
    state = json.loads(folder.state.read_text())
    # every record holds the inputs hash of what the stage read and ran, as recomputed now
    planned = plan(load_recipe(folder.root.parent / "recipe.yaml"))
    assert {s.name: (stage_digest(s, folder)[0], "done") for s in planned} == {
        name: (s["inputs"], s["status"]) for name, s in state["stages"].items()}
    for runtime, reference, images in [("onnxruntime", "torch", 50), ("x86", "onnxruntime", 50),
                                       ("cortex-a72", "onnxruntime", 2)]:
        check = json.loads(folder.validation(runtime).read_text())
        assert (check["reference"], check["images"], check["passed"]) == (reference, images, True)
        assert 0 < check["max_abs_diff"] <= 1e-4 + 1e-4 * check["max_abs_logit"]
    assert "qemu-aarch64 -cpu cortex-a72" in json.loads(folder.validation("cortex-a72").read_text())["runner"]
    x86 = json.loads(folder.bench("x86").read_text())
    assert set(x86["x86"]["1"]) >= {"ours_sparse", "ours_dense", "onnxruntime", "torch"}
    assert x86["flop_reduction_limit"] > 3
    arm = json.loads(folder.bench("cortex-a72").read_text())
    # The README's figure: ARM instructions, our dense build / pattern-sparse = 5.96x, 75% of the
    # benchmarked ResNet-20's 7.94x FLOP-reduction limit (benchmarks/results/compile_bar.md). This
    # model is smaller-trained (2 epochs, 600 images, connectivity 0.7) and its limit is its own
    # (7.50x), so the transferable claim is the share of its own limit. Instruction counts are exact
    # and repeatable (one thread under qemu), so the margin is only for this model's different
    # layers: this model got 5.71x = 76% of its limit (2026-12-01); the README's 75% less one point.
    ratio = arm["ours_dense"] / arm["ours_sparse"]
    assert ratio >= 0.74 * arm["flop_reduction_limit"], (ratio, arm["flop_reduction_limit"])
    html = folder.report.read_text()
    assert not re.search(r'(src|href)="(?!data:|#)', html)  # self-contained
    assert "cortex-a72" in html and "FLOP-reduction limit" in html and "1x1 conv (shortcut projection)" in html


def test_unchanged_rerun_skips_every_stage(pipeline, tmp_path):
    recipe, first = pipeline
    library = first.folder.library("x86")
    before = library.stat().st_mtime_ns
    again = run(recipe, tmp_path)
    assert set(actions(again).values()) == {"cached"}
    assert library.stat().st_mtime_ns == before


def test_changed_sections_rerun_that_stage_and_downstream_only(copied, tmp_path):
    recipe, folder = copied
    # fewer targets: the kept target's stages are unchanged, only the report is redone
    fewer = run({**recipe, "deploy": {**recipe["deploy"], "targets": ["x86"]}}, tmp_path)
    assert actions(fewer) == {**{s: "cached" for s in STAGES if "cortex" not in s}, "report": "ran"}
    assert "cortex-a72" not in folder.report.read_text()
    # a new tolerance, the target back: every validation and the report; nothing compiled or measured
    tolerance = run({**recipe, "deploy": {**recipe["deploy"], "atol": 2e-4}}, tmp_path)
    assert {s for s, a in actions(tolerance).items() if a == "ran"} == {
        "validate:onnxruntime", "validate:x86", "validate:cortex-a72", "report"}
    # a training change: training starts over (it would refuse to resume the old checkpoints
    # under another recipe) and export follows
    old_model = folder.onnx.read_bytes()
    changed = run({**recipe, "schedule": {**recipe["schedule"], "lr": 0.04}}, tmp_path, until="export")
    assert actions(changed) == {"train": "ran", "export": "ran"}
    assert folder.onnx.read_bytes() != old_model


def test_interrupted_training_resumes_from_its_checkpoint(pipeline, tmp_path):
    recipe, finished = pipeline
    recipe = {**recipe, "output_dir": str(tmp_path / "run")}
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    process = subprocess.Popen([sys.executable, "-m", "clicktrain_deploy", "run", "-c", str(path), "--quiet"],
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = tmp_path / "run" / "checkpoints" / "epoch-0000.pt"
    deadline = time.time() + 300
    while not first.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, process.stderr.read().decode()
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "run" / "checkpoints" / "epoch-0001.pt").exists()  # really cut short
    assert json.loads((tmp_path / "run" / "pipeline.json").read_text())["stages"]["train"]["status"] == "running"
    resumed = run(recipe, tmp_path, until="train")
    assert actions(resumed) == {"train": "resumed"}

    def metrics(folder: Path) -> list[dict]:
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        return without_wall_clock(rows)

    assert metrics(tmp_path / "run") == metrics(finished.folder.root)


def test_unknown_target_stops_before_anything_is_written(tmp_path):
    recipe = tiny_recipe(tmp_path / "run", deploy={"targets": ["x86", "riscv"]})
    done = subprocess.run([sys.executable, "-m", "clicktrain_deploy", "run", "-c",
                           str(write_recipe(tmp_path / "r.yaml", recipe))],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "deploy.targets: unknown target 'riscv'; known: arm64, cortex-a72, cortex-a76" in done.stdout
    assert not (tmp_path / "run").exists()


def test_missing_data_stops_at_training_naming_the_path(tmp_path):
    recipe = tiny_recipe(tmp_path / "run", data={"root": str(tmp_path / "no-such-folder")})
    with pytest.raises(PipelineError, match="stage train failed: .*no-such-folder") as info:
        run(recipe, tmp_path)
    assert info.value.stage == "train"
    assert json.loads((tmp_path / "run" / "pipeline.json").read_text())["stages"]["train"]["status"] == "failed"


def _tamper_classifier_bias(library: Path, onnx_path: Path) -> None:
    """Add 1 to the classifier bias stored inside a compiled library."""
    model = onnx.load(str(onnx_path))
    bias = next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == "fc.bias")
    data = library.read_bytes()
    assert data.count(bias.tobytes()) == 1
    library.write_bytes(data.replace(bias.tobytes(), (bias + np.float32(1)).tobytes()))


def test_failing_validation_stops_there_and_keeps_earlier_outputs(copied, tmp_path):
    recipe, folder = copied
    _tamper_classifier_bias(folder.library("x86"), folder.onnx)
    kept = {p: p.read_bytes() for p in [folder.onnx, folder.library("x86"), folder.report,
                                         folder.final_checkpoint(2)]}
    with pytest.raises(PipelineError, match=r"stage validate:x86 failed: x86: disagrees with onnxruntime "
                                            r"on 50 real test images: max \|diff\| 1 ") as info:
        run(recipe, tmp_path)
    assert actions(info.value.result)["compile:x86"] == "cached"  # its inputs did not change
    assert info.value.result.outcomes[-1].name == "validate:x86"
    assert all(path.read_bytes() == data for path, data in kept.items())
    assert json.loads(folder.validation("x86").read_text())["passed"] is False
    # tolerance 0: onnxruntime itself differs from PyTorch in the last bits
    strict = {**recipe, "deploy": {**recipe["deploy"], "atol": 0, "rtol": 0}}
    with pytest.raises(PipelineError, match=r"validate:onnxruntime failed: onnxruntime: disagrees with torch"):
        run(strict, tmp_path)
    assert folder.onnx.read_bytes() == kept[folder.onnx]


def test_targets_validate_by_how_they_run():
    assert runner_kind(TARGETS.get("x86")()) == "host"
    assert runner_kind(TARGETS.get("arm64")()) == "qemu"
    gpu = TargetSpec("some-gpu", {"kind": "cuda"}, NEON_SPARSE, NEON_DENSE)
    assert runner_kind(gpu) == "device"
    if missing_device(gpu) is None:
        pytest.skip("a GPU is present")
    check = check_library(gpu, "absent.so", b"", [], atol=1e-4, rtol=1e-4)
    assert (check.skipped, check.status, check.passed) == ("no GPU", "skipped", False)
    assert check.to_dict()["passed"] is False
    check.require()  # not a failure either: the stage records it as skipped


def test_stage_code_is_what_its_factory_imports_transitively():
    def closure(kind: str, exclude=frozenset()) -> set[str]:
        factory = STAGE_KINDS.get(kind)
        return set(pipeline_state.code_closure(pipeline_state.factory_entries(factory),
                                               shallow=frozenset({factory.__module__}), exclude=exclude))

    kernels, template = "clicktrain_deploy.compile.conv_kernels", "clicktrain_deploy.report/template.html.j2"
    training_kernels = frozenset({"clicktrain_deploy.train.pattern_kernels"})
    assert {"clicktrain_deploy.train.trainer", "clicktrain_deploy.pruning.clicktrain",
            "clicktrain_deploy.models.resnet"} <= closure("train", training_kernels)
    # training runs the kernel generators only with schedule.sparse_kernels (the stage says so)
    assert kernels not in closure("train", training_kernels) and kernels not in closure("export", training_kernels)
    assert {kernels, "clicktrain_deploy.compile.train_kernels", "clicktrain_deploy.compile.cuda.train_kernels"} \
        <= closure("train")
    recipe = parse_recipe({"schedule": {"sparse_kernels": False}})
    folder = RunFolder(Path("unused"))
    assert STAGE_KINDS.get("train")(recipe, folder).unused_code == training_kernels
    recipe = parse_recipe({"schedule": {"sparse_kernels": True}})
    assert STAGE_KINDS.get("train")(recipe, folder).unused_code == frozenset()
    assert all(stage.unused_code == training_kernels for stage in plan(recipe)[1:])
    assert {kernels, "clicktrain_deploy.compile.build", "clicktrain_deploy.compile.targets"} <= closure("compile")
    assert {kernels, "clicktrain_deploy.compile.arm/runner.cc"} <= closure("benchmark")
    assert template in closure("report") and template not in closure("compile")
    # a library upgrade changes every stage's key
    train = STAGE_KINDS.get("train")
    before = pipeline_state.code_digest(train)
    versions = pipeline_state.library_versions()
    assert set(versions) == {"torch", "apache-tvm", "apache-tvm-ffi", "onnx", "onnxruntime"}
    assert all(versions.values())
    real = pipeline_state.library_versions
    try:
        pipeline_state.library_versions = lambda: {**versions, "apache-tvm": "0.28.0"}
        assert pipeline_state.code_digest(train) != before
    finally:
        pipeline_state.library_versions = real
    assert pipeline_state.code_digest(train) == before


def test_modules_loaded_by_computed_name_are_in_the_static_closure():
    import clicktrain_deploy

    closure = pipeline_state.code_closure(["clicktrain_deploy"])
    for name, module in getattr(clicktrain_deploy, "_LAZY", {}).items():  # the package's lazy names
        absolute = "clicktrain_deploy" + module if module.startswith(".") else module
        assert absolute in closure, name
    # any other import by computed name would escape the cache's key: there is none but the
    # benchmark's user-supplied model factory (not package code)
    computed = [path for path in pipeline_state.package_dirs()["clicktrain_deploy"].rglob("*.py")
                if "import_module(" in path.read_text() and path.name != "__init__.py"
                or (path.name == "__init__.py" and path.parent.name != "clicktrain_deploy"
                    and "import_module(" in path.read_text())]
    assert [p.relative_to(REPO).as_posix() for p in computed] in ([], ["clicktrain_deploy/bench/host.py"])


def test_kernel_generator_edit_reruns_compile_and_benchmark(copied, tmp_path, monkeypatch):
    """The cache keys on the source the stages run: an edited copy of the package, with the
    digest pointed at it, rebuilds and re-measures, and keeps training and export."""
    recipe, folder = copied
    source = tmp_path / "source"
    dirs = {}
    for name, path in pipeline_state.package_dirs().items():
        dirs[name] = source / name
        shutil.copytree(path, dirs[name], ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(pipeline_state, "package_dirs", lambda: dirs)
    same = run(recipe, tmp_path)  # a byte-identical copy: the same keys
    assert set(actions(same).values()) == {"cached"}
    library = folder.library("x86").stat().st_mtime_ns
    kernels = dirs["clicktrain_deploy"] / "compile" / "conv_kernels.py"
    kernels.write_text(kernels.read_text() + "\n# an edit of the kernel generator\n")
    edited = run(recipe, tmp_path)
    # every validation runs the validate factory's code, which includes the compiler's runners
    assert actions(edited) == {"train": "cached", "export": "cached", **{s: "ran" for s in STAGES[2:]}}
    assert folder.library("x86").stat().st_mtime_ns != library


def test_cuda_target_without_a_gpu_is_not_reported_as_validated(copied, tmp_path):
    if missing_device(TARGETS.get("cuda")()) is None:
        pytest.skip("a GPU is present: the cuda target validates")
    recipe, folder = copied
    path = write_recipe(tmp_path / "cuda.yaml", {**recipe, "deploy": {**recipe["deploy"], "targets": ["cuda"]}})

    def cli(*options: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "clicktrain_deploy", "run", "-c", str(path), "--quiet",
                               *options], cwd=REPO, capture_output=True, text=True, timeout=900,
                              env={**os.environ, "COLUMNS": "200"})

    done = cli()
    assert done.returncode == 3, done.stdout + done.stderr
    assert "not validated: cuda (skipped: no GPU)" in done.stdout and "--allow-skipped" in done.stdout
    assert re.search(r"validate:cuda\s*│\s*skipped\s", done.stdout), done.stdout
    state = json.loads(folder.state.read_text())["stages"]
    assert state["validate:cuda"]["status"] == "skipped" and state["compile:cuda"]["status"] == "done"
    assert state["benchmark:cuda"]["status"] == "skipped"
    check = json.loads(folder.validation("cuda").read_text())
    assert (check["status"], check["passed"], check["images"]) == ("skipped", False, 0)
    html = folder.report.read_text()
    assert 'id="not-validated"' in html and "NOT VALIDATED (skipped)" in html
    # kept from the run before: still skipped, still exit 3 by default; 0 when skips are allowed
    again = cli("--allow-skipped")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "warning: not validated: cuda" in again.stdout
    assert re.search(r"validate:cuda\s*│\s*skipped \(cached\)", again.stdout), again.stdout
    assert cli().returncode == 3


CHECK_FIGURES = """<script>
window.addEventListener("load", () => {
  const figures = [...document.querySelectorAll("img, svg")].map(e => ({
    alt: e.getAttribute("alt"), complete: e.complete ?? true,
    width: e.naturalWidth ?? e.getBoundingClientRect().width,
    height: e.naturalHeight ?? e.getBoundingClientRect().height}));
  document.body.setAttribute("data-figures", JSON.stringify(figures));
});
</script></body>"""


def _chromium(*args: str) -> subprocess.CompletedProcess:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("chromium missing: scripts/setup.sh installs it")
    return subprocess.run([chromium, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
                           "--virtual-time-budget=5000", *args], capture_output=True, text=True, timeout=120)


def test_report_renders_every_figure_in_headless_chromium(pipeline, tmp_path):
    _, result = pipeline
    regenerated = tmp_path / "report.html"
    done = subprocess.run([sys.executable, "-m", "clicktrain_deploy", "report", str(result.folder.root),
                           "--html", "-o", str(regenerated)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    page = tmp_path / "checked.html"
    page.write_text(regenerated.read_text().replace("</body>", CHECK_FIGURES))
    dom = _chromium("--dump-dom", page.as_uri()).stdout
    found = re.search(r'data-figures="([^"]*)"', dom)
    assert found, dom[-2000:]
    figures = json.loads(found.group(1).replace("&quot;", '"'))
    assert [f["alt"] for f in figures] == ["training curves", "per-layer density", "pattern histogram",
                                           "validation diffs", "whole-model speed-ups", "per-layer latency x86 1"]
    assert all(f["complete"] and f["width"] > 100 and f["height"] > 100 for f in figures), figures
    _chromium("--window-size=1280,3000", f"--screenshot={tmp_path / 'shot.png'}", regenerated.as_uri())
    from PIL import Image

    shot = np.asarray(Image.open(tmp_path / "shot.png").convert("L"))
    assert shot.shape == (3000, 1280) and shot.std() > 20  # a page with content, not a blank one

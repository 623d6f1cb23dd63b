"""The README's first command, timed end to end (issue #13): its figure's recipe and result file.

Runs ``clicktrain-deploy run --config RECIPE`` (by default the README's ``recipes/fashion_resnet20.toml``)
into a fresh output folder, in a child process, and records the measured wall time of the whole
command, each stage's own seconds and status from the run's ``pipeline.json``, the exit status,
the CPU model, core count, the commit and the library versions and the load average before the
command (``environment``), and after it.
``--with-setup`` first runs ``bash scripts/setup.sh`` and times it too (the README's command is
both). One measurement per invocation, appended to ``--out``.json (``--out``.md is rendered from
it): run it on an idle machine, and compare only runs on the same CPU.

    .venv/bin/python benchmarks/pipeline_time.py                 # the run part of the README command
    .venv/bin/python benchmarks/pipeline_time.py --with-setup    # the whole README command
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from clicktrain_deploy.bench import environment
from clicktrain_deploy.fileio import atomic_write_json, atomic_write_text
from clicktrain_deploy.pipeline.state import PipelineState
from clicktrain_deploy.runfolder import RunFolder

REPO = Path(__file__).resolve().parents[1]


def timed(command: list[str], cwd: Path) -> tuple[int, float]:
    """Exit status and wall seconds of ``command``, its output passed through."""
    started = time.perf_counter()
    done = subprocess.run(command, cwd=cwd)
    return done.returncode, time.perf_counter() - started


def stage_times(run_dir: Path) -> dict[str, dict]:
    """Per stage: seconds, status, summary (from the run's pipeline.json; none if it never started)."""
    state = PipelineState.load(RunFolder(run_dir).state)
    return {name: {"seconds": rec.seconds, "status": rec.status, "summary": rec.summary}
            for name, rec in state.stages.items()}


def markdown(results: list[dict]) -> str:
    lines = ["The README's first command, timed end to end (`benchmarks/pipeline_time.py`).", "",
             "| date | CPU | cores | load before | set-up | run | exit | train | stages after training |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        stages = r["stages"]
        train = stages.get("train", {}).get("seconds", 0.0)
        after = sum(s["seconds"] for name, s in stages.items() if name != "train")
        setup = f"{r['setup_s']:.0f} s" if r.get("setup_s") is not None else "-"
        lines.append(f"| {r['date']} | {r['environment']['cpu']} | {r['environment']['cores']} | "
                     f"{r['environment']['load_average'][0]:.1f} | {setup} | {r['run_s']:.0f} s | {r['exit']} | "
                     f"{train:.0f} s | {after:.0f} s |")
    lines += ["", "Stages of the newest run:", "", "| stage | status | seconds |", "|---|---|---|"]
    for name, s in results[-1]["stages"].items():
        lines.append(f"| {name} | {s['status']} | {s['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", type=Path, default=REPO / "recipes" / "fashion_resnet20.toml")
    parser.add_argument("--run-dir", type=Path, default=REPO / "runs" / "pipeline_time",
                        help="fresh output folder (removed first, so nothing is cached)")
    parser.add_argument("--with-setup", action="store_true", help="time bash scripts/setup.sh first")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "pipeline_time")
    args = parser.parse_args()

    import tomllib

    import yaml

    raw = tomllib.loads(args.recipe.read_text())
    raw["output_dir"] = str(args.run_dir.resolve())
    shutil.rmtree(args.run_dir, ignore_errors=True)
    args.run_dir.mkdir(parents=True)
    recipe = args.run_dir.with_name(args.run_dir.name + ".yaml")  # beside the folder: run writes its own copy inside
    recipe.write_text(yaml.safe_dump(raw))

    before = environment()  # CPU, versions, commit and the load average before the command
    setup_s = None
    if args.with_setup:
        code, setup_s = timed(["bash", "scripts/setup.sh"], REPO)
        if code:
            sys.exit(f"scripts/setup.sh exited {code}")
    cli = str(Path(sys.executable).with_name("clicktrain-deploy"))
    code, run_s = timed([cli, "run", "--config", str(recipe), "--quiet"], REPO)
    out_json = args.out.with_suffix(".json")
    results = json.loads(out_json.read_text()) if out_json.is_file() else []
    results.append({
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "recipe": os.path.relpath(args.recipe, REPO),
        "environment": before, "load_after": list(os.getloadavg()),
        "setup_s": setup_s, "run_s": round(run_s, 1), "exit": code, "stages": stage_times(args.run_dir)})
    atomic_write_json(out_json, results)
    atomic_write_text(args.out.with_suffix(".md"), markdown(results))
    print(args.out.with_suffix(".md").read_text())
    sys.exit(code)


if __name__ == "__main__":
    main()

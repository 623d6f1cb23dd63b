"""Why every runtime got slower at 2 threads than at 1 (issue 13), by experiment: the same model
and the same harness, with the runtimes (a) all in one process as the old benchmark ran them
(onnxruntime's spin-wait off, OpenMP passive, TVM's default pool), (b) each alone in its own
process with the runtimes' default waiting (onnxruntime spins, GNU OpenMP's default policy, TVM's
pool pinned to cores), (c) each alone with passive waiting (onnxruntime allow_spinning=0,
OMP_WAIT_POLICY=PASSIVE, TVM_BIND_THREADS=0). All settings of one thread count are timed in ONE
interleaved measurement (one worker process per setting and runtime, rounds rotating across
them), so a shared machine's drifting load hits every setting alike.

    .venv/bin/python benchmarks/thread_isolation.py --onnx M.onnx --sparse S.so --dense D.so \
        --checkpoint RUN --out benchmarks/results/thread_isolation

Reports the median wall time per call and the process CPU time per call (all its threads; above
wall x threads only when waiting threads spin), with the load average before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from clicktrain_deploy.bench import environment, thread_counts
from clicktrain_deploy.bench.host import measure

RUNTIMES = ("ours_sparse", "ours_dense", "onnxruntime", "torch")
PASSIVE = {"ours_sparse": {"TVM_BIND_THREADS": "0"}, "ours_dense": {"TVM_BIND_THREADS": "0"},
           "onnxruntime": {}, "torch": {"OMP_WAIT_POLICY": "PASSIVE"}}
SETTINGS = {
    "one process (old harness)": "all runtimes in one process; onnxruntime allow_spinning=0, OMP_WAIT_POLICY=PASSIVE",
    "own process, default waiting": "each runtime alone; onnxruntime spins, OpenMP and TVM defaults",
    "own process, passive waiting": "each runtime alone; allow_spinning=0, OMP_WAIT_POLICY=PASSIVE, TVM_BIND_THREADS=0",
}


def groups(onnx: str, libraries: dict[str, str], work: str, torch_model: dict | None) -> dict[str, list[dict]]:
    def spec(runtime: str, setting: str, spinning: bool, env: dict) -> dict:
        out = {"runtime": runtime, "label": f"{setting}|{runtime}", "onnx": onnx, "work_dir": work, "layers": False,
               "spinning": spinning, "env": env}
        if runtime in libraries:
            out["library"] = libraries[runtime]
        if runtime == "torch" and torch_model:
            out["torch"] = torch_model
        return out

    old, default, passive = SETTINGS
    out = {old: [spec(r, old, False, {"OMP_WAIT_POLICY": "PASSIVE"}) for r in RUNTIMES]}
    for r in RUNTIMES:
        out[f"{default}|{r}"] = [spec(r, default, True, {})]
        out[f"{passive}|{r}"] = [spec(r, passive, False, PASSIVE[r])]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--onnx", required=True)
    parser.add_argument("--sparse", required=True, help="our pattern-sparse host build (.so, manifest beside it)")
    parser.add_argument("--dense", required=True, help="our dense host build")
    parser.add_argument("--checkpoint", help="trained run, for torch's whole model")
    parser.add_argument("--threads", default="1,all")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/thread_isolation"))
    args = parser.parse_args()
    libraries = {"ours_sparse": args.sparse, "ours_dense": args.dense}
    torch_model = {"checkpoint": args.checkpoint} if args.checkpoint else None
    results = {"environment": environment(), "settings": SETTINGS, "model": args.onnx, "runs": []}
    for threads in thread_counts(args.threads):
        load_before, started = os.getloadavg()[0], time.time()
        timings = measure(groups(args.onnx, libraries, str(Path(args.sparse).parent), torch_model), threads,
                          args.rounds, args.samples)
        run = {"threads": threads, "load_before": load_before, "load_after": os.getloadavg()[0],
               "seconds": round(time.time() - started, 1), "ms": {}, "cpu_ms": {}, "floors_us": {}}
        for key, t in timings.items():
            label, _, what = key.partition("/")
            setting, _, runtime = label.partition("|")
            if what == "model":
                run["ms"].setdefault(setting, {})[runtime] = t.median_us / 1e3
                run["cpu_ms"].setdefault(setting, {})[runtime] = t.cpu_us / 1e3
            else:
                run["floors_us"].setdefault(setting, {}).setdefault(runtime, {})[what] = t.median_us
        results["runs"].append(run)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))
        print(json.dumps(run), flush=True)
    args.out.with_suffix(".md").write_text(to_markdown(results))
    print(to_markdown(results))


def to_markdown(results: dict) -> str:
    env = results["environment"]
    lines = [f"`{results['model']}`, whole model, batch 1: median wall ms per call (process CPU ms per call, all "
             f"threads). {env['cpu']}, {env['cores']} cores, {env['date']}; tvm {env['tvm']}, onnxruntime "
             f"{env['onnxruntime']}, torch {env['torch']}. Every row of one thread count comes from one interleaved "
             "measurement.", "",
             "| setting | threads | load avg | ours sparse | ours dense | onnxruntime | torch |",
             "|---|---|---|---|---|---|---|"]
    for run in results["runs"]:
        for setting in SETTINGS:
            ms, cpu = run["ms"].get(setting, {}), run["cpu_ms"].get(setting, {})
            cells = [f"{ms[r]:.3f} ({cpu[r]:.3f})" if r in ms else "-" for r in RUNTIMES]
            lines.append(f"| {setting} | {run['threads']} | {run['load_before']:.1f}-{run['load_after']:.1f} | "
                         + " | ".join(cells) + " |")
    lines += ["", *[f"- {name}: {text}" for name, text in SETTINGS.items()]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

"""Latency on this machine at a fixed thread count: each runtime alone in its own process.

Thread pools (TVM's, onnxruntime's, torch's OpenMP) are sized when they start and, living in one
process, take cores from each other (see README, "multi-thread figures"). So every runtime is
measured by a worker process of its own, started with its thread count fixed in the environment
(``TVM_NUM_THREADS``, ``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``) and in the runtime's own setting
(onnxruntime ``intra_op_num_threads``, ``torch.set_num_threads``). The parent drives the workers
one at a time: each builds its callables (``bench.runtimes``) and calibrates them, then, round
after round, takes ``samples`` samples of every callable with ``bench.timing.run_samples`` while
the other workers wait, blocked on a pipe. Rounds rotate across workers, so load that drifts
during the run hits every runtime alike, and no two runtimes ever run at the same time.

Protocol: the worker reads one JSON request line (``{"threads", "runtimes": [spec, ...]}``),
answers ``{"calls": {key: k}}``; then for each ``{"samples": S}`` line answers
``{"per_call_s": {key: [...]}, "cpu_s": {key: process CPU seconds}}``; an empty line ends it. Keys are ``runtime/what``: ``model``,
``floor:model``, ``floor:op``, ``layer:<name>``.

A runtime spec: ``{"runtime": name, "onnx": path, "work_dir": path, "layers": bool}`` plus
``"library"`` (ours: a host build with its manifest beside it), ``"torch"`` (torch:
``{"checkpoint": path}`` or ``{"factory": "module:function" | "file.py:function", "kwargs": {},
"state_dict": path}``; without it only the per-layer and floor callables), ``"spinning"``
(onnxruntime: allow_spinning, default on), ``"env"`` (variables for its worker's environment),
``"label"`` (the key prefix instead of the runtime name, to time one runtime in several settings
side by side). Runtime names: ``ours_*`` (any TVM host build), ``onnxruntime``, ``torch``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .timing import MIN_SAMPLE_S, ROUNDS, SAMPLES, Timing, calls_per_sample, run_samples

_WORKER = "from clicktrain_deploy.bench.host import serve; serve()"
HANDOFF_PAUSE_S = 0.02  # between one worker's round and the next: a finished pool's spin-wait ends


def all_cores() -> int:
    """Cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def thread_env(threads: int) -> dict[str, str]:
    """The environment a worker at ``threads`` threads is started with."""
    return {**os.environ, "TVM_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads)}


class Worker:
    """One worker process: its runtimes' callables, built and calibrated at start."""

    def __init__(self, specs: list[dict], threads: int, min_sample_s: float = MIN_SAMPLE_S,
                 env: dict[str, str] | None = None):
        self.stderr = tempfile.TemporaryFile("w+")
        self.process = subprocess.Popen([sys.executable, "-c", _WORKER], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=self.stderr, text=True,
                                        env=env or thread_env(threads))
        self.calls = self._ask({"threads": threads, "runtimes": specs, "min_sample_s": min_sample_s})["calls"]

    def _ask(self, message: dict) -> dict:
        self.process.stdin.write(json.dumps(message) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            self.process.wait()
            self.stderr.seek(0)
            raise RuntimeError(f"benchmark worker failed (exit {self.process.returncode}):\n"
                               f"{self.stderr.read()[-4000:]}")
        return json.loads(line)

    def round(self, samples: int) -> tuple[dict[str, list[float]], dict[str, float]]:
        answer = self._ask({"samples": samples})
        return answer["per_call_s"], answer["cpu_s"]

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.write("\n")
            self.process.stdin.flush()
            self.process.wait(timeout=60)
        self.stderr.close()


def measure(groups: dict[str, list[dict]], threads: int, rounds: int = ROUNDS, samples: int = SAMPLES,
            min_sample_s: float = MIN_SAMPLE_S, on_error: Callable[[str, Exception], None] | None = None,
            env: dict[str, str] | None = None) -> dict[str, Timing]:
    """Time every callable of every group, one worker process per group (``{group: [spec, ...]}``:
    one spec per group isolates each runtime; all specs in one group share a process), in
    ``rounds`` interleaved rounds of ``samples`` samples. Returns {``runtime/what``: Timing}.
    A group whose worker fails to start is reported to ``on_error`` (or raised) and left out.
    ``env``: variables set in every worker beyond :func:`thread_env` (experiments)."""
    workers: dict[str, Worker] = {}
    try:
        for name, specs in groups.items():
            try:
                spec_env = {k: v for spec in specs for k, v in spec.get("env", {}).items()}
                workers[name] = Worker(specs, threads, min_sample_s, {**thread_env(threads), **(env or {}), **spec_env})
            except RuntimeError as exc:
                if on_error is None:
                    raise
                on_error(name, exc)
        per_call: dict[str, list[float]] = {}
        cpu: dict[str, float] = {}
        names = list(workers)
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                values, seconds = workers[name].round(samples)
                for key in values:
                    per_call.setdefault(key, []).extend(values[key])
                    cpu[key] = cpu.get(key, 0.0) + seconds[key]
                time.sleep(HANDOFF_PAUSE_S)
        calls = {key: k for worker in workers.values() for key, k in worker.calls.items()}
        return {key: Timing.from_samples(values, calls[key], cpu[key] / (len(values) * calls[key]))
                for key, values in per_call.items()}
    finally:
        for worker in workers.values():
            worker.close()


# -- the worker side ---------------------------------------------------------------------------
def serve() -> None:
    """Worker main loop (see the module docstring)."""
    request = json.loads(sys.stdin.readline())
    threads = request["threads"]
    import torch

    torch.set_num_threads(threads)
    torch.set_grad_enabled(False)
    fns: dict[str, Callable[[], object]] = {}
    for spec in request["runtimes"]:
        for key, fn in build_callables(spec, threads).items():
            fns[f"{spec.get('label', spec['runtime'])}/{key}"] = fn
    min_sample_s = request.get("min_sample_s", MIN_SAMPLE_S)
    calls = {key: calls_per_sample(fn, min_sample_s) for key, fn in fns.items()}
    _answer({"calls": calls})
    for line in sys.stdin:
        if not line.strip():
            break
        samples = json.loads(line)["samples"]
        per_call, cpu = {}, {}
        for key, fn in fns.items():
            started = time.process_time()
            per_call[key] = run_samples(fn, calls[key], samples)
            cpu[key] = time.process_time() - started
        _answer({"per_call_s": per_call, "cpu_s": cpu})


def _answer(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def model_input(model) -> np.ndarray:
    """The batch-1 input every runtime gets: standard normal, seed 0, at the model's input shape."""
    dims = model.graph.input[0].type.tensor_type.shape.dim
    shape = [1, *[d.dim_value for d in dims[1:]]]
    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


def conv_layers(model) -> list:
    """``bench.flops.LayerWork`` of every Conv with a constant weight, in graph order."""
    from ..contract import read_metadata
    from .flops import layer_work

    return [w for w in layer_work(model, read_metadata(model)) if w.node.op_type == "Conv"]


def build_callables(spec: dict, threads: int) -> dict[str, Callable[[], object]]:
    """One runtime's callables: ``model`` (where it can run the model), ``floor:*`` and, with
    ``spec["layers"]``, ``layer:<name>`` for every conv (ours: where the library has its kernel)."""
    from onnx import numpy_helper

    from . import runtimes
    from .flops import load_model

    runtime, work_dir = spec["runtime"], spec["work_dir"]
    model = load_model(spec["onnx"])
    x = model_input(model)
    layers = conv_layers(model) if spec.get("layers") else []
    fns: dict[str, Callable[[], object]] = {}
    if runtime.startswith("ours"):
        fns["model"] = runtimes.tvm_model_callable(spec["library"], x)
        manifest = json.loads(Path(spec["library"]).with_suffix(".json").read_text())
        functions = {entry["layer"]: entry.get("function") for entry in manifest["layers"]}
        if layers:
            kernels = runtimes.tvm_kernel_callables(spec["library"], x, {f for f in functions.values() if f})
            for work in layers:
                if functions.get(work.layer) in kernels:
                    fns[f"layer:{work.layer}"] = kernels[functions[work.layer]]
        floors = runtimes.floor_callables("ours", threads, work_dir)
    elif runtime == "onnxruntime":
        spinning = spec.get("spinning", True)
        session = runtimes.onnxruntime_session(model, threads, spinning)
        fns["model"] = runtimes.onnxruntime_callable(session, {session.get_inputs()[0].name: x})
        for work in layers:
            single = runtimes.onnxruntime_session(runtimes.single_conv_onnx(work.node, model, work.input_shape),
                                                  threads, spinning)
            xi = np.random.default_rng(1).standard_normal(work.input_shape).astype(np.float32)
            fns[f"layer:{work.layer}"] = runtimes.onnxruntime_callable(single, {"x": xi})
        floors = {"model": runtimes.onnxruntime_callable(
            runtimes.onnxruntime_session(runtimes.trivial_onnx(), threads, spinning),
            {"x": np.ones(1, np.float32)})}
    elif runtime == "torch":
        if spec.get("torch"):
            fns["model"] = runtimes.torch_callable(load_torch_model(spec["torch"]), x)
        weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        for work in layers:
            node = work.node
            bias = weights.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            xi = np.random.default_rng(1).standard_normal(work.input_shape).astype(np.float32)
            fns[f"layer:{work.layer}"] = runtimes.torch_conv_callable(node, weights[node.input[1]], bias, xi)
        floors = runtimes.floor_callables("torch", threads, work_dir)
    else:
        raise ValueError(f"unknown runtime {runtime!r}")
    fns |= {f"floor:{level}": fn for level, fn in floors.items()}
    return fns


def load_torch_model(how: dict):
    """The torch model a spec names: a trained checkpoint, or a factory plus a state dict."""
    import importlib
    import importlib.util

    import torch

    if how.get("checkpoint"):
        from ..train import load_checkpoint, restore_model

        net, _ = restore_model(load_checkpoint(how["checkpoint"]))
        return net
    where, _, name = how["factory"].rpartition(":")
    if where.endswith(".py"):
        loaded = importlib.util.spec_from_file_location(Path(where).stem, where)
        module = importlib.util.module_from_spec(loaded)
        loaded.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    net = getattr(module, name)(**how.get("kwargs", {}))
    if how.get("state_dict"):
        net.load_state_dict(torch.load(how["state_dict"], map_location="cpu"))
    return net

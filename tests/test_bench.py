"""The benchmark's measuring parts: multiply-add counts, single-op models, the one timing harness
that every runtime goes through, floors, synthetic pattern-pruned models, tables.

No assertion here is about how fast a real model is: speed claims come from benchmarks/.
"""
from __future__ import annotations

import io
import json
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from clicktrain_deploy.bench import host, host_latency, runtimes, timing
from clicktrain_deploy.bench.flops import flop_reduction_limit, layer_work
from clicktrain_deploy.bench.markdown import to_markdown
from clicktrain_deploy.bench.synthetic import pattern_pruned_onnx
from clicktrain_deploy.contract import load_onnx
from clicktrain_deploy.passes.onnx_passes import verify

COST_S = 200e-6


def spin(seconds: float = COST_S) -> None:
    """A call of known cost: busy-waits ``seconds`` of wall-clock time."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


# -- the harness ---------------------------------------------------------------------------------
def test_harness_measures_a_known_cost():
    """A busy-wait of 200 us: the harness never reports less, and what it reports is what the calls
    themselves took (timed inside each call), so on a loaded machine too it measures the call and
    adds nothing of its own beyond the loop (< 1 us a call)."""
    took = []

    def call():
        started = time.perf_counter()
        spin()
        took.append(time.perf_counter() - started)

    k = timing.calls_per_sample(call)
    # the smallest power of two whose k calls last >= 2 ms: 16 calls of 200 us (fewer if preempted)
    assert k <= 16 and k * COST_S * 2 >= timing.MIN_SAMPLE_S
    took.clear()
    per_call = timing.run_samples(call, k, 7)
    t = timing.Timing.from_samples(per_call, k)
    assert t.samples == 7 and t.calls == k and len(took) == 7 * k
    assert COST_S * 1e6 <= t.min_us <= t.q1_us <= t.median_us <= t.q3_us
    inside = [sum(took[i * k:(i + 1) * k]) / k for i in range(7)]
    for measured, actual in zip(per_call, inside):
        assert actual <= measured < actual + 1e-6 + 0.01 * actual


def test_calls_per_sample_fills_the_sample_for_cheap_calls():
    k = timing.calls_per_sample(lambda: None)
    assert k >= 1024  # an empty call costs well under 2 us


def test_interleaved_rotates_rounds_and_takes_every_sample():
    order = []
    fns = {name: (lambda name=name: (order.append(name), spin(50e-6))) for name in "abc"}
    result = timing.interleaved(fns, rounds=3, samples=2)
    assert {name: t.samples for name, t in result.items()} == {"a": 6, "b": 6, "c": 6}
    # after calibration, round r starts with the r-th callable
    calibrated = sum(3 + 1 for _ in fns)  # at least the warm-up calls and one sample each
    starts = [name for i, name in enumerate(order[calibrated:]) if i == 0 or order[calibrated:][i - 1] != name]
    assert starts[:3] in (["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"])
    assert all(t.median_us >= 50 for t in result.values())


def test_worker_times_every_runtime_with_run_samples(monkeypatch, trivial):
    """In-process run of the worker loop: every callable of every runtime goes through
    ``run_samples`` (the same function), and the answer has a sample list for each."""
    onnx_path, library, work = trivial
    seen = []
    real = host.run_samples

    def recording(fn, k, samples):
        seen.append(fn)
        return real(fn, k, samples)

    monkeypatch.setattr(host, "run_samples", recording)
    specs = [{"runtime": r, "onnx": str(onnx_path), "work_dir": str(work), "layers": False} for r in
             ("ours", "onnxruntime", "torch")]
    specs[0]["library"] = str(library)
    specs[2]["torch"] = {"factory": "torch.nn:ReLU"}
    stdin = io.StringIO(json.dumps({"threads": 1, "runtimes": specs, "min_sample_s": 1e-4}) + "\n"
                        + json.dumps({"samples": 2}) + "\n\n")
    stdout = io.StringIO()
    monkeypatch.setattr("sys.stdin", stdin)
    monkeypatch.setattr("sys.stdout", stdout)
    grad = torch.is_grad_enabled()
    try:
        host.serve()
    finally:
        torch.set_grad_enabled(grad)
        torch.set_num_threads(torch.get_num_threads())
    calls, answer = (json.loads(line) for line in stdout.getvalue().splitlines())
    keys = set(calls["calls"])
    assert keys == {"ours/model", "ours/floor:model", "ours/floor:op", "onnxruntime/model",
                    "onnxruntime/floor:model", "torch/model", "torch/floor:model", "torch/floor:op"}
    assert set(answer["per_call_s"]) == keys and all(len(v) == 2 for v in answer["per_call_s"].values())
    assert len(seen) == len(keys)


def test_each_runtime_alone_in_its_process_reports_its_floor(trivial):
    onnx_path, library, work = trivial
    result = host_latency(onnx_path, {"ours": library}, work, 1, torch_model={"factory": "torch.nn:ReLU"},
                          layers=False, rounds=2, samples=2)
    assert set(result) == {"ours", "onnxruntime", "torch"}
    for runtime, entry in result.items():
        assert entry["model_ms"] > 0 and entry["model"]["samples"] == 4
        assert entry["floors_us"]["model"] > 0, runtime
    assert set(result["ours"]["floors_us"]) == {"model", "op"}
    assert set(result["torch"]["floors_us"]) == {"model", "op"}


def test_a_failing_runtime_is_reported_and_the_others_measured(trivial):
    onnx_path, library, work = trivial
    errors = {}
    result = host_latency(onnx_path, {"ours": work / "missing.so"}, work, 1, runtimes=["ours", "onnxruntime"],
                          layers=False, rounds=1, samples=1, on_error=lambda name, exc: errors.update({name: exc}))
    assert set(errors) == {"ours"} and set(result) == {"onnxruntime"}


@pytest.fixture(scope="module")
def trivial(tmp_path_factory):
    """The floor model as an ONNX file and a TVM library (with an empty manifest)."""
    work = tmp_path_factory.mktemp("floor")
    onnx_path = work / "relu.onnx"
    onnx.save(runtimes.trivial_onnx(), str(onnx_path))
    library = runtimes.trivial_tvm_library(work / "relu.so")
    library.with_suffix(".json").write_text(json.dumps({"layers": []}))
    return onnx_path, library, work


# -- the runtimes' callables ---------------------------------------------------------------------
def test_onnxruntime_callable_writes_the_bound_output():
    session = runtimes.onnxruntime_session(runtimes.trivial_onnx(), 1)
    x = np.full(1, -3.0, np.float32)
    call = runtimes.onnxruntime_callable(session, {"x": x})
    assert call() is None  # outputs stay in the pre-allocated buffer; nothing is converted
    assert session.run(None, {"x": x})[0].tolist() == [0.0]


def test_tvm_kernel_callables_capture_the_kernels_the_vm_calls(trivial):
    _, library, _ = trivial
    kernels = runtimes.tvm_kernel_callables(library, np.ones(1, np.float32))
    assert len(kernels) == 1 and not next(iter(kernels)).startswith("vm.")
    next(iter(kernels.values()))()
    assert runtimes.tvm_kernel_callables(library, np.ones(1, np.float32), {"absent"}) == {}


def test_torch_conv_callable_pads_asymmetric_pads():
    node = onnx.helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[0, 0, 1, 1], strides=[2, 2])
    x = np.random.default_rng(0).standard_normal((1, 2, 6, 6)).astype(np.float32)
    w = np.random.default_rng(1).standard_normal((3, 2, 3, 3)).astype(np.float32)
    runtimes.torch_conv_callable(node, w, None, x)()  # shapes valid: (1, 2, 7, 7) -> (1, 3, 3, 3)


# -- models and counts ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_and_metadata(exported):
    model = load_onnx(exported[1].path)
    return model, verify(model)


def test_layer_work_counts_kept_taps_per_pattern_layer(model_and_metadata):
    model, metadata = model_and_metadata
    work = {w.layer: w for w in layer_work(model, metadata)}
    for entry in metadata.layers:
        w = work[entry.module]
        kept_kernels = int((np.asarray(entry.mask.kernel_pattern_ids()) >= 0).sum())
        pixels = w.dense_macs // entry.mask.pattern_ids.shape[1] // entry.mask.out_channels // 9
        # pattern layers keep 4 taps per surviving kernel, unless training left a kept tap at zero
        assert w.kept_macs <= kept_kernels * 4 * pixels
        assert w.kept_macs >= 0.95 * kept_kernels * 4 * pixels
    limit = flop_reduction_limit(list(work.values()))
    assert 1.5 < limit < max(w.limit for w in work.values())


def test_single_conv_model_matches_torch(model_and_metadata):
    model, metadata = model_and_metadata
    work = next(w for w in layer_work(model, metadata) if w.node.op_type == "Conv" and w.layer in
                {e.module for e in metadata.layers})
    single = runtimes.single_conv_onnx(work.node, model, work.input_shape)
    x = np.random.default_rng(0).standard_normal(work.input_shape).astype(np.float32)
    got = ort.InferenceSession(single.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    weights = {t.name: torch.from_numpy(numpy_helper.to_array(t)) for t in model.graph.initializer}
    expected = torch.nn.functional.conv2d(torch.from_numpy(x), weights[work.node.input[1]],
                                          weights[work.node.input[2]], padding=1)
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-5)


def _tiny() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1, bias=False), torch.nn.BatchNorm2d(32),
                               torch.nn.ReLU(), torch.nn.Conv2d(32, 64, 3, padding=1, bias=False),
                               torch.nn.BatchNorm2d(64), torch.nn.ReLU(), torch.nn.Conv2d(64, 64, 1),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(64, 10))


def test_synthetic_model_carries_verified_8x_masks(tmp_path):
    made = pattern_pruned_onnx(_tiny(), (3, 16, 16), tmp_path / "m.onnx")
    model = load_onnx(made.onnx)
    metadata = verify(model)  # raises unless every weight obeys the masks
    assert [e.module for e in metadata.layers] == ["0", "3"] and {e.mask.block_size for e in metadata.layers} == {16}
    assert made.pruned_layers == 2 and 6.5 < made.compression < 8.5
    assert all(e.mask.kept_fraction() > 0 for e in metadata.layers)
    restored = _tiny()
    restored.load_state_dict(torch.load(made.state_dict))
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    got = ort.InferenceSession(str(made.onnx), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, restored.eval()(torch.from_numpy(x)).detach().numpy(), atol=1e-4, rtol=1e-4)


# -- tables --------------------------------------------------------------------------------------
def test_markdown_puts_ratios_beside_limits_and_floors():
    entry = lambda ms, floors, layer: {"model_ms": ms, "floors_us": floors, "layers_us": {"c": layer}}  # noqa: E731
    record = {"onnx": "m.onnx", "flop_reduction_limit": 8.0,
              "environment": {"cpu": "Intel(R) Xeon(R) Processor", "cores": 2, "date": "2026-12-01", "tvm": "0.27"},
              "layers": [{"layer": "c", "shape": [16, 16, 3, 3], "kernel": "pattern", "reason": "", "flop_limit": 9.0}],
              "timings": {"1": {"ours_sparse": entry(0.1, {"model": 5.0, "op": 0.5}, 5.0),
                                "ours_dense": entry(0.3, {"model": 5.0, "op": 0.5}, 15.0),
                                "onnxruntime": entry(0.35, {"model": 3.0}, 30.0),
                                "torch": entry(1.0, {"model": 4.0, "op": 1.5}, 90.0)}},
              "arm": {"cpu": "cortex-a72", "ours_sparse": 1_000_000, "ours_dense": 5_000_000, "onnxruntime": 6_000_000}}
    text = to_markdown(record)
    assert "| 1 | 0.100 ms | 0.300 ms | 0.350 ms | 1.000 ms | 3.50x | 3.00x | 1.17x | 8.00x |" in text
    assert "| 1 | 5.00 us | 0.50 us | 3.00 us | 4.00 us | 1.50 us |" in text
    assert "| 1.00 M | 5.00 M | 6.00 M | 5.00x | 6.00x | 8.00x | 75% |" in text
    assert "| c | 16x16x3x3 | pattern | 5.0 | 15.0 | 30.0 | 90.0 | 3.00x | 9.00x | 6.00x | 2.00x |" in text


def test_compile_bar_resume_keeps_what_still_holds():
    """A re-run skips what is recorded: results of another compiler drop ours only, results of
    another ONNX file drop everything."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "compile_bar.py"
    loaded = importlib.util.spec_from_file_location("compile_bar", path)
    compile_bar = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(compile_bar)
    timings = {"1": {"ours_sparse": {}, "ours_dense": {}, "onnxruntime": {}, "torch": {}}}
    results = {"models": {"m": {"onnx_sha256": "a", "compiler": "c1", "timings": timings, "errors": {},
                                "arm": {"cpu": "cortex-a72", "ours_sparse": 1, "ours_dense": 2, "onnxruntime": 3}}}}
    same = compile_bar.record_for(results, "m", "a", "c1")
    assert set(same["timings"]["1"]) == {"ours_sparse", "ours_dense", "onnxruntime", "torch"}
    newer = compile_bar.record_for(results, "m", "a", "c2")
    assert set(newer["timings"]["1"]) == {"onnxruntime", "torch"} and newer["arm"] == {"cpu": "cortex-a72", "onnxruntime": 3}
    other = compile_bar.record_for(results, "m", "b", "c2")
    assert other["timings"] == {} and other["arm"] == {}

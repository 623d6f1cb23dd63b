"""The benchmark's measuring parts: multiply-add counts, single-conv models, fair timing."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from clicktrain_deploy.bench.flops import flop_reduction_limit, layer_work
from clicktrain_deploy.bench.host import _single_conv
from clicktrain_deploy.bench.markdown import to_markdown
from clicktrain_deploy.bench.timing import interleaved_medians
from clicktrain_deploy.contract import load_onnx
from clicktrain_deploy.passes.onnx_passes import verify


@pytest.fixture(scope="module")
def model_and_metadata(exported):
    model = load_onnx(exported[1].path)
    return model, verify(model)


def test_layer_work_counts_kept_taps_per_pattern_layer(model_and_metadata):
    model, metadata = model_and_metadata
    work = {w.layer: w for w in layer_work(model, metadata)}
    for entry in metadata.layers:
        w = work[entry.module]
        kept_kernels = int((entry.mask.kernel_pattern_ids() >= 0).sum())
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
    single = _single_conv(work, model)
    x = np.random.default_rng(0).standard_normal(work.input_shape).astype(np.float32)
    got = ort.InferenceSession(single.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    weights = {t.name: torch.from_numpy(numpy_helper.to_array(t)) for t in model.graph.initializer}
    expected = torch.nn.functional.conv2d(torch.from_numpy(x), weights[work.node.input[1]],
                                          weights[work.node.input[2]], padding=1)
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-5)


def test_interleaved_medians_orders_cheap_before_costly():
    a = np.random.default_rng(0).standard_normal((200, 200)).astype(np.float32)
    times = interleaved_medians({"small": lambda: a[:20, :20] @ a[:20, :20], "large": lambda: a @ a @ a},
                                rounds=3, budget_s=0.02)
    assert 0 < times["small"] < times["large"]


def test_markdown_puts_ratio_beside_limit():
    result = {"date": "2026-11-21", "machine": "znver5", "onnx": "m.onnx", "flop_reduction_limit": 8.0,
              "x86": {"1": {"ours_sparse": 0.1, "ours_dense": 0.3, "onnxruntime": 0.35}},
              "x86_layers_us": {"1": {"c": {"ours_pattern": 5.0, "ours_dense": 15.0, "onnxruntime": 30.0,
                                            "torch": 90.0}}},
              "layers": [{"layer": "c", "shape": [16, 16, 3, 3], "kernel": "pattern", "reason": "", "flop_limit": 9.0}],
              "arm": {"cpu": "cortex-a72", "ours_sparse": 1_000_000, "ours_dense": 5_000_000}}
    text = to_markdown(result)
    assert "| 1 | 0.100 ms | 0.300 ms | 0.350 ms | - | 3.50x | 3.00x | 1.17x |" in text
    assert "| 1.00 M | 5.00 M | 5.00x | 8.00x | 62% |" in text
    assert "| c | 16x16x3x3 | pattern | 5.0 | 15.0 | 30.0 | 90.0 | 3.00x | 9.00x | 6.00x |" in text

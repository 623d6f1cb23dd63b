"""ONNX export: round trip, onnxruntime against PyTorch on real data, tampering, bad files."""
from __future__ import annotations

import base64
import json
import subprocess
import sys
import zlib

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings, strategies as st
from onnx import numpy_helper

from clicktrain_deploy.contract import METADATA_KEY, MetadataError, load_onnx, parse_metadata, read_metadata
from clicktrain_deploy.export.check import onnxruntime_session
from clicktrain_deploy.export.onnx_export import ExportError, export_onnx, inspect_onnx
from clicktrain_deploy.passes.onnx_passes import strip, verify
from clicktrain_deploy.train import load_checkpoint, restore_model

from .conftest import REPO


def _set_metadata(model: onnx.ModelProto, document: dict) -> onnx.ModelProto:
    strip(model)
    model.metadata_props.add(key=METADATA_KEY, value=json.dumps(document))
    return model


def _initializer(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(t for t in model.graph.initializer if t.name == name)


def test_round_trip_keeps_masks_and_folds_batchnorm(exported):
    run, result = exported
    model = load_onnx(result.path)
    assert model.ir_version <= 10 and model.opset_import[0].version == 18
    assert not any(n.op_type == "BatchNormalization" for n in model.graph.node)
    metadata = read_metadata(model)
    _, pruner = restore_model(load_checkpoint(run.output_dir))
    np.testing.assert_array_equal(metadata.library, pruner.library.numpy())
    assert [e.module for e in metadata.layers] == list(pruner.masks)
    for entry in metadata.layers:
        np.testing.assert_array_equal(entry.mask.pattern_ids, pruner.masks[entry.module].pattern_ids.numpy())
        assert entry.mask.block_size == pruner.masks[entry.module].block_size
    checked = verify(model)  # the metadata it checked against the weights: every layer of it
    assert [e.module for e in checked.layers] == list(pruner.masks)


def test_onnxruntime_matches_pytorch_on_real_images_at_any_batch(exported, fmnist):
    run, result = exported
    assert result.agreement.images == 200 and result.agreement.top1_agreement == 100.0
    assert result.agreement.max_abs_diff < 1e-4
    model, _ = restore_model(load_checkpoint(run.output_dir))
    model.eval()
    session = onnxruntime_session(result.path.read_bytes())
    for batch in (1, 7):
        images = (fmnist.test.images[:batch].float() / 255 - 0.2860) / 0.3530
        got = session.run(None, {"input": images.numpy()})[0]
        with torch.no_grad():
            np.testing.assert_allclose(got, model(images).numpy(), atol=1e-4, rtol=1e-4)


def test_inspect_matches_the_training_report(exported):
    run, result = exported
    report, metadata = inspect_onnx(load_onnx(result.path))
    assert metadata is not None
    for onnx_layer, torch_layer in zip(report.layers, run.report.layers, strict=True):
        assert onnx_layer.name == torch_layer.name
        assert onnx_layer.nonzeros == torch_layer.nonzeros
        assert onnx_layer.kernels_kept == torch_layer.kernels_kept
        assert onnx_layer.pattern_histogram == torch_layer.pattern_histogram
    assert report.compression["paper_convs"] == pytest.approx(run.report.compression["paper_convs"])


def test_one_tampered_weight_is_caught_and_named(exported):
    model = load_onnx(exported[1].path)
    entry = read_metadata(model).layers[3]
    ids = entry.mask.kernel_pattern_ids()
    tensor = _initializer(model, entry.initializer)
    weight = numpy_helper.to_array(tensor).copy()
    o, i = (int(v) for v in np.argwhere(ids == -1)[0])  # a removed kernel
    weight[o, i, 1, 1] = 0.5
    tensor.CopyFrom(numpy_helper.from_array(weight, tensor.name))
    with pytest.raises(MetadataError, match=rf"{entry.module}.*kernel \(out {o}, in {i}\) is removed"):
        verify(model)


def test_one_tampered_pattern_id_is_caught(exported):
    model = load_onnx(exported[1].path)
    document = json.loads(next(p.value for p in model.metadata_props if p.key == METADATA_KEY))
    layer = document["layers"][0]
    ids = np.frombuffer(zlib.decompress(base64.b64decode(layer["pattern_ids"])), np.int8).copy()
    first_kept = int(np.flatnonzero(ids >= 0)[0])
    ids[first_kept] = (ids[first_kept] + 1) % len(document["library"])
    layer["pattern_ids"] = base64.b64encode(zlib.compress(ids.tobytes())).decode()
    with pytest.raises(MetadataError, match=rf"{layer['module']}.*uses pattern"):
        verify(_set_metadata(model, document))


def test_bad_metadata_and_files_are_clear_errors(exported, tmp_path):
    model = load_onnx(exported[1].path)
    document = json.loads(next(p.value for p in model.metadata_props if p.key == METADATA_KEY))
    with pytest.raises(MetadataError, match="schema version 2 is not supported"):
        verify(_set_metadata(model, {**document, "version": 2}))
    shortcut = {**document["layers"][0], "initializer": "layers.1.0.shortcut.0.weight",
                "shape": [32, 16, 1, 1]}
    with pytest.raises(MetadataError, match="shortcut.0.weight.*3x3 convs only"):
        verify(_set_metadata(model, {**document, "layers": [shortcut]}))
    missing = {**document["layers"][0], "initializer": "no.such.weight"}
    with pytest.raises(MetadataError, match="'no.such.weight'.*no Conv"):
        verify(_set_metadata(model, {**document, "layers": [missing]}))
    data = exported[1].path.read_bytes()
    (tmp_path / "truncated.onnx").write_bytes(data[: len(data) // 3])
    with pytest.raises(ExportError, match="truncated.onnx: not a valid ONNX model"):
        load_onnx(tmp_path / "truncated.onnx")
    (tmp_path / "text.onnx").write_text("hello")
    with pytest.raises(ExportError, match="text.onnx: not a valid ONNX model"):
        load_onnx(tmp_path / "text.onnx")


def test_a_plain_model_is_reported_as_dense(exported):
    model = strip(load_onnx(exported[1].path))
    assert read_metadata(model) is None and verify(model) is None
    report, metadata = inspect_onnx(model)
    assert metadata is None and report.layers == []
    assert report.compression["paper_convs"] > 7  # the zeros are still in the weights


def test_failed_gate_writes_nothing(exported, tmp_path):
    run, _ = exported
    target = tmp_path / "never.onnx"
    with pytest.raises(ExportError, match="onnxruntime disagrees"):
        export_onnx(run.output_dir, target, check_images=50, atol=0.0, rtol=0.0)
    assert list(tmp_path.iterdir()) == []


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clicktrain_deploy", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600)


def test_validate_and_inspect_commands(exported, tmp_path):
    run, result = exported
    ok = _cli("validate", str(result.path), "--checkpoint", str(run.output_dir), "--images", "300", "--json")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    report = json.loads(ok.stdout)
    assert report["passed"] and report["images"] == 300 and report["top1_agreement"] == 100.0
    # a model whose classifier bias was changed still matches its metadata but not PyTorch
    model = load_onnx(result.path)
    bias = _initializer(model, "fc.bias")
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + 1.0, "fc.bias"))
    onnx.save(model, tmp_path / "changed.onnx")
    bad = _cli("validate", str(tmp_path / "changed.onnx"), "--checkpoint", str(run.output_dir),
               "--images", "100")
    assert bad.returncode == 1 and "FAIL" in bad.stdout
    shown = _cli("inspect", str(result.path), "--json")
    assert shown.returncode == 0 and json.loads(shown.stdout)["has_pattern_metadata"]


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                     lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner), max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), _json.map(json.dumps)))
def test_fuzz_metadata_reader_raises_only_metadata_errors(text):
    try:
        parse_metadata(text)
    except MetadataError:
        pass


@settings(max_examples=300, deadline=None)
@given(field=st.sampled_from(["initializer", "module", "shape", "block_size", "pattern_ids"]),
       value=_json)
def test_fuzz_one_corrupted_layer_field(field, value):
    ids = base64.b64encode(zlib.compress(np.zeros(4, np.int8).tobytes())).decode()
    layer = {"initializer": "w", "module": "m", "shape": [4, 4, 3, 3], "block_size": 4, "pattern_ids": ids}
    document = {"schema": "clicktrain-deploy/pattern-sparsity", "version": 1,
                "library": ["...|.XX|.XX"], "layers": [{**layer, field: value}]}
    try:
        parse_metadata(json.dumps(document))
    except MetadataError:
        pass

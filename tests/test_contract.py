"""The contract between export and compile: numpy masks, the metadata document, the weight check."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import helper

from clicktrain_deploy import contract
from clicktrain_deploy.contract import (
    MODEL_INFO_KEY, REMOVED, ExportError, LayerEntry, LayerMask, MetadataError, PatternMetadata,
    check_weight, format_pattern, load_onnx, model_info, parse_library, parse_metadata, parse_pattern,
    read_metadata, validate_library,
)
from clicktrain_deploy.errors import ClickTrainError
from clicktrain_deploy.pruning import masks as torch_masks
from clicktrain_deploy.pruning.patterns import PATTERN_LIBRARIES

LIBRARY = PATTERN_LIBRARIES.get("clicktrain8")().numpy()


def _mask(out_channels=10, in_channels=3, block=4, seed=0) -> LayerMask:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, len(LIBRARY), (-(-out_channels // block), in_channels))
    ids[rng.random(ids.shape) < 0.5] = REMOVED
    return LayerMask(out_channels, block, ids)


def test_mask_semantics_on_numpy():
    mask = _mask()
    assert isinstance(mask.pattern_ids, np.ndarray) and mask.pattern_ids.dtype == np.int64
    assert mask.in_channels == 3 and mask.block_sizes().tolist() == [4, 4, 2]
    ids = mask.kernel_pattern_ids()
    assert ids.shape == (10, 3) and (ids[:4] == mask.pattern_ids[0]).all() and (ids[8:] == mask.pattern_ids[2]).all()
    dense = mask.dense(LIBRARY)
    assert dense.dtype == np.float32 and dense.shape == (10, 3, 3, 3)
    for o in range(10):
        for i in range(3):
            expected = np.zeros(9) if ids[o, i] == REMOVED else LIBRARY[ids[o, i]]
            np.testing.assert_array_equal(dense[o, i].reshape(9), expected)
    kept = sum(int(s) for b, s in enumerate(mask.block_sizes()) for c in range(3) if mask.pattern_ids[b, c] >= 0)
    assert mask.kept_fraction() == pytest.approx(kept / 30)


def test_the_training_mask_answers_through_the_contract():
    mask = _mask(20, 7, 16, seed=1)
    trained = torch_masks.LayerMask(20, 16, torch.from_numpy(np.asarray(mask.pattern_ids)))
    assert torch.equal(trained.kernel_pattern_ids(), torch.from_numpy(np.asarray(mask.kernel_pattern_ids())))
    assert torch.equal(trained.dense(torch.from_numpy(LIBRARY)), torch.from_numpy(mask.dense(LIBRARY)))
    assert torch.equal(trained.block_sizes(), torch.from_numpy(mask.block_sizes()))
    assert trained.kept_fraction() == mask.kept_fraction()
    np.testing.assert_array_equal(trained.to_contract().pattern_ids, mask.pattern_ids)


def test_patterns_and_libraries():
    assert parse_pattern("X.X|.X.|X..").dtype == bool
    assert format_pattern(parse_pattern("X.X|.X.|X..")) == "X.X|.X.|X.."
    assert [format_pattern(p) for p in parse_library(["...|.XX|.XX", "XX.|XX.|..."])] == ["...|.XX|.XX", "XX.|XX.|..."]
    with pytest.raises(ValueError, match="three rows"):
        parse_pattern("XX|..")
    with pytest.raises(ValueError, match=r"must be bool \(K, 9\), got \(2, 9\) int64"):
        validate_library(np.zeros((2, 9), np.int64))
    with pytest.raises(ValueError, match="keeps 5 taps"):
        validate_library(np.array([[1, 1, 1, 1, 1, 0, 0, 0, 0]], bool))
    with pytest.raises(ValueError, match="repeated"):
        parse_library(["...|.XX|.XX", "...|.XX|.XX"])


def test_metadata_round_trip_is_numpy():
    metadata = PatternMetadata(LIBRARY, [LayerEntry("a.weight", "a", _mask()), LayerEntry("b.weight", "b", _mask(8, 5, 1))])
    back = parse_metadata(metadata.to_json())
    assert isinstance(back.library, np.ndarray) and back.library.dtype == bool
    np.testing.assert_array_equal(back.library, LIBRARY)
    for got, want in zip(back.layers, metadata.layers, strict=True):
        assert (got.initializer, got.module, got.shape, got.mask.block_size) == \
            (want.initializer, want.module, want.shape, want.mask.block_size)
        np.testing.assert_array_equal(got.mask.pattern_ids, want.mask.pattern_ids)
    assert issubclass(MetadataError, ClickTrainError)
    with pytest.raises(MetadataError, match="schema version 2 is not supported"):
        parse_metadata(json.dumps({**json.loads(metadata.to_json()), "version": 2}))


def test_check_weight_names_kernel_and_tap():
    entry = LayerEntry("a.weight", "a", _mask())
    weight = entry.mask.dense(LIBRARY) * 0.5
    check_weight(entry, weight, LIBRARY, "layer 'a'")
    ids = entry.mask.kernel_pattern_ids()
    o, i = (int(v) for v in np.argwhere(ids == REMOVED)[0])
    bad = weight.copy()
    bad[o, i, 2, 1] = 0.25
    with pytest.raises(MetadataError, match=rf"layer 'a': kernel \(out {o}, in {i}\) is removed but has "
                                            r"non-zero weight 0.25 at tap \(row 2, col 1\)"):
        check_weight(entry, bad, LIBRARY, "layer 'a'")
    o, i = (int(v) for v in np.argwhere(ids >= 0)[0])
    tap = int(np.flatnonzero(~LIBRARY[ids[o, i]])[0])
    bad = weight.copy()
    bad[o, i].flat[tap] = -1.0
    with pytest.raises(MetadataError, match=rf"uses pattern {ids[o, i]} \({format_pattern(LIBRARY[ids[o, i]])}\)".replace("|", r"\|")):
        check_weight(entry, bad, LIBRARY, "layer 'a'")


def test_onnx_model_helpers(tmp_path):
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    assert read_metadata(model) is None and model_info(model) is None
    model.metadata_props.add(key=MODEL_INFO_KEY, value=json.dumps({"classes": 10}))
    model.metadata_props.add(key=contract.METADATA_KEY,
                             value=PatternMetadata(LIBRARY, []).to_json())
    assert model_info(model) == {"classes": 10} and read_metadata(model).layers == []
    onnx.save(model, tmp_path / "m.onnx")
    assert model_info(load_onnx(tmp_path / "m.onnx")) == {"classes": 10}
    with pytest.raises(ExportError, match="missing.onnx: file not found"):
        load_onnx(tmp_path / "missing.onnx")
    (tmp_path / "cut.onnx").write_bytes((tmp_path / "m.onnx").read_bytes()[:20])
    with pytest.raises(ExportError, match="cut.onnx: not a valid ONNX model"):
        load_onnx(tmp_path / "cut.onnx")

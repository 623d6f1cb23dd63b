"""Pattern metadata inside an ONNX model: a versioned JSON document in ``metadata_props``.

Key ``clicktrain.sparsity``; schema ``clicktrain-deploy/pattern-sparsity`` version 1::

    {
      "schema": "clicktrain-deploy/pattern-sparsity",
      "version": 1,
      "library": ["...|.XX|.XX", ...],            # K patterns, rows top to bottom, X = kept tap
      "layers": [
        {"initializer": "layers.0.0.conv1.weight", # the Conv weight initializer, (C_out, C_in, 3, 3)
         "module": "layers.0.0.conv1",             # PyTorch module it came from
         "shape": [16, 16, 3, 3],
         "block_size": 16,                         # B output channels share each pattern
         "pattern_ids": "eJz..."}                  # base64(zlib(int8 (ceil(C_out/B), C_in), row-major))
      ]
    }

``pattern_ids[b, c]`` is the library index used by the B kernels of output block b on input
channel c, or -1 where those kernels are removed. Layers not listed are dense. About 1 byte per
kernel group before compression, so even 20M-weight models carry a few hundred KB at most.
"""
from __future__ import annotations

import base64
import binascii
import json
import math
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ClickTrainError
from ..pruning.masks import REMOVED, LayerMask
from ..pruning.patterns import format_pattern, parse_pattern, validate_library

METADATA_KEY = "clicktrain.sparsity"
SCHEMA = "clicktrain-deploy/pattern-sparsity"
VERSION = 1


class MetadataError(ClickTrainError):
    """Pattern metadata is malformed, of an unknown version, or contradicts the weights."""


@dataclass
class LayerEntry:
    """One pruned conv as the metadata states it."""

    initializer: str
    module: str
    mask: LayerMask

    @property
    def shape(self) -> list[int]:
        return [self.mask.out_channels, self.mask.in_channels, 3, 3]


@dataclass
class PatternMetadata:
    """The library, bool (K, 9), and the pruned layers in graph order."""

    library: torch.Tensor
    layers: list[LayerEntry]

    def to_json(self) -> str:
        layers = []
        for entry in self.layers:
            ids = entry.mask.pattern_ids.numpy().astype(np.int8)
            layers.append({
                "initializer": entry.initializer, "module": entry.module, "shape": entry.shape,
                "block_size": entry.mask.block_size,
                "pattern_ids": base64.b64encode(zlib.compress(ids.tobytes(), 9)).decode(),
            })
        return json.dumps({"schema": SCHEMA, "version": VERSION,
                           "library": [format_pattern(p) for p in self.library],
                           "layers": layers}, separators=(",", ":"))


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise MetadataError(message)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_layer(raw: object, index: int, library_size: int) -> LayerEntry:
    where = f"{METADATA_KEY}: layers[{index}]"
    _require(isinstance(raw, dict), f"{where}: must be an object")
    for field, kind in (("initializer", str), ("module", str), ("shape", list),
                        ("block_size", int), ("pattern_ids", str)):
        _require(field in raw, f"{where}: missing field {field!r}")
        _require(isinstance(raw[field], kind) and not isinstance(raw[field], bool),
                 f"{where}.{field}: must be a {kind.__name__}")
    name = raw["initializer"]
    shape = raw["shape"]
    _require(len(shape) == 4 and all(_is_int(d) and d > 0 for d in shape),
             f"{where} ({name}).shape: must be 4 positive integers, got {shape}")
    _require(shape[2:] == [3, 3], f"{where} ({name}): conv kernel is {shape[2]}x{shape[3]}; "
             "pattern metadata applies to 3x3 convs only")
    block = raw["block_size"]
    _require(1 <= block <= shape[0], f"{where} ({name}).block_size: must be 1..{shape[0]}, got {block}")
    try:
        data = zlib.decompress(base64.b64decode(raw["pattern_ids"], validate=True))
    except (binascii.Error, zlib.error, ValueError) as exc:
        raise MetadataError(f"{where} ({name}).pattern_ids: not base64 zlib data ({exc})") from None
    blocks = math.ceil(shape[0] / block)
    _require(len(data) == blocks * shape[1], f"{where} ({name}).pattern_ids: {len(data)} entries, "
             f"expected {blocks} blocks x {shape[1]} input channels = {blocks * shape[1]}")
    ids = torch.from_numpy(np.frombuffer(data, np.int8).astype(np.int64).reshape(blocks, shape[1]))
    bad = (ids < REMOVED) | (ids >= library_size)
    _require(not bad.any(), f"{where} ({name}).pattern_ids: value "
             f"{int(ids[bad][0]) if bad.any() else 0} is neither -1 nor a library index 0..{library_size - 1}")
    return LayerEntry(name, raw["module"], LayerMask(shape[0], block, ids))


def parse_metadata(text: str) -> PatternMetadata:
    """Decode and check the metadata document; any defect raises ``MetadataError``."""
    try:
        raw = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise MetadataError(f"{METADATA_KEY}: not JSON ({exc})") from None
    _require(isinstance(raw, dict), f"{METADATA_KEY}: must be a JSON object")
    _require(raw.get("schema") == SCHEMA, f"{METADATA_KEY}: schema is {raw.get('schema')!r}, "
             f"expected {SCHEMA!r}")
    _require(raw.get("version") == VERSION, f"{METADATA_KEY}: schema version "
             f"{raw.get('version')!r} is not supported (this build reads version {VERSION})")
    library_raw = raw.get("library")
    _require(isinstance(library_raw, list) and library_raw and all(isinstance(p, str) for p in library_raw),
             f"{METADATA_KEY}.library: must be a non-empty list of pattern strings")
    try:
        library = validate_library(torch.stack([parse_pattern(p) for p in library_raw]))
    except ValueError as exc:
        raise MetadataError(f"{METADATA_KEY}.library: {exc}") from None
    layers_raw = raw.get("layers")
    _require(isinstance(layers_raw, list), f"{METADATA_KEY}.layers: must be a list")
    layers = [_parse_layer(layer, i, len(library)) for i, layer in enumerate(layers_raw)]
    names = [entry.initializer for entry in layers]
    _require(len(set(names)) == len(names), f"{METADATA_KEY}.layers: an initializer is listed twice")
    return PatternMetadata(library, layers)

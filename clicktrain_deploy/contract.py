"""What export writes and compile reads: the pattern metadata schema and masks as numpy arrays.

numpy, onnx and the standard library only (no torch, no training code), so the compiler and the
tools that read a model import it without pulling in PyTorch. Training keeps torch-typed copies
(``pruning.masks.LayerMask``, ``pruning.patterns``) that delegate to this module.

Patterns. A pattern is a 3x3 mask with 4 kept taps, bool (9,), taps numbered row-major (tap 4 is
the centre); written '...|.XX|.XX' (rows top to bottom, X = kept). A library is bool (K, 9) of
unique patterns.

Masks. A pruned 3x3 conv with weight (C_out, C_in, 3, 3) and block size B is described by
``pattern_ids`` int64 (ceil(C_out / B), C_in): entry (b, c) is the library index of the pattern
that the B kernels of output block b (channels b*B .. b*B+B-1) use on input channel c, or
``REMOVED`` (-1) when all B kernels are gone. B = 1 is the original per-kernel method. The last
block may be shorter when B does not divide C_out.

Metadata. A versioned JSON document in the ONNX model's ``metadata_props``, key
``clicktrain.sparsity``; schema ``clicktrain-deploy/pattern-sparsity`` version 1::

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

``pattern_ids[b, c]`` is as above. Layers not listed are dense. About 1 byte per kernel group
before compression, so even 20M-weight models carry a few hundred KB at most. Beside it, key
``clicktrain.model_info`` holds the classes, input shape and normalisation stored at export.
"""
from __future__ import annotations

import base64
import binascii
import json
import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from .errors import ClickTrainError, ExportError

METADATA_KEY = "clicktrain.sparsity"
MODEL_INFO_KEY = "clicktrain.model_info"
SCHEMA = "clicktrain-deploy/pattern-sparsity"
VERSION = 1

TAPS = 9
PATTERN_NONZEROS = 4
CENTRE_TAP = 4
REMOVED = -1

__all__ = [
    "CENTRE_TAP", "METADATA_KEY", "MODEL_INFO_KEY", "PATTERN_NONZEROS", "REMOVED", "SCHEMA", "TAPS",
    "VERSION", "ExportError", "LayerEntry", "LayerMask", "MetadataError", "PatternMetadata",
    "check_weight", "format_pattern", "load_onnx", "model_info", "parse_library", "parse_metadata",
    "parse_pattern", "read_metadata", "validate_library",
]


class MetadataError(ClickTrainError):
    """Pattern metadata is malformed, of an unknown version, or contradicts the weights."""


# --- patterns ----------------------------------------------------------------------------------

def parse_pattern(text: str) -> np.ndarray:
    """'...|.XX|.XX' (rows top to bottom, X = kept) -> bool (9,)."""
    rows = text.split("|")
    if len(rows) != 3 or any(len(r) != 3 or set(r) - {".", "X"} for r in rows):
        raise ValueError(f"pattern {text!r} is not three rows of three '.' or 'X'")
    return np.array([c == "X" for c in "".join(rows)], dtype=bool)


def format_pattern(pattern) -> str:
    """bool (9,) (or (3, 3); any array-like) -> '...|.XX|.XX'."""
    cells = "".join("X" if bool(v) else "." for v in np.asarray(pattern).reshape(-1))
    return "|".join(cells[i:i + 3] for i in (0, 3, 6))


def validate_library(library) -> np.ndarray:
    """Check a library is bool (K, 9), unique rows, each with exactly 4 taps; return it as numpy.

    Raises ``ValueError`` naming the first bad pattern.
    """
    array = np.asarray(library)
    if array.dtype != np.bool_ or array.ndim != 2 or array.shape[1] != TAPS:
        raise ValueError(f"a pattern library must be bool (K, 9), got {tuple(array.shape)} "
                         f"{getattr(library, 'dtype', array.dtype)}")
    counts = array.sum(1)
    if (counts != PATTERN_NONZEROS).any():
        bad = int(np.flatnonzero(counts != PATTERN_NONZEROS)[0])
        raise ValueError(f"pattern {bad} ({format_pattern(array[bad])}) keeps "
                         f"{int(counts[bad])} taps, not {PATTERN_NONZEROS}")
    if len(np.unique(array, axis=0)) != len(array):
        raise ValueError("a pattern library has a repeated pattern")
    return array


def parse_library(patterns: list[str]) -> np.ndarray:
    """Pattern strings -> a validated library, bool (K, 9); ``ValueError`` on any defect."""
    if not patterns:
        raise ValueError("a pattern library needs at least one pattern")
    return validate_library(np.stack([parse_pattern(p) for p in patterns]))


# --- masks -------------------------------------------------------------------------------------

@dataclass
class LayerMask:
    """Pattern and connectivity of one pruned conv; see the module docstring for the layout.

    ``pattern_ids`` is stored as int64 numpy (any array-like is converted).
    """

    out_channels: int
    block_size: int
    pattern_ids: np.ndarray

    def __post_init__(self) -> None:
        self.pattern_ids = np.asarray(self.pattern_ids, dtype=np.int64)

    @property
    def in_channels(self) -> int:
        return self.pattern_ids.shape[1]

    def kernel_pattern_ids(self) -> np.ndarray:
        """Pattern id of every kernel: int64 (C_out, C_in), ``REMOVED`` for removed kernels."""
        return np.repeat(self.pattern_ids, self.block_size, axis=0)[: self.out_channels]

    def dense(self, library) -> np.ndarray:
        """The 0/1 weight mask, float32 (C_out, C_in, 3, 3); ``library`` bool (K, 9)."""
        ids = self.kernel_pattern_ids()
        taps = np.asarray(library, dtype=bool)[np.maximum(ids, 0)] & (ids != REMOVED)[..., None]
        return taps.reshape(self.out_channels, self.in_channels, 3, 3).astype(np.float32)

    def block_sizes(self) -> np.ndarray:
        """Number of output channels in each block: int64 (ceil(C_out / B),)."""
        sizes = np.full(self.pattern_ids.shape[0], self.block_size, dtype=np.int64)
        sizes[-1] = self.out_channels - self.block_size * (len(sizes) - 1)
        return sizes

    def kept_fraction(self) -> float:
        """Share of kernels kept (not removed)."""
        kept = ((self.pattern_ids != REMOVED) * self.block_sizes()[:, None]).sum()
        return float(kept) / (self.out_channels * self.in_channels)


# --- metadata ----------------------------------------------------------------------------------

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
    """The library, bool (K, 9) numpy (any array-like is converted), and the pruned layers in
    graph order."""

    library: np.ndarray
    layers: list[LayerEntry]

    def __post_init__(self) -> None:
        self.library = np.asarray(self.library)

    def to_json(self) -> str:
        layers = []
        for entry in self.layers:
            ids = np.asarray(entry.mask.pattern_ids).astype(np.int8)
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
    ids = np.frombuffer(data, np.int8).astype(np.int64).reshape(blocks, shape[1])
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
        library = parse_library(library_raw)
    except ValueError as exc:
        raise MetadataError(f"{METADATA_KEY}.library: {exc}") from None
    layers_raw = raw.get("layers")
    _require(isinstance(layers_raw, list), f"{METADATA_KEY}.layers: must be a list")
    layers = [_parse_layer(layer, i, len(library)) for i, layer in enumerate(layers_raw)]
    names = [entry.initializer for entry in layers]
    _require(len(set(names)) == len(names), f"{METADATA_KEY}.layers: an initializer is listed twice")
    return PatternMetadata(library, layers)


def check_weight(entry: LayerEntry, weight: np.ndarray, library: np.ndarray, where: str) -> None:
    """Raise ``MetadataError`` (prefixed by ``where``) at the first kernel of ``weight``
    (C_out, C_in, 3, 3) with a non-zero weight in a removed kernel or outside its pattern.

    The message names the kernel (out, in), its state (removed, or the pattern it uses) and the tap.
    """
    ids = np.asarray(entry.mask.kernel_pattern_ids())
    library = np.asarray(library)
    weight = np.asarray(weight)
    allowed = library[np.maximum(ids, 0)] & (ids != REMOVED)[..., None]  # (C_out, C_in, 9)
    outside = (weight.reshape(allowed.shape) != 0) & ~allowed
    if outside.any():
        o, i, tap = (int(v) for v in np.argwhere(outside)[0])
        state = ("is removed" if ids[o, i] == REMOVED
                 else f"uses pattern {ids[o, i]} ({format_pattern(library[ids[o, i]])})")
        raise MetadataError(f"{where}: kernel (out {o}, in {i}) {state} but has non-zero "
                            f"weight {weight[o, i].flat[tap]:.6g} at tap (row {tap // 3}, col {tap % 3})")


# --- the ONNX model ----------------------------------------------------------------------------

def read_metadata(model: onnx.ModelProto) -> PatternMetadata | None:
    """The model's pattern metadata, or None when it has none (a dense model).

    Parsed and checked as a document (``MetadataError`` on any defect); whether the weights
    conform is ``passes.onnx_passes.verify``'s job.
    """
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            return parse_metadata(prop.value)
    return None


def model_info(model: onnx.ModelProto) -> dict | None:
    """Classes, input shape and normalisation stored at export, or None."""
    for prop in model.metadata_props:
        if prop.key == MODEL_INFO_KEY:
            return json.loads(prop.value)
    return None


def load_onnx(path: str | Path) -> onnx.ModelProto:
    """Read and check an ONNX file; a missing, truncated or non-ONNX file raises ``ExportError``."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: file not found")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except (DecodeError, onnx.checker.ValidationError, ValueError, RuntimeError) as exc:
        raise ExportError(f"{path}: not a valid ONNX model ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else 'unreadable'})") from None
    if not model.graph.node:
        raise ExportError(f"{path}: not a valid ONNX model (the graph has no nodes)")
    return model

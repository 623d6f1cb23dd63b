"""Compile targets by name: TVM target dicts, activation layouts and tiles, how to link a library."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import partial

from ..registry import Registry

TARGETS: Registry = Registry("target")


Tile = tuple[int, int]
# Register tiles (XW columns, RY rows) of 14-16 output pixels for one-vector blocks.
WIDE_TILES: tuple[Tile, ...] = ((4, 4), (8, 2), (7, 2), (2, 7), (5, 3), (3, 5), (16, 1), (14, 1))


@dataclass(frozen=True)
class Layout:
    """Activation layout NCHW[lanes]c and the register tiles of the kernels that use it.

    lanes: output channels per kernel block, a multiple of the SIMD width (16 on NEON is four
    vectors per tap, so each broadcast input feeds four FMAs). pattern_tiles: candidate tiles of the
    4-tap pattern kernels, dense_tiles: of 9-tap and 1x1 kernels; per conv the tile that computes
    the fewest padded pixels wins (the first on a tie), so 14x14 and 7x7 maps get 7-wide tiles.
    The tiles were chosen by measurement (benchmarks/compile_bar.py).
    """

    lanes: int
    pattern_tiles: tuple[Tile, ...]
    dense_tiles: tuple[Tile, ...]
    # convs with every (output block, input channel) entry: tiles over ``full_dense_out_tile``
    # output blocks, so one broadcast input feeds that many FMAs (empty: the dense tiles, 1 block)
    full_dense_tiles: tuple[Tile, ...] = ()
    full_dense_out_tile: int = 1


@dataclass(frozen=True)
class TargetSpec:
    """What the compiler needs to know about a deployment target.

    sparse_layouts: by preference; a build uses the first whose lanes divide every pruned
    layer's block size B (so the lanes of a kernel block share patterns). dense_layout: for builds
    without pattern metadata. cross_compiler: C++ driver that links the ``.so`` (None: the host's).
    device: where the kernels run, "cpu" or "cuda" (GPU kernels, device code built with nvcc).
    """

    name: str
    tvm_target: dict = field(hash=False)
    sparse_layouts: tuple[Layout, ...]
    dense_layout: Layout
    cross_compiler: str | None = None
    device: str = "cpu"

    @property
    def runs_on_host(self) -> bool:
        return self.cross_compiler is None and self.device == "cpu"

    def layout_for(self, block_sizes: list[int]) -> Layout:
        """The layout of a build whose pruned layers have these block sizes (none: dense)."""
        if not block_sizes:
            return self.dense_layout
        return next((layout for layout in self.sparse_layouts
                     if all(b % layout.lanes == 0 for b in block_sizes)), self.sparse_layouts[-1])


def _host_cpu() -> tuple[str, int]:
    from tvm.target import codegen

    cpu = codegen.llvm_get_system_cpu()
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    return cpu, 16 if " avx512f" in flags else 8 if " avx2" in flags else 4


# Full-dense convs on x86, measured against onnxruntime at 1 thread on ImageNet-size layers
# (Intel Xeon, AVX-512): 8x1 / 7x1 pixels x 2 output blocks = 16 zmm accumulators + 2 weight
# vectors; with 8 lanes (AVX2, 16 ymm registers) 4x1 x 2 blocks (the 14-16-pixel tiles spill).
FULL_DENSE_X86 = {16: (((8, 1), (7, 1)), 2), 8: (((4, 1),), 2)}


def _x86_layout(lanes: int) -> Layout:
    tiles, out_tile = FULL_DENSE_X86.get(lanes, ((), 1))
    return Layout(lanes, WIDE_TILES, WIDE_TILES, tiles, out_tile)


@TARGETS.register("x86")
def x86() -> TargetSpec:
    """The host's x86-64 CPU (detected): one vector per block, 16 lanes AVX-512, 8 AVX2."""
    cpu, lanes = _host_cpu()
    layouts = tuple(_x86_layout(l) for l in (lanes, 8, 4) if l <= lanes)
    layout = layouts[0]
    return TargetSpec("x86", {"kind": "llvm", "mcpu": cpu, "num-cores": os.cpu_count() or 1},
                      tuple(dict.fromkeys(layouts)), layout)


# NEON has 32 128-bit registers: 16-channel blocks (4 vectors) with 2x2 tiles keep 16 accumulators,
# leaving room for the 4 weight vectors and the broadcast inputs (2x3 tiles spill).
NEON_TILES = ((2, 4), (4, 2), (2, 3), (3, 2))
NEON_DENSE = Layout(8, NEON_TILES, NEON_TILES)
NEON_SPARSE = (Layout(16, ((2, 2), (4, 1), (1, 4)), ((2, 2), (2, 3), (4, 1))), NEON_DENSE,
               Layout(4, WIDE_TILES, WIDE_TILES))


def _arm(name: str, cpu: str | None) -> TargetSpec:
    target = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"], "num-cores": 4}
    if cpu:
        target["mcpu"] = cpu
    return TargetSpec(name, target, NEON_SPARSE, NEON_DENSE, cross_compiler="aarch64-linux-gnu-g++")


@TARGETS.register("arm64")
def arm64() -> TargetSpec:
    """Generic aarch64 with NEON (runs on any ARMv8-A phone or board)."""
    return _arm("arm64", None)


@TARGETS.register("cortex-a72")
def cortex_a72() -> TargetSpec:
    return _arm("cortex-a72", "cortex-a72")


@TARGETS.register("cortex-a76")
def cortex_a76() -> TargetSpec:
    return _arm("cortex-a76", "cortex-a76")


CUDA_ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90")  # A100; RTX 30xx/A10; RTX 40xx/L4; H100/H200
# On a GPU, L is the conv's output-channel block and the tile is each thread's register tile
# (1 column, PY rows): L x PY = 32 accumulators per thread. Activations are NCHW (see compile/cuda).
CUDA_LAYOUTS = tuple(Layout(lanes, ((1, 32 // lanes),), ((1, 32 // lanes),)) for lanes in (16, 8, 4))


def cuda_target(arch: str) -> TargetSpec:
    """NVIDIA GPU of compute capability ``arch`` (one of CUDA_ARCHS); host code for x86-64."""
    if arch not in CUDA_ARCHS:
        raise KeyError(f"unknown CUDA arch {arch!r}; presets: {', '.join(CUDA_ARCHS)}")
    return TargetSpec(f"cuda-{arch.replace('_', '')}", {"kind": "cuda", "arch": arch, "host": {"kind": "llvm"}},
                      CUDA_LAYOUTS, CUDA_LAYOUTS[0], device="cuda")


for _arch in CUDA_ARCHS:
    TARGETS.register(f"cuda-{_arch.replace('_', '')}")(partial(cuda_target, _arch))
TARGETS.register("cuda")(partial(cuda_target, "sm_90"))  # `--target cuda` without --arch: Hopper

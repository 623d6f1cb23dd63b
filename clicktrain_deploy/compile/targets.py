"""Compile targets by name: TVM target dicts, SIMD lanes and how to link a deployable library."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..registry import Registry

TARGETS: Registry = Registry("target")


@dataclass(frozen=True)
class TargetSpec:
    """What the compiler needs to know about a deployment target.

    lanes: fp32 SIMD width, the output-channel block of the generated kernels (16 AVX-512,
    8 AVX2, 4 NEON). cross_compiler: C++ driver that links the ``.so`` (None: the host's).
    """

    name: str
    tvm_target: dict = field(hash=False)
    lanes: int
    cross_compiler: str | None = None

    @property
    def runs_on_host(self) -> bool:
        return self.cross_compiler is None


def _host_cpu() -> tuple[str, int]:
    from tvm.target import codegen

    cpu = codegen.llvm_get_system_cpu()
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    return cpu, 16 if " avx512f" in flags else 8 if " avx2" in flags else 4


@TARGETS.register("x86")
def x86() -> TargetSpec:
    """The host's x86-64 CPU (detected), AVX-512 -> 16 lanes, AVX2 -> 8."""
    cpu, lanes = _host_cpu()
    return TargetSpec("x86", {"kind": "llvm", "mcpu": cpu, "num-cores": os.cpu_count() or 1}, lanes)


def _arm(name: str, cpu: str | None) -> TargetSpec:
    target = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"], "num-cores": 4}
    if cpu:
        target["mcpu"] = cpu
    return TargetSpec(name, target, 4, cross_compiler="aarch64-linux-gnu-g++")


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

"""Build CUDA libraries with the installed nvcc, on machines with or without an NVIDIA GPU.

``build_cuda`` compiles a Relax module of our GPU kernels: TVM emits CUDA C for every kernel, nvcc
turns it into a fatbin (SASS for the target's arch plus its PTX, so newer GPUs can JIT it), and
the fatbin is embedded in the ``.so`` beside the host code. Without an NVIDIA driver, TVM's CUDA
backend does not load by itself; ``load_cuda_backend`` loads it against a stub driver
(``libcuda_stub.c``) so the same build works on CI machines.
"""
from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import tvm
import tvm_ffi
from tvm import relax

from ..errors import CompileError
from ..schedule import finalize_pipeline
from ..targets import TargetSpec

FATBIN_MAGIC = (0xBA55ED50).to_bytes(4, "little")
COMPILE_CALLBACK = "tvm_callback_cuda_compile"


def gpu_present() -> bool:
    """True when an NVIDIA GPU and driver can run CUDA kernels here."""
    load_cuda_backend()
    return bool(tvm.cuda(0).exist)


def load_cuda_backend() -> None:
    """Load TVM's CUDA backend, against a stub driver where no NVIDIA driver is installed."""
    if tvm_ffi.get_global_func("ffi.Module.create.cuda", allow_missing=True) is not None:
        return
    from tvm.base import _LOADED_LIBS
    from tvm_ffi.libinfo import load_lib_ctypes

    try:
        ctypes.CDLL("libcuda.so.1", mode=ctypes.RTLD_GLOBAL)
    except OSError:
        with tempfile.TemporaryDirectory(prefix="clicktrain-cuda-") as tmp:  # loaded, the file can go
            ctypes.CDLL(str(_build_driver_stub(Path(tmp))), mode=ctypes.RTLD_GLOBAL)
    runtime_dir = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent
    try:
        _LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(
            package="tvm", target_name="tvm_runtime_cuda", extra_lib_paths=[runtime_dir], mode="RTLD_LOCAL")
    except (OSError, RuntimeError) as error:
        raise CompileError(f"TVM's CUDA backend (libtvm_runtime_cuda.so) does not load: {error}") from error


def _build_driver_stub(folder: Path) -> Path:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise CompileError("no C compiler (cc) to build the CUDA driver stub: apt-get install gcc")
    out = folder / "libcuda.so.1"
    source = Path(__file__).with_name("libcuda_stub.c")
    subprocess.run([compiler, "-shared", "-fPIC", "-O2", "-Wl,-soname,libcuda.so.1", "-o", str(out), str(source)],
                   check=True, capture_output=True)
    return out


def find_nvcc() -> str:
    """nvcc on PATH, else the one NVIDIA's ``nvidia-cuda-nvcc`` wheel put in this environment."""
    found = shutil.which("nvcc")
    if found:
        return found
    try:
        import nvidia
    except ImportError:
        nvidia = None
    for root in getattr(nvidia, "__path__", []):
        for candidate in sorted(Path(root).glob("cu*/bin/nvcc")):
            return str(candidate)
    raise CompileError("nvcc not found: CUDA targets need the CUDA toolkit's nvcc on PATH (or the "
                       "nvidia-cuda-nvcc wheel that scripts/setup.sh installs)")


def nvcc_version() -> str:
    """``X.Y, VX.Y.Z`` of the nvcc that builds our device code."""
    lines = subprocess.run([find_nvcc(), "--version"], check=True, capture_output=True, text=True).stdout.splitlines()
    return next((line.split("release ", 1)[1] for line in lines if "release " in line), lines[-1])


def nvcc_fatbin(code: str, arch: str) -> tuple[bytes, dict]:
    """CUDA C -> fatbin for ``arch`` (SASS, plus PTX that newer GPUs JIT) with the installed nvcc.

    Returns the fatbin and ptxas' report over its kernels: the most registers per thread, shared
    memory per block, and the bytes spilled to local memory (0 when every accumulator stays in a
    register).
    """
    number = arch.removeprefix("sm_")
    with tempfile.TemporaryDirectory(prefix="clicktrain-nvcc-") as tmp:
        source, fatbin = Path(tmp) / "kernels.cu", Path(tmp) / "kernels.fatbin"
        source.write_text(code)
        command = [find_nvcc(), "--fatbin", "-O3", "-gencode", f"arch=compute_{number},code=[sm_{number},compute_{number}]",
                   "--ptxas-options=-v", "-o", str(fatbin), str(source)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise CompileError(f"nvcc failed for {arch}:\n{(done.stdout + done.stderr)[-3000:]}")
        report = done.stdout + done.stderr
        return fatbin.read_bytes(), {
            "max_registers": max(map(int, re.findall(r"Used (\d+) registers", report)), default=0),
            "max_shared_bytes": max(map(int, re.findall(r"(\d+) bytes smem", report)), default=0),
            "spill_bytes": sum(map(int, re.findall(r"(\d+) bytes spill (?:stores|loads)", report))),
        }


@contextmanager
def nvcc_device_compiler(arch: str) -> Iterator[list[dict]]:
    """While open, TVM hands CUDA device code to ``nvcc_fatbin``; yields one report per build.

    TVM's own callback (NVRTC by default, which needs cuda-bindings) is restored afterwards.
    """
    import tvm.support.nvcc  # noqa: F401  registers TVM's callback first, so ours overrides it

    built: list[dict] = []

    def compile_with_nvcc(code: str) -> bytearray:
        binary, report = nvcc_fatbin(code, arch)
        built.append({"fatbin_bytes": len(binary), **report})
        return bytearray(binary)

    previous = tvm_ffi.get_global_func(COMPILE_CALLBACK, allow_missing=True)
    tvm_ffi.register_global_func(COMPILE_CALLBACK, compile_with_nvcc, override=True)
    try:
        yield built
    finally:
        if previous is not None:
            tvm_ffi.register_global_func(COMPILE_CALLBACK, previous, override=True)
        else:
            tvm_ffi.remove_global_func(COMPILE_CALLBACK)


def _compile_with_nvcc(module: tvm.IRModule, tvm_target: tvm.target.Target, arch: str, name: str, **options):
    """``tvm.compile`` with nvcc building the device code; returns the executable and ptxas'
    report. Fails loudly unless nvcc produced exactly one device module: a library holding only
    CUDA source (what TVM falls back to without its CUDA backend) cannot be loaded by any runtime."""
    load_cuda_backend()
    with nvcc_device_compiler(arch) as built, tvm_target:
        executable = tvm.compile(module, target=tvm_target, **options)
    if len(built) != 1:
        raise CompileError(f"{name}: nvcc built {len(built)} device modules, expected 1")
    return executable, built[0]


def build_cuda(module: tvm.IRModule, target: TargetSpec) -> tuple[relax.Executable, dict]:
    """Compile a lowered, scheduled module for a CUDA target; returns the executable and what
    was built (``_compile_with_nvcc``)."""
    version = nvcc_version()
    arch = target.tvm_target["arch"]
    executable, report = _compile_with_nvcc(module, tvm.target.Target(target.tvm_target), arch, target.name,
                                            relax_pipeline=finalize_pipeline())
    kernels = sum(isinstance(f, tvm.tirx.PrimFunc) for f in module.functions.values())
    return executable, {"arch": arch, "nvcc": version, "kernels": kernels, **report}


def build_cuda_kernels(functions: dict[str, str], arch: str) -> tuple[tvm.runtime.Module, dict]:
    """Compile TVMScript prim_funcs (name -> source) for the GPU ``arch`` with nvcc: the loaded
    module, whose functions take DLPack tensors on that GPU (training's kernels, called from
    torch), and ptxas' report (``nvcc_fatbin``)."""
    module = tvm.IRModule({name: tvm.script.from_source(text) for name, text in functions.items()})
    tvm_target = tvm.target.Target({"kind": "cuda", "arch": arch, "host": {"kind": "llvm"}})
    executable, report = _compile_with_nvcc(module, tvm_target, arch, arch)
    return executable.jit(), report


def embedded_fatbins(library: str | Path) -> int:
    """How many CUDA fatbins a built ``.so`` embeds (0: no device code)."""
    return Path(library).read_bytes().count(FATBIN_MAGIC)


def run_on_cuda(library: str | Path, inputs: np.ndarray) -> np.ndarray:
    """Run a CUDA library on the first GPU; inputs (N, C, H, W) float32 with its compiled N."""
    load_cuda_backend()
    device = tvm.cuda(0)
    if not device.exist:
        raise CompileError("no NVIDIA GPU here to run a CUDA library on")
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(library)), device)
    return vm["main"](tvm.runtime.tensor(np.ascontiguousarray(inputs, np.float32), device)).numpy()


def build_emulated(module: tvm.IRModule) -> relax.Executable:
    """Build a module lowered with ``emulate=True`` for this CPU: the GPU kernels' statements with
    serial thread loops, to check their results here. LLVM does not optimise (it is a check)."""
    return tvm.compile(module, target=tvm.target.Target({"kind": "llvm", "opt-level": 0}),
                       relax_pipeline=finalize_pipeline())

"""Run aarch64 libraries on an x86 host under qemu-user, with retired-instruction counts.

The runner (runner.cc) links the aarch64 ``libtvm_runtime.so``/``libtvm_ffi.so`` taken from the
PyPI wheels; ``setup_arm`` fetches and builds them once (``scripts/setup.sh`` calls it), into
``$CLICKTRAIN_ARM_ROOT`` or ``.arm64/`` at the repository root. Emulated time says nothing
about ARM speed; instruction counts with one thread and a pinned ``-cpu`` are deterministic.
``ort`` (same folder) runs onnxruntime's own aarch64 build the same way, for comparison.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from ...errors import ClickTrainError
from ..targets import TargetSpec

HERE = Path(__file__).resolve().parent
TVM_WHEELS = ["apache-tvm==0.27.0.post1", "apache-tvm-ffi==0.1.14.post1"]
SYSROOT = "/usr/aarch64-linux-gnu"


class ArmRunError(ClickTrainError):
    """The ARM toolchain is missing or a library failed under qemu."""


def arm_root() -> Path:
    return Path(os.environ.get("CLICKTRAIN_ARM_ROOT", HERE.parents[2] / ".arm64"))


def setup_arm(root: Path | None = None) -> Path:
    """Download the aarch64 TVM runtime from PyPI, build the runner and the counting plugin."""
    root = root or arm_root()
    wheels = root / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheels),
                    "--platform", "manylinux_2_28_aarch64", "--python-version", "3.11",
                    "--implementation", "cp", "--abi", "cp311", "--only-binary=:all:", *TVM_WHEELS],
                   check=True)
    for wheel in wheels.glob("*.whl"):
        with zipfile.ZipFile(wheel) as archive:
            for name in archive.namelist():
                if name in ("tvm/lib/libtvm_runtime.so", "tvm_ffi/lib/libtvm_ffi.so") \
                        or name.startswith("tvm_ffi/include/"):
                    archive.extract(name, root)
        wheel.unlink()
    libs = f"{root}/tvm/lib:{root}/tvm_ffi/lib"
    subprocess.run(["aarch64-linux-gnu-g++", "-std=c++17", "-O2", str(HERE / "runner.cc"),
                    f"-I{root}/tvm_ffi/include", f"-L{root}/tvm/lib", f"-L{root}/tvm_ffi/lib",
                    "-Wl,--no-as-needed", "-ltvm_runtime", "-ltvm_ffi", f"-Wl,-rpath,{libs}",
                    "-o", str(root / "runner")], check=True)
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(root / "libicount.so"),
                    str(HERE / "icount.c")], check=True)
    return root


def arm_available() -> bool:
    root = arm_root()
    return (root / "runner").exists() and (root / "libicount.so").exists() and \
        subprocess.run(["which", "qemu-aarch64"], capture_output=True).returncode == 0


def qemu_cpu(spec: TargetSpec) -> str:
    """The ``qemu-aarch64 -cpu`` that emulates an ARM target: its LLVM cpu, cortex-a72 if generic."""
    return spec.tvm_target.get("mcpu", "cortex-a72")


def run_under_qemu(library: str | Path, inputs: np.ndarray, *, cpu: str = "cortex-a72",
                   reps: int = 1, count: bool = False, timeout: float = 600) -> tuple[np.ndarray, int | None]:
    """Run an aarch64 library on ``inputs`` (1, C, H, W) float32; return output and, with
    ``count``, the guest instructions retired by the whole process (TVM_NUM_THREADS=1)."""
    if not arm_available():
        raise ArmRunError(f"{arm_root()}: aarch64 runner missing; run scripts/setup.sh")
    root = arm_root()
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        np.ascontiguousarray(inputs, np.float32).tofile(work / "in.bin")
        command = ["qemu-aarch64", "-L", SYSROOT, "-cpu", cpu]
        if count:
            command += ["-plugin", f"{root / 'libicount.so'},out={work / 'count.txt'}", "-d", "plugin"]
        command += [str(root / "runner"), str(Path(library).resolve()), str(work / "in.bin"),
                    "x".join(map(str, inputs.shape)), str(work / "out.bin")]
        env = {**os.environ, "REPS": str(reps), "TVM_NUM_THREADS": "1"}
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
        if done.returncode:
            raise ArmRunError(f"{library}: failed under qemu ({done.returncode}): {done.stderr[-2000:]}")
        shape = [int(d) for d in done.stdout.split()[-1].split("x")]
        output = np.fromfile(work / "out.bin", np.float32).reshape(shape)
        instructions = int((work / "count.txt").read_text()) if count else None
    return output, instructions


def instructions_per_inference(library: str | Path, inputs: np.ndarray, cpu: str = "cortex-a72",
                               runs: tuple[int, int] = (1, 11), timeout: float = 600) -> int:
    """Exact guest instructions of one inference: (count at ``runs[1]`` calls - count at
    ``runs[0]`` calls) / their difference, so start-up cancels (default (11 - 1) / 10; counts are
    deterministic, so fewer runs suffice for large models); ``timeout``: seconds per qemu run."""
    few, many = runs
    if not 0 < few < many:
        raise ValueError(f"runs={runs}: need 0 < fewer < more")
    _, low = run_under_qemu(library, inputs, cpu=cpu, reps=few, count=True, timeout=timeout)
    _, high = run_under_qemu(library, inputs, cpu=cpu, reps=many, count=True, timeout=timeout)
    return (high - low) // (many - few)

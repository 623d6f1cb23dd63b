"""onnxruntime's own aarch64 build, run under the same qemu-user and counting plugin as ours.

This is the runtime an ARM user would pick: the aarch64 CPython 3.11 from Debian's arm64
packages, unpacked with ``dpkg -x`` into a private sysroot (never installed), and the
``onnxruntime``/``numpy`` aarch64 wheels from PyPI, unpacked into a plain folder. Both live in
``<arm_root>/ort/``; ``setup_ort_arm`` builds it once (``python -m clicktrain_deploy.compile.arm``).

What makes the counts repeatable (all set on the qemu command only, never on the host):

* ``/proc/cpuinfo`` and ``/sys/devices/system/cpu/{possible,present,online}`` are faked inside the
  sysroot (``qemu -L`` looks there first): qemu 7.2 passes the host's x86 ``/proc/cpuinfo``
  through, on which onnxruntime's cpuinfo crashes at import; the fake is one Cortex-A72 core,
  so the host's core count does not leak in either.
* ``ORT_DISABLE_TELEMETRY=1`` and a HOME that does not exist: otherwise onnxruntime starts a
  telemetry thread that writes a sqlite database under ``~/.cache`` (timing-dependent work).
* ``PYTHONHASHSEED=0``, ``OPENBLAS_NUM_THREADS=1`` (numpy's OpenBLAS would start idle threads),
  ``python -P -s`` (no cwd/script folder/user site on ``sys.path``), ASLR off (``setarch -R``),
  relative file names inside a fresh working folder, one session thread and no spinning.
* Inputs and outputs as plain ``.npy``: an ``.npz`` is a zip whose headers carry the time of
  day, which moved the count by a few hundred instructions depending on when it ran.

With that, process totals repeated exactly (about 446 M instructions for a tiny CNN and one
run, nearly all of it CPython, numpy and onnxruntime start-up), so the per-inference count
from (11 runs - 1 run) / 10 does too.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from importlib.metadata import version
from pathlib import Path

import numpy as np

from . import HERE, ArmRunError, arm_root

#: Debian arm64 packages unpacked into the sysroot: the interpreter, its stdlib and what they link.
DEBIAN_PACKAGES = ["python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib", "libc6",
                   "libgcc-s1", "libstdc++6", "zlib1g", "libexpat1", "libffi8", "libbz2-1.0",
                   "liblzma5", "libuuid1"]
#: Wheel members never imported by ``import onnxruntime`` / ``import numpy`` (keeps .arm64 small).
#: The Python binding links onnxruntime statically: capi/libonnxruntime.so is for C API users only.
SKIPPED_MEMBERS = ("onnxruntime/transformers/", "onnxruntime/quantization/", "onnxruntime/tools/",
                   "onnxruntime/capi/libonnxruntime.so", "numpy/f2py/", "numpy/distutils/", "/tests/")
#: Sysroot parts nothing here loads: glibc's iconv modules (20 MB), docs, stdlib tests and tools.
PRUNED = ("usr/lib/aarch64-linux-gnu/gconv", "usr/share", "usr/lib/python3.11/test",
          "usr/lib/python3.11/pydoc_data", "usr/lib/python3.11/idlelib", "usr/lib/python3.11/lib2to3",
          "usr/lib/python3.11/tkinter", "usr/lib/python3.11/ensurepip", "usr/lib/python3.11/turtledemo")
DRIVER = HERE / "ort_driver.py"
FAKE_CPUINFO = ("processor\t: 0\nBogoMIPS\t: 100.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n"
                "CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\n"
                "CPU part\t: 0xd08\nCPU revision\t: 3\n\n")


def ort_root(root: Path | None = None) -> Path:
    return (root or arm_root()) / "ort"


def _wanted() -> dict:
    """What a ready install must hold: the host's onnxruntime and numpy versions (the pins)."""
    return {"onnxruntime": version("onnxruntime"), "numpy": version("numpy"),
            "debian": DEBIAN_PACKAGES}


def ort_arm_available(root: Path | None = None) -> bool:
    stamp = ort_root(root) / "READY.json"
    try:
        return json.loads(stamp.read_text())["wanted"] == _wanted() and shutil.which("qemu-aarch64") is not None
    except (OSError, ValueError, KeyError):
        return False


def _apt(state: Path, *args: str, cwd: Path | None = None) -> None:
    """apt-get on the system's sources, for arm64 only, with private lists and cache: the
    machine's dpkg architectures and apt state are left as they were."""
    options = [f"Dir::State::Lists={state / 'lists'}", f"Dir::Cache={state / 'cache'}",
               f"Dir::State::status={state / 'status'}", "APT::Architecture=arm64",
               "APT::Architectures::=arm64", "APT::Sandbox::User=root", "Debug::NoLocking=1"]
    command = ["apt-get", "-qq"] + [a for o in options for a in ("-o", o)] + list(args)
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if done.returncode:
        raise ArmRunError(f"{' '.join(args)}: apt-get failed: {done.stderr[-2000:]}")


def setup_ort_arm(root: Path | None = None, *, force: bool = False) -> dict:
    """Build ``<arm_root>/ort`` (sysroot + site); a no-op when it is ready for these pins.
    Returns what it did: downloaded bytes, seconds, size on disk."""
    base = ort_root(root)
    if not force and ort_arm_available(root):
        return json.loads((base / "READY.json").read_text())
    start = time.monotonic()
    if base.exists():
        shutil.rmtree(base)
    state, debs, sysroot, site, wheels = (base / n for n in ("apt", "debs", "sysroot", "site", "wheels"))
    for folder in (state / "lists" / "partial", state / "cache" / "archives" / "partial", debs, wheels):
        folder.mkdir(parents=True, exist_ok=True)
    (state / "status").touch()
    _apt(state, "update")
    _apt(state, "download", *DEBIAN_PACKAGES, cwd=debs)
    downloaded = sum(p.stat().st_size for p in debs.glob("*.deb"))
    for deb in sorted(debs.glob("*.deb")):
        subprocess.run(["dpkg", "-x", str(deb), str(sysroot)], check=True)
    for part in PRUNED:
        shutil.rmtree(sysroot / part, ignore_errors=True)
    (sysroot / "proc").mkdir(exist_ok=True)
    (sysroot / "proc" / "cpuinfo").write_text(FAKE_CPUINFO)
    cpus = sysroot / "sys" / "devices" / "system" / "cpu"
    cpus.mkdir(parents=True, exist_ok=True)
    for name in ("possible", "present", "online"):
        (cpus / name).write_text("0\n")
    wanted = _wanted()
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
                    "--no-deps", "-d", str(wheels), "--platform", "manylinux_2_28_aarch64",
                    "--platform", "manylinux2014_aarch64", "--python-version", "3.11",
                    "--implementation", "cp", "--abi", "cp311", "--only-binary=:all:",
                    f"onnxruntime=={wanted['onnxruntime']}", f"numpy=={wanted['numpy']}"], check=True)
    for wheel in sorted(wheels.glob("*.whl")):
        downloaded += wheel.stat().st_size
        with zipfile.ZipFile(wheel) as archive:
            for member in archive.infolist():
                if not any(s in member.filename for s in SKIPPED_MEMBERS):
                    archive.extract(member, site)
                    if member.external_attr >> 16 & 0o111:
                        os.chmod(site / member.filename, 0o755)
    # dpkg -x runs no postinst, so nothing is byte-compiled: without .pyc every process re-parses
    # the stdlib under emulation (about 2x the start-up). The host's 3.11 writes the same format.
    if sys.version_info[:2] == (3, 11):
        subprocess.run([sys.executable, "-m", "compileall", "-q", "-j0", str(sysroot / "usr/lib/python3.11"),
                        str(site)], capture_output=True)
    shutil.rmtree(state)
    shutil.rmtree(debs)
    shutil.rmtree(wheels)
    size = sum(p.stat().st_size for p in base.rglob("*") if p.is_file() and not p.is_symlink())
    stamp = {"wanted": wanted, "downloaded_bytes": downloaded, "disk_bytes": size,
             "setup_s": round(time.monotonic() - start, 1)}
    (base / "READY.json").write_text(json.dumps(stamp, indent=1) + "\n")
    return stamp


def run_onnxruntime_arm(onnx_path: str | Path, inputs: list[np.ndarray], *, runs: int = 1,
                        cpu: str = "cortex-a72", count: bool = False, timeout: float = 600,
                        root: Path | None = None) -> tuple[list[np.ndarray], int | None]:
    """Run ``onnx_path`` ``runs`` times in one process with onnxruntime's aarch64 build under
    ``qemu-aarch64 -cpu cpu`` (one thread); return the outputs (model order) and, with
    ``count``, the guest instructions retired by the whole process. ``onnx_path`` must be a
    single-file model (no external data): it is copied into the run's working folder."""
    if not ort_arm_available(root):
        raise ArmRunError(f"{ort_root(root)}: aarch64 onnxruntime missing; run scripts/setup.sh")
    base, plugin = ort_root(root), (root or arm_root()) / "libicount.so"
    if count and not plugin.exists():
        raise ArmRunError(f"{plugin}: counting plugin missing; run scripts/setup.sh")
    sysroot = base / "sysroot"
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        shutil.copyfile(onnx_path, work / "model.onnx")
        for i, array in enumerate(inputs):
            np.save(work / f"in{i}.npy", np.ascontiguousarray(array))
        command = ["qemu-aarch64", "-L", str(sysroot), "-cpu", cpu]
        if count:
            command += ["-plugin", f"{plugin},out={work / 'count.txt'}", "-d", "plugin"]
        command += [str(sysroot / "usr/bin/python3.11"), "-P", "-s", str(DRIVER),
                    "model.onnx", str(len(inputs)), str(runs)]
        if shutil.which("setarch"):
            command = ["setarch", "-R"] + command
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/nonexistent",
               "PYTHONPATH": str(base / "site"), "PYTHONHASHSEED": "0", "ORT_DISABLE_TELEMETRY": "1",
               "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "LC_ALL": "C"}
        done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
        if done.returncode:
            raise ArmRunError(f"{onnx_path}: onnxruntime-aarch64 failed under qemu ({done.returncode}): "
                              f"{done.stderr[-2000:]}")
        outputs = [np.load(p) for p in sorted(work.glob("out*.npy"), key=lambda p: int(p.stem[3:]))]
        instructions = int((work / "count.txt").read_text()) if count else None
    return outputs, instructions

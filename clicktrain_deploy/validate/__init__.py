"""Numerical agreement of every runtime with its reference, on real test images.

onnxruntime is checked against PyTorch; each compiled library against onnxruntime. How a
library runs follows its ``TargetSpec``: on this host, under qemu-user (aarch64), or on a device
(a GPU), which may be absent, in which case the check's status is "skipped": neither failed nor
passed (``clicktrain-deploy run`` exits 3 unless ``--allow-skipped``).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from torch import Tensor, nn

from ..compile.targets import TargetSpec
from ..errors import ClickTrainError
from ..export.check import compare_with_torch, onnxruntime_session
from ..registry import Registry

Batches = Iterable[tuple[Tensor, Tensor]]  # inputs (N, C, H, W) float32, labels (N,)
Runner = Callable[[np.ndarray], np.ndarray]  # images (N, C, H, W) -> logits (N, classes)

RUNNERS: Registry = Registry("runner")
GPU_KINDS = {"cuda", "rocm", "vulkan", "metal", "opencl"}


class AgreementError(ClickTrainError):
    """A runtime disagrees with its reference beyond tolerance; names the runtime and max |diff|."""


@dataclass
class RuntimeCheck:
    """One runtime against its reference over the same real test images."""

    runtime: str          # "onnxruntime" or a target name
    reference: str        # "torch" or "onnxruntime"
    runner: str           # how it ran: "onnxruntime", "host", "qemu-aarch64 -cpu cortex-a72", ...
    images: int
    max_abs_diff: float
    max_abs_logit: float  # largest |logit| of the reference
    top1_agreement: float
    accuracy: float       # top-1 of the runtime on these images, %
    atol: float
    rtol: float
    skipped: str | None = None

    @property
    def status(self) -> str:
        """"skipped" (it could not run here: ``skipped`` says why), "passed" or "failed"."""
        if self.skipped is not None:
            return "skipped"
        return "passed" if self.max_abs_diff <= self.atol + self.rtol * self.max_abs_logit else "failed"

    @property
    def passed(self) -> bool:
        """Ran, and max |diff| <= atol + rtol * max |reference logit|. A skipped check has not
        passed: it validated nothing."""
        return self.status == "passed"

    def to_dict(self) -> dict:
        return {**asdict(self), "status": self.status, "passed": self.passed}

    def describe(self) -> str:
        if self.skipped:
            return f"skipped: {self.skipped}"
        return (f"{self.runtime} vs {self.reference} ({self.runner}) on {self.images} real test images: "
                f"max |diff| {self.max_abs_diff:.2e}, top-1 agreement {self.top1_agreement:.2f}%, "
                f"accuracy {self.accuracy:.2f}%")

    def require(self) -> None:
        """Raise ``AgreementError`` if it failed (a skipped check is reported by its status)."""
        if self.status == "failed":
            raise AgreementError(
                f"{self.runtime}: disagrees with {self.reference} on {self.images} real test images: "
                f"max |diff| {self.max_abs_diff:.3g} > {self.atol:g} + {self.rtol:g} * "
                f"{self.max_abs_logit:.3g} (top-1 agreement {self.top1_agreement:.2f}%)")


def check_onnxruntime(model_bytes: bytes, model: nn.Module, batches: Batches, atol: float,
                      rtol: float) -> RuntimeCheck:
    """onnxruntime against the PyTorch model it was exported from."""
    a = compare_with_torch(model_bytes, model, batches)
    return RuntimeCheck("onnxruntime", "torch", "onnxruntime", a.images, a.max_abs_diff, a.max_abs_logit,
                        a.top1_agreement, a.onnxruntime_accuracy, atol, rtol)


def runner_kind(spec: TargetSpec) -> str:
    """Name in ``RUNNERS`` of how ``spec``'s libraries run here: "host", "qemu" or "device"."""
    if spec.tvm_target.get("kind", "llvm") != "llvm":
        return "device"
    if spec.runs_on_host:
        return "host"
    if "aarch64" in spec.tvm_target.get("mtriple", ""):
        return "qemu"
    raise AgreementError(f"target {spec.name}: no way to run its libraries on this machine")


@RUNNERS.register("host")
def _host(spec: TargetSpec, library: Path) -> tuple[str, Runner]:
    from ..compile.build import run_images

    return "host", lambda images: run_images(library, images)


@RUNNERS.register("qemu")
def _qemu(spec: TargetSpec, library: Path) -> tuple[str, Runner]:
    from ..compile.arm import qemu_cpu, run_under_qemu

    cpu = qemu_cpu(spec)
    return (f"qemu-aarch64 -cpu {cpu}",
            lambda images: np.concatenate([run_under_qemu(library, image[None], cpu=cpu)[0]
                                           for image in images]))


@RUNNERS.register("device")
def _device(spec: TargetSpec, library: Path) -> tuple[str, Runner]:
    import tvm
    from tvm import relax

    kind = spec.tvm_target["kind"]
    device = tvm.device(kind, 0)
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(library)), device)
    return f"{kind}:0", lambda images: np.concatenate(
        [vm["main"](tvm.runtime.tensor(image[None], device)).numpy() for image in images])


def missing_device(spec: TargetSpec) -> str | None:
    """Why ``spec``'s libraries cannot run on this machine ("no GPU"), or None when they can."""
    if runner_kind(spec) != "device":
        return None
    import tvm

    kind = spec.tvm_target["kind"]
    try:
        present = bool(tvm.device(kind, 0).exist)
    except Exception:  # a TVM build without that runtime cannot even name the device
        present = False
    return None if present else "no GPU" if kind in GPU_KINDS else f"no {kind} device"


def check_library(spec: TargetSpec, library: str | Path, model_bytes: bytes, batches: Batches,
                  atol: float, rtol: float,
                  progress: Callable[[int], None] = lambda images: None) -> RuntimeCheck:
    """A compiled library against onnxruntime, image by image at batch 1; ``progress`` is called
    with the number of images done after each batch."""
    missing = missing_device(spec)
    if missing:
        return RuntimeCheck(spec.name, "onnxruntime", "-", 0, 0.0, 0.0, 0.0, 0.0, atol, rtol, missing)
    runner, run = RUNNERS.get(runner_kind(spec))(spec, Path(library))
    session = onnxruntime_session(model_bytes)
    input_name = session.get_inputs()[0].name
    images, max_diff, max_logit, agree, correct = 0, 0.0, 0.0, 0, 0
    for inputs, labels in batches:
        x = inputs.numpy().astype(np.float32)
        expected = session.run(None, {input_name: x})[0]
        got = run(x)
        max_diff = max(max_diff, float(np.abs(got - expected).max()))
        max_logit = max(max_logit, float(np.abs(expected).max()))
        agree += int((got.argmax(1) == expected.argmax(1)).sum())
        correct += int((got.argmax(1) == labels.numpy()).sum())
        images += len(labels)
        progress(images)
    return RuntimeCheck(spec.name, "onnxruntime", runner, images, max_diff, max_logit,
                        100.0 * agree / images, 100.0 * correct / images, atol, rtol)

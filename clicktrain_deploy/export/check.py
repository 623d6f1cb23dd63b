"""Numerical agreement of an ONNX model in onnxruntime with the PyTorch model it came from."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np
import onnxruntime as ort
import torch
from torch import Tensor, nn


@dataclass
class Agreement:
    """onnxruntime against PyTorch over the same real images."""

    images: int
    max_abs_diff: float
    max_abs_logit: float
    top1_agreement: float
    torch_accuracy: float
    onnxruntime_accuracy: float

    def within(self, atol: float, rtol: float) -> bool:
        """max |ort - torch| <= atol + rtol * max |torch logit|."""
        return self.max_abs_diff <= atol + rtol * self.max_abs_logit

    def to_dict(self) -> dict:
        return asdict(self)


def onnxruntime_session(model_bytes: bytes, threads: int | None = None) -> ort.InferenceSession:
    """A CPU session; ``threads`` caps intra-op threads (None: onnxruntime's default)."""
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        # no busy-waiting between calls, so other runtimes timed in the same process get the cores
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def compare_with_torch(model_bytes: bytes, model: nn.Module,
                       batches: Iterable[tuple[Tensor, Tensor]]) -> Agreement:
    """Run every batch (inputs (N, C, H, W) float32, labels (N,)) through both and compare logits."""
    session = onnxruntime_session(model_bytes)
    input_name = session.get_inputs()[0].name
    model.eval()
    images, max_diff, max_logit, agree, torch_correct, ort_correct = 0, 0.0, 0.0, 0, 0, 0
    with torch.no_grad():
        for inputs, labels in batches:
            expected = model(inputs).numpy()
            got = session.run(None, {input_name: inputs.numpy().astype(np.float32)})[0]
            max_diff = max(max_diff, float(np.abs(got - expected).max()))
            max_logit = max(max_logit, float(np.abs(expected).max()))
            agree += int((got.argmax(1) == expected.argmax(1)).sum())
            torch_correct += int((expected.argmax(1) == labels.numpy()).sum())
            ort_correct += int((got.argmax(1) == labels.numpy()).sum())
            images += len(labels)
    return Agreement(images, max_diff, max_logit, 100.0 * agree / images,
                     100.0 * torch_correct / images, 100.0 * ort_correct / images)

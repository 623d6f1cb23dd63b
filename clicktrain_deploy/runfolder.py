"""Where each stage of ``clicktrain-deploy run`` puts its files inside the recipe's output folder.

One place for the layout, so the pipeline that writes the files and the report that reads them
agree::

    <output_dir>/
      checkpoints/epoch-NNNN.pt, metrics.jsonl, sparsity.json   train
      conv_selection.json                                        train (ClickTrain, ADMM): convs taken/left
      model.onnx                                                 export
      validation/<runtime>.json                                  validate (onnxruntime, each target)
      targets/<target>/model.so, model.json                      compile (library, manifest)
      bench/<target>.json, bench/<target>/                       benchmark (results, its own builds)
      report.html                                                report
      pipeline.json                                              per-stage inputs hash and status
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .train.checkpoint import checkpoint_path


@dataclass(frozen=True)
class RunFolder:
    root: Path

    def final_checkpoint(self, epochs: int) -> Path:
        return checkpoint_path(self.root, epochs - 1)

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def sparsity(self) -> Path:
        return self.root / "sparsity.json"

    @property
    def conv_selection(self) -> Path:
        """Every conv of the model, taken by pattern pruning or left, with the reason."""
        return self.root / "conv_selection.json"

    @property
    def onnx(self) -> Path:
        return self.root / "model.onnx"

    def validation(self, runtime: str) -> Path:
        """Agreement of ``runtime`` ("onnxruntime" or a target name) with its reference."""
        return self.root / "validation" / f"{runtime}.json"

    def library(self, target: str) -> Path:
        return self.root / "targets" / target / "model.so"

    def manifest(self, target: str) -> Path:
        return self.library(target).with_suffix(".json")

    def bench(self, target: str) -> Path:
        return self.root / "bench" / f"{target}.json"

    def bench_work(self, target: str) -> Path:
        return self.root / "bench" / target

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    @property
    def state(self) -> Path:
        return self.root / "pipeline.json"

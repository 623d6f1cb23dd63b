"""``pipeline.json``: per stage, the hash of its inputs, its status, outputs and timing.

A stage's inputs hash covers the recipe fields that decide its result, the files of earlier
stages it reads (their bytes, hashed now) and the package version. Written atomically after every
change, so an interrupted run leaves the interrupted stage marked ``running``.
"""
from __future__ import annotations

import datetime
import hashlib
import json
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path

from ..errors import ClickTrainError
from ..fileio import atomic_write_json

FORMAT = "clicktrain-deploy/pipeline"
VERSION = 1


class PipelineStateError(ClickTrainError):
    """``pipeline.json`` is unreadable or from another format."""


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def inputs_digest(settings: dict, reads: dict[str, Path]) -> str:
    """sha256 over the settings, the bytes of every file read (by its name) and the package version."""
    files = {name: file_digest(path) if path.is_file() else None for name, path in reads.items()}
    text = json.dumps({"settings": settings, "files": files, "version": version("clicktrain-deploy")},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class StageRecord:
    inputs: str                      # inputs hash the stage last started with
    status: str                      # "running", "done" or "failed"
    started_at: str
    seconds: float = 0.0
    outputs: dict[str, str] = field(default_factory=dict)  # path relative to the run folder -> sha256
    summary: str = ""
    error: str | None = None


@dataclass
class PipelineState:
    path: Path
    stages: dict[str, StageRecord] = field(default_factory=dict)
    targets: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> "PipelineState":
        if not path.exists():
            return cls(path)
        try:
            raw = json.loads(path.read_text())
            if raw.get("format") != FORMAT or raw.get("version") != VERSION:
                raise ValueError(f"format {raw.get('format')!r} version {raw.get('version')!r}")
            stages = {name: StageRecord(**record) for name, record in raw["stages"].items()}
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise PipelineStateError(f"{path}: not a readable pipeline state ({exc}); delete it to "
                                     "start the pipeline afresh") from None
        return cls(path, stages, raw.get("targets", []))

    def save(self) -> None:
        atomic_write_json(self.path, {"format": FORMAT, "version": VERSION, "targets": self.targets,
                                      "stages": {name: asdict(r) for name, r in self.stages.items()}})

    def start(self, name: str, inputs: str) -> None:
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self.stages[name] = StageRecord(inputs, "running", now)
        self.save()

    def finish(self, name: str, seconds: float, outputs: list[Path], summary: str) -> None:
        record = self.stages[name]
        record.status, record.seconds, record.summary, record.error = "done", round(seconds, 2), summary, None
        record.outputs = {str(p.relative_to(self.path.parent)): file_digest(p) for p in outputs}
        self.save()

    def fail(self, name: str, seconds: float, error: str) -> None:
        record = self.stages[name]
        record.status, record.seconds, record.error = "failed", round(seconds, 2), error
        self.save()

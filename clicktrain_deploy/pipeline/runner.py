"""Run a recipe's stages in order, skipping those whose inputs did not change."""
from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..config import Recipe
from ..errors import ClickTrainError
from ..runfolder import RunFolder
from .stages import STAGES, Stage, StageContext, plan
from .state import PipelineState, inputs_digest


@dataclass
class StageOutcome:
    name: str
    action: str      # "ran", "resumed", "skipped" or "failed"
    seconds: float
    summary: str


@dataclass
class PipelineResult:
    folder: RunFolder
    outcomes: list[StageOutcome]


class PipelineError(ClickTrainError):
    """A stage failed; the run stopped there and earlier stages' outputs are untouched."""

    def __init__(self, stage: str, message: str, result: PipelineResult) -> None:
        super().__init__(f"stage {stage} failed: {message}")
        self.stage, self.result = stage, result


def _select(stages: list[Stage], until: str | None) -> list[Stage]:
    """Stages up to and including the last one named ``until`` or of that kind."""
    if until is None:
        return stages
    matches = [i for i, s in enumerate(stages) if until in (s.name, s.kind)]
    if not matches:
        known = ", ".join(dict.fromkeys([*STAGES.names(), *(s.name for s in stages)]))
        raise ClickTrainError(f"--until {until!r}: no such stage; known: {known}")
    return stages[:matches[-1] + 1]


def run_pipeline(recipe: Recipe, *, until: str | None = None, progress: bool = True,
                 console: Console | None = None) -> PipelineResult:
    """Run ``recipe``'s pipeline (train, export, validate, compile, benchmark, report) into its
    ``output_dir``, or the stages up to ``until`` (a stage or kind name).

    A stage is skipped when it finished before with the same inputs hash and its outputs exist;
    a stage that was interrupted resumes (training continues from its newest checkpoint). The
    first failing stage raises ``PipelineError``; files of earlier stages stay as they are.
    """
    console = console or Console(stderr=True)
    folder = RunFolder(Path(recipe.output_dir))
    stages = _select(plan(recipe), until)
    folder.root.mkdir(parents=True, exist_ok=True)
    state = PipelineState.load(folder.state)
    state.targets = list(recipe.deploy.targets)  # records of other targets stay, for when they return
    result = PipelineResult(folder, [])
    for index, stage in enumerate(stages, 1):
        digest = inputs_digest(stage.settings, {str(p.relative_to(folder.root)): p for p in stage.reads})
        record = state.stages.get(stage.name)
        head = f"[bold][{index}/{len(stages)}] {stage.name}[/]"
        if record and record.status == "done" and record.inputs == digest and all(p.exists() for p in stage.writes):
            console.print(f"{head} [dim]skipped, inputs unchanged: {record.summary}[/]", highlight=False)
            result.outcomes.append(StageOutcome(stage.name, "skipped", 0.0, record.summary))
            continue
        # same inputs as an unfinished attempt (or no record of one): a stage may continue its files
        same_inputs = record is None or record.inputs == digest
        resumed = record is not None and same_inputs and record.status != "done"
        console.print(f"{head} {stage.describe}" + (" [yellow](resuming)[/]" if resumed else ""),
                      highlight=False)
        state.start(stage.name, digest)
        started = time.perf_counter()
        context = StageContext(console, progress, resume=same_inputs)
        spinner = (console.status(f"  {stage.name}: {stage.describe}")
                   if progress and not stage.own_progress else nullcontext())
        try:
            with spinner:
                summary = stage.run(context)
        except Exception as error:  # noqa: BLE001 -- every failure stops the run with its stage named
            message = str(error) if isinstance(error, ClickTrainError) else f"{type(error).__name__}: {error}"
            seconds = time.perf_counter() - started
            state.fail(stage.name, seconds, message)
            console.print(f"  [bold red]failed[/] after {seconds:.1f}s", highlight=False)
            result.outcomes.append(StageOutcome(stage.name, "failed", seconds, message))
            raise PipelineError(stage.name, message, result) from error
        seconds = time.perf_counter() - started
        state.finish(stage.name, seconds, [p for p in stage.writes if p.exists()], summary)
        console.print(f"  [green]done[/] in {seconds:.1f}s: {summary}", highlight=False)
        result.outcomes.append(StageOutcome(stage.name, "resumed" if resumed else "ran", seconds, summary))
    return result


def summary_table(result: PipelineResult) -> Table:
    """One row per stage: what happened, how long, what it found."""
    table = Table(title=f"pipeline summary: {result.folder.root}")
    for column in ("stage", "status", "seconds", "result"):
        table.add_column(column, overflow="fold")
    styles = {"ran": "green", "resumed": "yellow", "skipped": "dim", "failed": "bold red"}
    for o in result.outcomes:
        table.add_row(o.name, f"[{styles[o.action]}]{o.action}[/]", f"{o.seconds:.1f}", o.summary)
    return table

"""Run a recipe's stages in order, keeping (``cached``) those whose inputs did not change."""
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
from .stages import STAGES, Skipped, Stage, StageContext, plan
from .state import FINISHED, PipelineState, code_digest, inputs_digest


@dataclass
class StageOutcome:
    name: str
    action: str      # "ran", "resumed", "cached" (inputs unchanged: not run again) or "failed"
    seconds: float
    summary: str
    status: str = "done"  # as in pipeline.json: "done", "skipped" (did not do its job: no GPU) or "failed"

    @property
    def skipped(self) -> bool:
        return self.status == "skipped"

    @property
    def label(self) -> str:
        """What the summary table shows: the action, or "skipped" (with "cached" when kept)."""
        if self.skipped:
            return "skipped (cached)" if self.action == "cached" else "skipped"
        return self.action


@dataclass
class PipelineResult:
    folder: RunFolder
    outcomes: list[StageOutcome]

    @property
    def unvalidated(self) -> list[StageOutcome]:
        """Validation stages of requested targets that finished without validating (no GPU)."""
        return [o for o in self.outcomes if o.skipped and o.name.startswith("validate:")]

    @property
    def skipped(self) -> list[StageOutcome]:
        return [o for o in self.outcomes if o.skipped]


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


def stage_digest(stage: Stage, folder: RunFolder, codes: dict[tuple, str] | None = None) -> tuple[str, str]:
    """(inputs hash, code digest) of ``stage`` now: what ``pipeline.json`` compares to skip it.
    ``codes`` caches code digests per stage kind and unused code."""
    codes = {} if codes is None else codes
    key = (stage.kind, stage.unused_code)
    if key not in codes:
        codes[key] = code_digest(STAGES.get(stage.kind), exclude=stage.unused_code)
    # files of the run folder by their name in it; others (a user's model file and weights, which
    # need not lie under output_dir) by their absolute path
    reads = {str(p.relative_to(folder.root) if p.is_relative_to(folder.root) else p): p for p in stage.reads}
    return inputs_digest(stage.settings, reads, codes[key]), codes[key]


def run_pipeline(recipe: Recipe, *, until: str | None = None, progress: bool = True,
                 console: Console | None = None) -> PipelineResult:
    """Run ``recipe``'s pipeline (train, export, validate, compile, benchmark, report) into its
    ``output_dir``, or the stages up to ``until`` (a stage or kind name).

    A stage is kept (``cached``) when it finished before with the same inputs hash (settings,
    files read, source of the code it runs, library versions) and its outputs exist; a stage
    that was interrupted resumes (training continues from its newest checkpoint). The first
    failing stage raises ``PipelineError``; files of earlier stages stay as they are. A stage
    that finished without doing its job (a validation with no GPU to run on) is recorded
    ``skipped``: see ``PipelineResult.unvalidated``.
    """
    console = console or Console(stderr=True)
    folder = RunFolder(Path(recipe.output_dir))
    stages = _select(plan(recipe), until)
    folder.root.mkdir(parents=True, exist_ok=True)
    state = PipelineState.load(folder.state)
    state.targets = list(recipe.deploy.targets)  # records of other targets stay, for when they return
    result = PipelineResult(folder, [])
    codes: dict[tuple, str] = {}  # per (stage kind, unused code), computed once per run
    for index, stage in enumerate(stages, 1):
        digest, code = stage_digest(stage, folder, codes)
        record = state.stages.get(stage.name)
        head = f"[bold][{index}/{len(stages)}] {stage.name}[/]"
        if (record and record.status in FINISHED and record.inputs == digest
                and all(p.exists() for p in stage.writes)):
            kept = "[yellow]skipped[/] (cached)" if record.status == "skipped" else "[dim]cached[/]"
            console.print(f"{head} {kept}[dim], inputs unchanged: {record.summary}[/]", highlight=False)
            result.outcomes.append(StageOutcome(stage.name, "cached", 0.0, record.summary, record.status))
            continue
        # same inputs as an unfinished attempt (or no record of one): a stage may continue its files
        same_inputs = record is None or record.inputs == digest
        resumed = record is not None and same_inputs and record.status not in FINISHED
        console.print(f"{head} {stage.describe}" + (" [yellow](resuming)[/]" if resumed else ""),
                      highlight=False)
        state.start(stage.name, digest, code)
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
            result.outcomes.append(StageOutcome(stage.name, "failed", seconds, message, "failed"))
            raise PipelineError(stage.name, message, result) from error
        seconds = time.perf_counter() - started
        status = "skipped" if isinstance(summary, Skipped) else "done"
        summary = str(summary)
        state.finish(stage.name, seconds, [p for p in stage.writes if p.exists()], summary, status)
        if status == "skipped":
            console.print(f"  [bold yellow]skipped[/] after {seconds:.1f}s: {summary}", highlight=False)
        else:
            console.print(f"  [green]done[/] in {seconds:.1f}s: {summary}", highlight=False)
        result.outcomes.append(StageOutcome(stage.name, "resumed" if resumed else "ran", seconds, summary,
                                            status))
    return result


def summary_table(result: PipelineResult) -> Table:
    """One row per stage: what happened, how long, what it found."""
    table = Table(title=f"pipeline summary: {result.folder.root}")
    for column in ("stage", "status", "seconds", "result"):
        table.add_column(column, overflow="fold")
    styles = {"ran": "green", "resumed": "yellow", "cached": "dim", "failed": "bold red"}
    for o in result.outcomes:
        style = "bold yellow" if o.skipped else styles[o.action]
        table.add_row(o.name, f"[{style}]{o.label}[/]", f"{o.seconds:.1f}", o.summary)
    return table

"""``clicktrain-deploy run``: recipe -> trained, exported, compiled, validated, benchmarked, reported.

Stages are registered units (``stages.STAGES``) that state their inputs; ``pipeline.json`` in the
run folder records each one's inputs hash, so a re-run skips what did not change and resumes
what was interrupted.
"""
from .runner import PipelineError, PipelineResult, StageOutcome, run_pipeline, summary_table
from .stages import STAGES, Stage, plan

__all__ = ["PipelineError", "PipelineResult", "STAGES", "Stage", "StageOutcome", "plan", "run_pipeline",
           "summary_table"]

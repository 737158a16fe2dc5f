"""The labelling pipeline: sources -> decode -> SED -> encode -> shard writers, wired on Ray by `run`."""

from .commit import JobConflictError, OutputStore
from .run import JobSummary, run_job

__all__ = ["JobConflictError", "JobSummary", "OutputStore", "run_job"]

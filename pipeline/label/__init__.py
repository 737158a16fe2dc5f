"""The labelling job: plan -> read + decode -> SED -> encode -> shard writers -> commit markers.

Entry point: `run_job(spec)`; a job's output folder is read back through `JobOutput`.
"""

from .commit import JobConflictError, JobOutput
from .run import JobSummary, run_job

__all__ = ["JobConflictError", "JobOutput", "JobSummary", "run_job"]

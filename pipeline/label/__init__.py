"""The labelling job: plan -> read + decode -> SED -> encode -> shard writers -> commit markers.

Entry point: `run_job(spec)`; a job's output folder is read back through `JobOutput`; a job that
stops on failures not about its images raises `ErrorRateExceeded` (`breaker.py`).
"""

from .breaker import ErrorRateExceeded
from .commit import JobConflictError, JobOutput
from .run import JobSummary, run_job

__all__ = ["ErrorRateExceeded", "JobConflictError", "JobOutput", "JobSummary", "run_job"]

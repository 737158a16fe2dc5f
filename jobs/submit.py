"""Cluster submission through Ray's job submission API; the runtime environment carries the spec."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml

import jobs
import pipeline
import schemas
import sed_model
from schemas import JobSpec, TrainSpec

SPEC_NAME = "spec.yaml"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def entrypoint(spec: JobSpec | TrainSpec) -> str:
    """The command the cluster runs: a labelling job, or a training run."""
    return f"python -m jobs.cli {'train' if isinstance(spec, TrainSpec) else 'run'} {SPEC_NAME}"


def submission_runtime_env(spec: JobSpec | TrainSpec, folder: Path) -> dict:
    """A working dir holding the spec (its Ray address set to the cluster), plus this project's code."""
    carried = spec.model_copy(deep=True)
    carried.ray.address = "auto"
    (folder / SPEC_NAME).write_text(yaml.safe_dump(carried.model_dump(mode="json"), sort_keys=False))
    packages = [str(Path(module.__file__).parent) for module in (sed_model, pipeline, schemas, jobs)]
    return {"working_dir": str(folder), "py_modules": packages}


def submit_job(
    spec: JobSpec | TrainSpec,
    address: str,
    wait: bool = False,
    echo: Callable[[str], None] = print,
    poll_seconds: float = 2.0,
    agent_wait_seconds: float = 60.0,
) -> tuple[str, str]:
    """Submit; return (submission id, status). With `wait`, stream the logs until the job ends."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    with tempfile.TemporaryDirectory(prefix="sed-label-submit-") as folder:
        runtime_env = submission_runtime_env(spec, Path(folder))
        deadline = time.monotonic() + agent_wait_seconds
        while True:
            try:
                submission_id = client.submit_job(entrypoint=entrypoint(spec), runtime_env=runtime_env)
                break
            except RuntimeError as exc:
                # A head that has just started answers before its job agent is up; that passes.
                if "No available agent" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(poll_seconds)
    status = str(client.get_job_status(submission_id).value)
    if wait:
        printed = 0
        while status not in TERMINAL:
            time.sleep(poll_seconds)
            status = str(client.get_job_status(submission_id).value)
            logs = client.get_job_logs(submission_id)
            if len(logs) > printed:
                echo(logs[printed:].rstrip("\n"))
                printed = len(logs)
    return submission_id, status

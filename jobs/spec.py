"""Reading a job spec file: YAML -> validated `JobSpec`, local paths made absolute."""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from pydantic import ValidationError

from schemas import JobSpec


class SpecError(ValueError):
    """A job spec that cannot be read or validated; the message names the file and the fields."""


def _absolute(url: str) -> str:
    return url if "://" in url else os.path.abspath(url)


def load_job_spec(path: str | Path) -> JobSpec:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise SpecError(f"cannot read job spec {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise SpecError(f"job spec {path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise SpecError(f"job spec {path} must be a mapping with input, taxonomy, model and output")
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as exc:
        problems = "\n".join(
            f"  {'.'.join(str(p) for p in error['loc']) or '(top level)'}: {error['msg']}" for error in exc.errors()
        )
        raise SpecError(f"job spec {path} is invalid:\n{problems}") from None
    # Ray workers may run in another directory: relative local paths mean "from here".
    spec.input.url = _absolute(spec.input.url)
    spec.output.url = _absolute(spec.output.url)
    if spec.model.weights is not None:
        spec.model.weights = _absolute(spec.model.weights)
    if isinstance(spec.taxonomy.classes, str):
        spec.taxonomy.classes = _absolute(spec.taxonomy.classes)
    return spec

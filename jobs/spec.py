"""Reading spec files: YAML -> validated `JobSpec` or `TrainSpec`, local paths made absolute."""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from schemas import JobSpec, TrainSpec
from sed_model.clip_weights import is_clip_weights_file


class SpecError(ValueError):
    """A job spec that cannot be read or validated; the message names the file and the fields."""


def _absolute(url: str) -> str:
    return url if "://" in url else os.path.abspath(url)


def _read_yaml(path: Path, what: str) -> object:
    try:
        return yaml.safe_load(path.read_text())
    except OSError as exc:
        raise SpecError(f"cannot read {what} {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise SpecError(f"{what} {path} is not valid YAML: {exc}") from exc


def is_train_spec(path: str | Path) -> bool:
    """A training spec has `data:`; a labelling job spec has `input:`."""
    raw = _read_yaml(Path(path), "spec")
    return isinstance(raw, dict) and "data" in raw


def _read_spec(path: Path, model: type[BaseModel], what: str, sections: str) -> BaseModel:
    raw = _read_yaml(path, what)
    if not isinstance(raw, dict):
        raise SpecError(f"{what} {path} must be a mapping with {sections}")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        problems = "\n".join(
            f"  {'.'.join(str(p) for p in error['loc']) or '(top level)'}: {error['msg']}" for error in exc.errors()
        )
        raise SpecError(f"{what} {path} is invalid:\n{problems}") from None


def _absolute_model_and_taxonomy(spec: JobSpec | TrainSpec) -> None:
    """Ray workers may run in another directory: relative local paths mean "from here"."""
    spec.output.url = _absolute(spec.output.url)
    if spec.model.weights is not None:
        spec.model.weights = _absolute(spec.model.weights)
    if spec.model.clip_weights is not None and is_clip_weights_file(spec.model.clip_weights):
        spec.model.clip_weights = _absolute(spec.model.clip_weights)
    if spec.taxonomy is not None and isinstance(spec.taxonomy.classes, str):
        spec.taxonomy.classes = _absolute(spec.taxonomy.classes)


def load_job_spec(path: str | Path) -> JobSpec:
    spec = _read_spec(Path(path), JobSpec, "job spec", "input, taxonomy, model and output")
    spec.input.url = _absolute(spec.input.url)
    _absolute_model_and_taxonomy(spec)
    return spec


def load_train_spec(path: str | Path) -> TrainSpec:
    spec = _read_spec(Path(path), TrainSpec, "training spec", "data, taxonomy, model and output")
    spec.data.url = _absolute(spec.data.url)
    if spec.validation is not None:
        spec.validation.url = _absolute(spec.validation.url)
    _absolute_model_and_taxonomy(spec)
    return spec

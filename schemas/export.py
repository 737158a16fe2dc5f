"""Write the specs' JSON Schemas from the pydantic models: `python -m schemas.export`."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from .job import JobSpec
from .train import TrainSpec

SCHEMA_PATH = Path(__file__).with_name("job.schema.json")
TRAIN_SCHEMA_PATH = Path(__file__).with_name("train.schema.json")


def _schema_json(model: type[BaseModel]) -> str:
    return json.dumps(model.model_json_schema(), indent=2, sort_keys=True) + "\n"


def job_schema_json() -> str:
    return _schema_json(JobSpec)


def train_schema_json() -> str:
    return _schema_json(TrainSpec)


if __name__ == "__main__":
    SCHEMA_PATH.write_text(job_schema_json())
    TRAIN_SCHEMA_PATH.write_text(train_schema_json())
    print(f"wrote {SCHEMA_PATH} and {TRAIN_SCHEMA_PATH}")

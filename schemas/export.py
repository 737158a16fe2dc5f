"""Write `schemas/job.schema.json` from the pydantic model: `python -m schemas.export`."""

from __future__ import annotations

import json
from pathlib import Path

from .job import JobSpec

SCHEMA_PATH = Path(__file__).with_name("job.schema.json")


def job_schema_json() -> str:
    return json.dumps(JobSpec.model_json_schema(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    SCHEMA_PATH.write_text(job_schema_json())
    print(f"wrote {SCHEMA_PATH}")

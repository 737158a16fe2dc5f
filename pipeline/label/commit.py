"""A labelling job's output folder: its layout, its record (job.json, plan), and atomic shard commits.

A shard is the unit of commit. Its files (Parquet, COCO, PNGs) are written first; a marker
`_committed/<shard>.json` is written last, with the shard's statistics. A shard without a marker is
redone from scratch on the next run; readers look only at committed shards. So after any crash every
image has exactly one row among the committed shards, or none yet.
"""

from __future__ import annotations

import hashlib
import json
import urllib.parse
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from schemas import JobSpec, read_labels_parquet

from ..storage import OutputStore

JOB_FILE = "job.json"
PLAN_FILE = "plan.parquet"
LABELS_DIR = "labels"
COCO_DIR = "coco"
PNG_DIR = "png"
CONFIDENCE_DIR = "confidence"
COMMITTED_DIR = "_committed"
MERGED_COCO_FILE = "labels.coco.json"
SUMMARY_FILE = "summary.json"
REDACTED = "***"


class JobConflictError(RuntimeError):
    """The output holds another job's results (different model, taxonomy, input or settings)."""


def redact_url(url: str) -> str:
    """A URL without what may be a secret: its user and password, and its query (signed URLs)."""
    parts = urllib.parse.urlsplit(url)
    if not parts.scheme or (parts.username is None and parts.password is None and not parts.query):
        return url
    netloc = parts.netloc
    if parts.username is not None or parts.password is not None:
        netloc = f"{REDACTED}@{parts.hostname or ''}" + (f":{parts.port}" if parts.port is not None else "")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, REDACTED if parts.query else "", parts.fragment))


def redact(value: Any) -> Any:
    """Storage options may hold credentials: keep their keys, never their values."""
    if isinstance(value, dict):
        return {
            k: ({option: REDACTED for option in v} if k == "storage_options" and isinstance(v, dict) else redact(v))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def job_fingerprint(spec: JobSpec, taxonomy_hash: str, checkpoint_hash: str) -> str:
    """What the labels depend on. Equal fingerprints may share an output folder; others may not."""
    identity = {
        "input": spec.input.model_dump(exclude={"storage_options"}),
        "taxonomy_hash": taxonomy_hash,
        "model": {"clip_model": spec.model.clip_model, "image_size": spec.model.image_size, "checkpoint_hash": checkpoint_hash},
        "inference": spec.inference.model_dump(exclude={"batch_size", "device"}),
    }
    if identity["inference"]["tiling"] is None:  # jobs without tiling keep the fingerprint they had before the option
        del identity["inference"]["tiling"]
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


class JobOutput(OutputStore):
    """The output folder of a labelling job: its record, its plan and its shard commits."""

    def read_plan(self) -> pa.Table | None:
        if not self.exists(PLAN_FILE):
            return None
        return pq.read_table(pa.BufferReader(self.read_bytes(PLAN_FILE)))

    def write_plan(self, plan: pa.Table) -> None:
        sink = pa.BufferOutputStream()
        pq.write_table(plan.drop_columns(["inline"]), sink)
        self.write(PLAN_FILE, sink.getvalue().to_pybytes())

    def clear(self) -> None:
        """Remove a previous job's files (for --overwrite); other files in the folder stay."""
        for name in (JOB_FILE, PLAN_FILE, MERGED_COCO_FILE, SUMMARY_FILE, COMMITTED_DIR, LABELS_DIR, COCO_DIR, PNG_DIR, CONFIDENCE_DIR):
            self.remove(name)

    def committed_shard_ids(self) -> list[str]:
        """The committed shards, from one listing of the markers (paged: 1,000 names a request on S3)."""
        names = (path.rsplit("/", 1)[-1] for path in self.list(COMMITTED_DIR))
        return sorted(name[: -len(".json")] for name in names if name.endswith(".json"))

    def committed_shards(self, shard_ids: list[str] | None = None) -> dict[str, dict[str, Any]]:
        """The markers of the committed shards (or of `shard_ids`), by shard id, read many at a time."""
        ids = self.committed_shard_ids() if shard_ids is None else shard_ids
        contents = self.read_many([f"{COMMITTED_DIR}/{shard}.json" for shard in ids])
        return {shard: json.loads(content) for shard, content in zip(ids, contents)}

    def read_labels(self, marker: dict[str, Any], columns: list[str] | None = None) -> pa.Table:
        """A committed shard's labels table (its marker names the Parquet file first), schema-checked."""
        return read_labels_parquet(self.read_bytes(marker["files"][0]), columns=columns)

    def commit_shard(self, shard_id: str, stats: dict[str, Any]) -> None:
        self.write_json(f"{COMMITTED_DIR}/{shard_id}.json", stats)

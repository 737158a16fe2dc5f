"""The output folder of a job: its layout, its record (job.json, plan), and atomic shard commits.

A shard is the unit of commit. Its files (Parquet, COCO, PNGs) are written first; a marker
`_committed/<shard>.json` is written last, with the shard's statistics. A shard without a marker is
redone from scratch on the next run; readers look only at committed shards. So after any crash every
image has exactly one row among the committed shards, or none yet.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

from schemas import JobSpec

from .retry import with_retries
from .storage import StorageError, filesystem, join, to_url, upload_file, write_bytes

JOB_FILE = "job.json"
PLAN_FILE = "plan.parquet"
LABELS_DIR = "labels"
COCO_DIR = "coco"
PNG_DIR = "png"
COMMITTED_DIR = "_committed"
MERGED_COCO_FILE = "labels.coco.json"
SUMMARY_FILE = "summary.json"
REDACTED = "***"

T = TypeVar("T")


class JobConflictError(RuntimeError):
    """The output holds another job's results (different model, taxonomy, input or settings)."""


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
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


class OutputStore:
    """Reads and writes the files of one job's output folder, through fsspec.

    Every call is retried on transient storage faults (`retry.py`); an error that persists or
    cannot be retried raises `StorageError` naming the file. Nothing committed is touched.
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = url
        self.fs, self.root = filesystem(url, storage_options)
        self.root = self.root.rstrip("/")

    def path(self, *parts: str) -> str:
        return join(self.root, *parts)

    def url_of(self, *parts: str) -> str:
        return to_url(self.fs, self.path(*parts))

    def _io(self, action: str, relative: str, call: Callable[[], T]) -> T:
        url = self.url_of(relative) if relative else self.url
        try:
            return with_retries(call, f"{action} {url}")
        except Exception as exc:
            raise StorageError(f"cannot {action} {url}: {type(exc).__name__}: {exc}") from exc

    def write(self, relative: str, data: bytes) -> None:
        self._io("write", relative, lambda: write_bytes(self.fs, self.path(relative), data))

    def upload(self, relative: str, local_path: str) -> None:
        self._io("write", relative, lambda: upload_file(self.fs, local_path, self.path(relative)))

    def read_bytes(self, relative: str) -> bytes:
        return self._io("read", relative, lambda: self.fs.cat_file(self.path(relative)))

    def exists(self, relative: str) -> bool:
        return self._io("check", relative, lambda: self.fs.exists(self.path(relative)))

    def read_json(self, relative: str) -> dict[str, Any] | None:
        if not self.exists(relative):
            return None
        return json.loads(self.read_bytes(relative))

    def write_json(self, relative: str, record: dict[str, Any]) -> None:
        self.write(relative, json.dumps(record, indent=2, sort_keys=True).encode())

    # The job's record ----------------------------------------------------------------------------
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
        for name in (JOB_FILE, PLAN_FILE, MERGED_COCO_FILE, SUMMARY_FILE, COMMITTED_DIR, LABELS_DIR, COCO_DIR, PNG_DIR):
            if self.exists(name):
                self._io("remove", name, lambda: self.fs.rm(self.path(name), recursive=True))

    # Shard commits --------------------------------------------------------------------------------
    def committed_shards(self) -> dict[str, dict[str, Any]]:
        # Other processes commit too: a listing cached by this filesystem object may be stale.
        self.fs.invalidate_cache(self.path(COMMITTED_DIR))
        if not self.exists(COMMITTED_DIR):
            return {}
        markers = {}
        for path in sorted(self._io("list", COMMITTED_DIR, lambda: self.fs.find(self.path(COMMITTED_DIR)))):
            name = path.rsplit("/", 1)[-1]
            if name.endswith(".json"):
                markers[name[: -len(".json")]] = json.loads(self.read_bytes(f"{COMMITTED_DIR}/{name}"))
        return markers

    def commit_shard(self, shard_id: str, stats: dict[str, Any]) -> None:
        self.write_json(f"{COMMITTED_DIR}/{shard_id}.json", stats)

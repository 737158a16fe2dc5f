"""Shard writers: one shard's rows -> its Parquet and COCO JSON, then the commit marker.

`ShardWriter` collects a shard's rows as they stream in (they may arrive in any order) and, once
the shard is complete, writes its two files and then the marker, which lists them with the PNG
label maps the encode tasks wrote (`encode.py`). Everything per row was done by the encode tasks
(RLE, PNG, the COCO fragments): here Arrow sorts and writes the table and the COCO file is a
string join, so the driver's work per image stays in microseconds; its two files are two
requests whatever the shard's size.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from schemas import LABELS_SCHEMA, STATUS_OK, error_reason

from .coco import shard_document
from .commit import COCO_DIR, LABELS_DIR, JobOutput
from .encode import WORK_COLUMNS


class ShardWriter:
    def __init__(
        self,
        store: JobOutput,
        shard_id: str,
        expected_rows: int,
        formats: Sequence[str],
        classes: Sequence[str],
        file_metadata: dict[str, str],
    ) -> None:
        self.store = store
        self.shard_id = shard_id
        self.expected_rows = expected_rows
        self.formats = tuple(formats)
        self.classes = tuple(classes)
        self.file_metadata = file_metadata
        self.tables: list[pa.Table] = []
        self.rows = 0
        self.started = time.monotonic()

    def add(self, table: pa.Table) -> None:
        self.tables.append(table)
        self.rows += table.num_rows
        if self.rows > self.expected_rows:
            raise RuntimeError(f"shard {self.shard_id} received {self.rows} rows for {self.expected_rows} images")

    @property
    def complete(self) -> bool:
        return self.rows == self.expected_rows

    def errors_by_reason(self) -> dict[str, int]:
        """The shard's error rows counted by reason (`schemas.error_reason`)."""
        reasons: Counter[str] = Counter()
        for table in self.tables:
            failed = table.filter(pc.not_equal(table.column("status"), STATUS_OK))
            reasons.update(error_reason(error) for error in failed.column("error").to_pylist())
        return dict(reasons)

    def commit(self) -> dict[str, Any]:
        """Write the shard's files, then the marker; returns the shard's statistics (the marker's content)."""
        table = pa.concat_tables(self.tables)
        table = table.take(pc.sort_indices(table, [("image_index", "ascending")]))
        files = [self._write_parquet(table.drop_columns(list(WORK_COLUMNS)))]
        if "coco" in self.formats:
            files.append(self._write_coco(table))
        for column in ("png_file", "confidence_file"):
            files.extend(name for name in table.column(column).to_pylist() if name is not None)
        reasons = self.errors_by_reason()
        errors = sum(reasons.values())
        stats = {
            "shard_id": self.shard_id,
            "images": table.num_rows,
            "ok": table.num_rows - errors,
            "errors": errors,
            "errors_by_reason": reasons,
            "duplicates": table.num_rows - table.column("duplicate_of").null_count,
            "files": files,
            "seconds": round(time.monotonic() - self.started, 3),
            "committed_at": time.time(),
        }
        self.store.commit_shard(self.shard_id, stats)
        return stats

    def _write_parquet(self, table: pa.Table) -> str:
        labels = table.cast(LABELS_SCHEMA)
        metadata = dict(LABELS_SCHEMA.metadata)
        metadata.update({k.encode(): v.encode() for k, v in self.file_metadata.items()})
        labels = labels.replace_schema_metadata(metadata)
        sink = pa.BufferOutputStream()
        pq.write_table(labels, sink, compression="zstd")
        relative = f"{LABELS_DIR}/{self.shard_id}.parquet"
        self.store.write(relative, sink.getvalue().to_pybytes())
        return relative

    def _write_coco(self, table: pa.Table) -> str:
        document = shard_document(
            self.shard_id, self.classes, table.column("coco_image").to_pylist(), table.column("coco_annotations").to_pylist()
        )
        relative = f"{COCO_DIR}/{self.shard_id}.json"
        self.store.write(relative, document)
        return relative

"""Shard writers: one shard's rows -> Parquet, COCO JSON and PNG label maps, then the commit marker.

Each format implements only its small part; `ShardWriter` collects a shard's rows as they stream in
(they may arrive in any order) and writes every format once the shard is complete.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from schemas import COCO_CATEGORY_OFFSET, LABELS_SCHEMA, LABELS_SCHEMA_VERSION, STATUS_OK

from .commit import COCO_DIR, LABELS_DIR, PNG_DIR, JobOutput

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(image_index: int, image_id: str, max_length: int = 80) -> str:
    """An object name from an image id: never `..`, `/` or absolute; unique through the index."""
    stem = _UNSAFE.sub("_", image_id.rsplit("/", 1)[-1].rsplit(".", 1)[0]).strip("._")[:max_length]
    return f"{image_index:09d}_{stem}" if stem else f"{image_index:09d}"


def coco_categories(classes: Sequence[str]) -> list[dict[str, Any]]:
    return [{"id": i + COCO_CATEGORY_OFFSET, "name": name, "supercategory": ""} for i, name in enumerate(classes)]


def coco_images_and_annotations(rows: Iterable[dict[str, Any]], num_classes: int) -> tuple[list[dict], list[dict]]:
    """COCO `images` (ok rows) and `annotations` (one per image and class present, RLE masks)."""
    images, annotations = [], []
    for row in rows:
        if row["status"] != STATUS_OK:
            continue
        index = row["image_index"]
        images.append({"id": index, "file_name": row["image_id"], "width": row["width"], "height": row["height"]})
        for label in row["labels"]:
            annotations.append(
                {
                    "id": index * num_classes + label["class_id"] + 1,
                    "image_id": index,
                    "category_id": label["class_id"] + COCO_CATEGORY_OFFSET,
                    "segmentation": {"size": [row["height"], row["width"]], "counts": label["rle_counts"]},
                    "area": label["area"],
                    "bbox": list(label["bbox"]),
                    "score": label["mean_prob"],
                    "iscrowd": 0,
                }
            )
    return images, annotations


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

    def commit(self) -> dict[str, Any]:
        """Write every format, then the marker; returns the shard's statistics."""
        table = pa.concat_tables(self.tables)
        table = table.take(pc.sort_indices(table, [("image_index", "ascending")]))
        files = [self._write_parquet(table)]
        rows = table.drop_columns(["label_png"]).to_pylist()
        if "coco" in self.formats:
            files.append(self._write_coco(rows))
        if "png" in self.formats:
            files.extend(self._write_pngs(table))
        ok = sum(row["status"] == STATUS_OK for row in rows)
        stats = {
            "shard_id": self.shard_id,
            "images": len(rows),
            "ok": ok,
            "errors": len(rows) - ok,
            "files": files,
            "seconds": round(time.monotonic() - self.started, 3),
            "committed_at": time.time(),
        }
        self.store.commit_shard(self.shard_id, stats)
        return stats

    def _write_parquet(self, table: pa.Table) -> str:
        labels = table.drop_columns(["label_png"]).cast(LABELS_SCHEMA)
        metadata = dict(LABELS_SCHEMA.metadata)
        metadata.update({k.encode(): v.encode() for k, v in self.file_metadata.items()})
        labels = labels.replace_schema_metadata(metadata)
        sink = pa.BufferOutputStream()
        pq.write_table(labels, sink, compression="zstd")
        relative = f"{LABELS_DIR}/{self.shard_id}.parquet"
        self.store.write(relative, sink.getvalue().to_pybytes())
        return relative

    def _write_coco(self, rows: list[dict[str, Any]]) -> str:
        images, annotations = coco_images_and_annotations(rows, len(self.classes))
        document = {
            "info": {"description": f"sed-label pseudo-labels, shard {self.shard_id}", "schema_version": LABELS_SCHEMA_VERSION},
            "images": images,
            "annotations": annotations,
            "categories": coco_categories(self.classes),
        }
        relative = f"{COCO_DIR}/{self.shard_id}.json"
        self.store.write(relative, json.dumps(document).encode())
        return relative

    def _write_pngs(self, table: pa.Table) -> list[str]:
        written = []
        for index, image_id, png in zip(
            table.column("image_index").to_pylist(), table.column("image_id").to_pylist(), table.column("label_png").to_pylist()
        ):
            if png is None:
                continue
            relative = f"{PNG_DIR}/{self.shard_id}/{safe_name(index, image_id)}.png"
            self.store.write(relative, png)
            written.append(relative)
        return written

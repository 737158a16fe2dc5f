"""Pipeline step (CPU tasks): label maps -> COCO RLE per class, areas, boxes; rows of the schema.

The PNG label maps (and margin maps, format `confidence`) are written here, by the tasks that make them, several uploads in flight per
task (`OutputStore.write_many`): no pixel goes through the driver, and a cluster writes them as
fast as it makes them. A row carries its PNG's name; the shard's marker, written last, lists it,
so a PNG of a shard that is not committed yet is invisible to readers and rewritten when the shard
is redone.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import re
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image
from pycocotools import mask as mask_utils

from schemas import LABELS_SCHEMA, LABELS_SCHEMA_VERSION, STATUS_OK, png_unlabeled_value

from ..infer import UNLABELED
from .coco import coco_fragments
from .commit import CONFIDENCE_DIR, PNG_DIR, JobOutput
from .duplicates import copy_labels, read_committed_rows

COCO_ROW_COLUMNS = ["status", "image_index", "image_id", "width", "height", "labels"]

# The labels schema plus what the driver needs and the Parquet does not keep: the row's PNG label
# map and margin map, relative to the output folder (null: none written), its COCO fragments, and
# for a copy the image whose labels it reuses and whether it still waits for them (`duplicates.py`).
WORK_FIELDS = [
    pa.field("png_file", pa.string()),
    pa.field("confidence_file", pa.string()),
    pa.field("label_source", pa.int64()),
    pa.field("awaiting_labels", pa.bool_()),
]
WORK_COLUMNS = (*(field.name for field in WORK_FIELDS), "coco_image", "coco_annotations")
# What the model step adds with `statistics` on (`sed-label preview`), carried through as they are.
STATISTICS_COLUMNS = {
    "model_warm": pa.bool_(),
    "prompts_won": pa.int64(),
    "runner_up_pairs": pa.list_(pa.int64()),
    "runner_up_counts": pa.list_(pa.int64()),
}
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(image_index: int, image_id: str, max_length: int = 80) -> str:
    """An object name from an image id: never `..`, `/` or absolute; unique through the index."""
    stem = _UNSAFE.sub("_", image_id.rsplit("/", 1)[-1].rsplit(".", 1)[0]).strip("._")[:max_length]
    return f"{image_index:09d}_{stem}" if stem else f"{image_index:09d}"


def png_file(shard_id: str, image_index: int, image_id: str, folder: str = PNG_DIR) -> str:
    """Where a row's PNG goes: its label map under png/, its margin map under confidence/."""
    return f"{folder}/{shard_id}/{safe_name(image_index, image_id)}.png"


def encode_margin_png(margin_map: np.ndarray) -> bytes:
    """A quantised margin map (uint8, `schemas.MARGIN_PNG_SCALE`) -> grayscale PNG."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(margin_map, dtype=np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """Boolean (H, W) -> COCO compressed RLE with string counts, area and [x, y, w, h] box."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {
        "rle_counts": rle["counts"].decode("ascii"),
        "area": int(mask_utils.area(rle)),
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
    }


def label_map_of(row: dict[str, Any]) -> np.ndarray:
    """A labels row's label map (unlabeled = 65535), decoded from its RLE masks."""
    labels = np.full((row["height"], row["width"]), UNLABELED, dtype=np.uint16)
    for label in row["labels"]:
        rle = {"size": [row["height"], row["width"]], "counts": label["rle_counts"].encode()}
        labels[mask_utils.decode(rle).astype(bool)] = label["class_id"]
    return labels


def encode_png(label_map: np.ndarray, num_classes: int) -> bytes:
    """Label map -> PNG: uint8 (255 = unlabeled) up to 254 classes, else uint16 (65535)."""
    unlabeled = png_unlabeled_value(num_classes)
    values = np.where(label_map == UNLABELED, unlabeled, label_map)
    if unlabeled == 255:
        image = Image.fromarray(values.astype(np.uint8), mode="L")
    else:
        image = Image.fromarray(values.astype(np.uint16))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def encode_labels(
    batch: dict[str, np.ndarray],
    num_classes: int,
    taxonomy_hash: str,
    checkpoint_hash: str,
    output: dict[str, Any] | None = None,
    formats: tuple[str, ...] = (),
    shard_size: int | None = None,
) -> pa.Table:
    """The model step's output -> rows of the labels schema. With `output` (`url`, `storage_options`
    of the job's output), each ok row's PNG label map (format `png`) and margin map (format
    `confidence`, from the batch's `margin_map`) are written there.

    Rows that reuse another image's labels (`label_source`, `duplicates.py`) get them here when that
    image's row was committed when they were claimed (`source_committed`; read from `output`, whose
    shards hold `shard_size` images); the others are left `awaiting_labels` for the driver."""
    n = len(batch["image_index"])
    label_source = batch["label_source"] if "label_source" in batch else np.full(n, -1, np.int64)
    reuses = (label_source >= 0) & (batch["status"] == STATUS_OK)
    labels, pngs, margins = [], {}, {}
    for i in range(n):
        if batch["status"][i] != STATUS_OK or reuses[i]:
            labels.append(None)
            continue
        label_map = batch["label_map"][i]
        entries = []
        statistics = zip(batch["class_ids"][i], batch["mean_probs"][i], batch["max_probs"][i], json.loads(batch["top_prompts"][i]))
        for class_id, mean_prob, max_prob, top_prompt in statistics:
            entry = {"class_id": int(class_id), "mean_prob": float(mean_prob), "max_prob": float(max_prob), "top_prompt": top_prompt}
            entry.update(encode_mask(label_map == class_id))
            entries.append(entry)
        labels.append(entries)
        names = (batch["shard_id"][i], int(batch["image_index"][i]), batch["image_id"][i])
        if output is not None and "png" in formats:
            pngs[i] = (png_file(*names), encode_png(label_map, num_classes))
        if output is not None and "confidence" in formats:
            margins[i] = (png_file(*names, folder=CONFIDENCE_DIR), encode_margin_png(batch["margin_map"][i]))
    if pngs or margins:
        JobOutput(output["url"], output["storage_options"]).write_many(dict([*pngs.values(), *margins.values()]))
    decoded = batch["status"] == STATUS_OK
    ok = decoded & ~reuses  # rows whose labels the model made here
    now = dt.datetime.now(dt.timezone.utc)
    # A batch whose images all failed to read carries no hash at all: Arrow then gives the column as NaNs.
    hashes = {name: [h if isinstance(h, str) else None for h in batch[name]] if name in batch else [None] * n for name in ("content_hash", "phash")}
    model_seconds = batch["model_seconds"] if "model_seconds" in batch else np.zeros(n)
    tiled_windows = batch["tiled_windows"] if "tiled_windows" in batch else np.zeros(n, np.int32)
    duplicate_of = batch["duplicate_of"] if "duplicate_of" in batch else np.full(n, -1, np.int64)
    columns = {
        "schema_version": [LABELS_SCHEMA_VERSION] * n,
        "image_index": batch["image_index"].tolist(),
        "image_id": list(batch["image_id"]),
        "source": list(batch["source"]),
        "shard_id": list(batch["shard_id"]),
        "status": list(batch["status"]),
        "error": [e if e else None for e in batch["error"]],
        "width": [int(w) if k else None for w, k in zip(batch["width"], decoded)],
        "height": [int(h) if k else None for h, k in zip(batch["height"], decoded)],
        "labels": labels,
        "unlabeled_area": [int(u) if k else None for u, k in zip(batch["unlabeled_area"], ok)],
        "distractor_area": [int(d) if k else None for d, k in zip(batch["distractor_area"], ok)],
        "mean_margin": [float(m) if k else None for m, k in zip(batch["mean_margin"], ok)],
        "low_margin_share": [float(m) if k else None for m, k in zip(batch["low_margin_share"], ok)],
        "kept_classes": [batch["kept_classes"][i].tolist() if ok[i] else None for i in range(n)],
        **hashes,
        "duplicate_of": [int(d) if d >= 0 else None for d in duplicate_of],
        "model_seconds": [float(m) if k else None for m, k in zip(model_seconds, ok)],
        "tiled_windows": [int(w) if k else None for w, k in zip(tiled_windows, ok)],
        "taxonomy_hash": [taxonomy_hash] * n,
        "checkpoint_hash": [checkpoint_hash] * n,
        "labeled_at": [now] * n,
        "png_file": [pngs[i][0] if i in pngs else None for i in range(n)],
        "confidence_file": [margins[i][0] if i in margins else None for i in range(n)],
        "label_source": [int(s) if r else None for s, r in zip(label_source, reuses)],
        "awaiting_labels": reuses.tolist(),
    }
    table = pa.table(columns, schema=pa.schema([*LABELS_SCHEMA, *WORK_FIELDS], metadata=LABELS_SCHEMA.metadata))
    for name, kind in STATISTICS_COLUMNS.items():
        if name in batch:
            values = [v.tolist() for v in batch[name]] if pa.types.is_list(kind) else batch[name].tolist()
            table = table.append_column(name, pa.array(values, kind))
    if output is not None and shard_size is not None and "source_committed" in batch:
        table = _copy_committed_labels(table, batch["source_committed"] & reuses, output, num_classes, shard_size)
    # The COCO fragments from the table's own values (as float32 as the Parquet keeps them); a
    # copy that waits for its labels gets them with its labels (`duplicates.copy_labels`).
    fragments = [
        (None, None) if row["awaiting_labels"] else coco_fragments(row, num_classes)
        for row in table.select([*COCO_ROW_COLUMNS, "awaiting_labels"]).to_pylist()
    ]
    table = table.append_column("coco_image", pa.array([f[0] for f in fragments], pa.string()))
    return table.append_column("coco_annotations", pa.array([f[1] for f in fragments], pa.string()))


def _copy_committed_labels(table: pa.Table, committed: np.ndarray, output: dict[str, Any], num_classes: int, shard_size: int) -> pa.Table:
    """The rows marked in `committed` with the labels of their (committed) sources, read here."""
    if not committed.any():
        return table
    mask = pa.array(committed)
    copies = table.filter(mask)
    sources = read_committed_rows(JobOutput(output["url"], output["storage_options"]), copies.column("label_source").to_pylist(), shard_size)
    return pa.concat_tables([table.filter(pc.invert(mask)), copy_labels(copies, sources, num_classes)])

"""The output contracts of a labelling job: Parquet rows, COCO files and PNG label maps.

Parquet (one row per input image) is the job's record. Every file carries `schema_version` as a
column and in its metadata; a change to the contract bumps `LABELS_SCHEMA_VERSION` and keeps a
reader for the previous version (see `read_labels_table`).
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

LABELS_SCHEMA_VERSION = 1

STATUS_OK = "ok"
STATUS_ERROR = "error"

# An error row's `error` reads "REASON: detail". Reasons about the image's own bytes: every read
# of the same object fails the same way, so they are the image's row, whatever their share.
IMAGE_ERROR_REASONS = frozenset(
    {"empty file", "not an image", "unreadable header", "decompression bomb", "too many pixels", "no pixels", "corrupt or truncated", "not image bytes"}
)
# Reasons whose cause lies outside the image (storage, credentials, the model or its hardware):
# a job stops when one of them takes too many rows (`JobSpec.error_breaker`).
NOT_FOUND, ACCESS_DENIED, READ_FAILED = "not found", "access denied", "read failed"
OUT_OF_MEMORY, INFERENCE_FAILED = "out of memory", "inference failed"


def error_reason(message: str | None) -> str:
    """The reason of an error row's message (its text before the first colon)."""
    return (message or "unknown").split(":", 1)[0]

CLASS_LABEL = pa.struct(
    [
        pa.field("class_id", pa.int32(), nullable=False),  # index in the taxonomy
        pa.field("rle_counts", pa.string(), nullable=False),  # COCO compressed RLE, size = (height, width)
        pa.field("area", pa.int64(), nullable=False),
        pa.field("bbox", pa.list_(pa.float32(), 4), nullable=False),  # COCO [x, y, width, height]
        pa.field("mean_prob", pa.float32(), nullable=False),  # over the class's pixels
        pa.field("max_prob", pa.float32(), nullable=False),
    ]
)

LABELS_SCHEMA = pa.schema(
    [
        pa.field("schema_version", pa.int16(), nullable=False),
        pa.field("image_index", pa.int64(), nullable=False),  # position in the job's plan; COCO image id
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("shard_id", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),  # "ok" | "error"
        pa.field("error", pa.string()),  # the reason, for status "error"
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("labels", pa.list_(CLASS_LABEL)),  # one entry per class present
        pa.field("unlabeled_area", pa.int64()),  # pixels below min_confidence
        pa.field("kept_classes", pa.list_(pa.int32())),  # classes kept by early rejection
        pa.field("taxonomy_hash", pa.string(), nullable=False),
        pa.field("checkpoint_hash", pa.string(), nullable=False),
        pa.field("labeled_at", pa.timestamp("ms", tz="UTC"), nullable=False),
    ],
    metadata={b"sed_label.schema_version": str(LABELS_SCHEMA_VERSION).encode()},
)


def read_labels_table(table: pa.Table) -> pa.Table:
    """Check a Parquet table against the schema versions this code reads; return it as the current one."""
    version = (table.schema.metadata or {}).get(b"sed_label.schema_version")
    if version is None:
        raise ValueError("not a sed-label labels table: no sed_label.schema_version in its metadata")
    if int(version) != LABELS_SCHEMA_VERSION:
        raise ValueError(f"labels schema version {int(version)} is not readable by this version ({LABELS_SCHEMA_VERSION})")
    return table


def read_labels_parquet(data: bytes, columns: list[str] | None = None) -> pa.Table:
    """A labels Parquet file's bytes -> its table (only `columns`, if given), checked by `read_labels_table`."""
    table = pq.read_table(pa.BufferReader(data), columns=columns)
    return read_labels_table(table)


# PNG label maps: uint8 with 255 = unlabeled up to 254 classes, else uint16 with 65535 = unlabeled.
PNG_UINT8_MAX_CLASSES = 254


def png_unlabeled_value(num_classes: int) -> int:
    return 255 if num_classes <= PNG_UINT8_MAX_CLASSES else 65535


# COCO: category id = class index + 1 (COCO reserves 0); image id = image_index.
COCO_CATEGORY_OFFSET = 1

"""The output contracts of a labelling job: Parquet rows, COCO files and PNG label maps.

Parquet (one row per input image) is the job's record. Every file carries `schema_version` as a
column and in its metadata; a change to the contract bumps `LABELS_SCHEMA_VERSION` and keeps a
reader for the previous version (see `read_labels_table`).
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq

LABELS_SCHEMA_VERSION = 4

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


# Uncertainty: a pixel's margin is its best class's probability minus that of the best other class
# (prompts of one group are one class; 0 if no other class was kept). It says how close the pixel
# came to another label, which is what a reviewer corrects; the winning probability alone does not
# (SED's classes are independent sigmoids: two classes can both be near 1). A pixel is uncertain
# under LOW_MARGIN. The `confidence` PNGs hold the margin as uint8: round(margin * 255).
LOW_MARGIN = 0.1
MARGIN_PNG_SCALE = 255


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
        pa.field("top_prompt", pa.string()),  # a group's prompt that won most of its pixels; null for one-prompt classes
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
        pa.field("distractor_area", pa.int64()),  # pixels whose best prompt is a distractor (unlabeled too)
        pa.field("mean_margin", pa.float32()),  # the image's mean pixel margin (see LOW_MARGIN); low = uncertain
        pa.field("low_margin_share", pa.float32()),  # share of its pixels with a margin under LOW_MARGIN
        pa.field("kept_classes", pa.list_(pa.int32())),  # prompts kept by early rejection (indices into job.json's "prompts")
        pa.field("content_hash", pa.string()),  # SHA-256 of the decoded pixels and their shape (32 hex digits)
        pa.field("phash", pa.string()),  # perceptual hash (imagehash's pHash, 16 hex digits): near-duplicates
        pa.field("duplicate_of", pa.int64()),  # the image_index whose labels this row reuses (same content_hash)
        pa.field("model_seconds", pa.float32()),  # the model's time on this image; a duplicate's: its original's, saved
        pa.field("tiled_windows", pa.int32()),  # windows a large image was labelled in (inference.tiling); 0: whole
        pa.field("taxonomy_hash", pa.string(), nullable=False),
        pa.field("checkpoint_hash", pa.string(), nullable=False),
        pa.field("labeled_at", pa.timestamp("ms", tz="UTC"), nullable=False),
    ],
    metadata={b"sed_label.schema_version": str(LABELS_SCHEMA_VERSION).encode()},
)


def read_labels_table(table: pa.Table) -> pa.Table:
    """Check a Parquet table against the schema versions this code reads; return it as the current one.

    Version 1 (before taxonomy groups and distractors) gains `distractor_area` = 0 (it had no
    distractors) and a null `top_prompt` per class label (its classes were single prompts).
    Version 2 (before uncertainty scores) gains null `mean_margin` and `low_margin_share`: they were
    not measured. Version 3 (before duplicates and tiling) gains null `content_hash`, `phash`,
    `duplicate_of` and `model_seconds` (nothing was hashed, reused or timed) and `tiled_windows` 0
    for its labelled rows (nothing was tiled)."""
    version = (table.schema.metadata or {}).get(b"sed_label.schema_version")
    if version is None:
        raise ValueError("not a sed-label labels table: no sed_label.schema_version in its metadata")
    version = int(version)
    if not 1 <= version <= LABELS_SCHEMA_VERSION:
        raise ValueError(f"labels schema version {version} is not readable by this version (1 to {LABELS_SCHEMA_VERSION})")
    if version == 1:
        table = _upgrade_version_1(table)
    if version <= 2:
        table = _upgrade_version_2(table)
    if version <= 3:
        table = _upgrade_version_3(table)
    return table if version == LABELS_SCHEMA_VERSION else _as_current_version(table)


def _upgrade_version_1(table: pa.Table) -> pa.Table:
    if "labels" in table.column_names:
        chunks = []
        for labels in table.column("labels").chunks:
            entries = labels.values  # the whole child array: `offsets` index into it, sliced or not
            upgraded = pa.StructArray.from_arrays(
                [entries.field(name) for name in entries.type.names] + [pa.nulls(len(entries), pa.string())],
                fields=[*entries.type, CLASS_LABEL.field("top_prompt")],
            )
            chunks.append(pa.ListArray.from_arrays(labels.offsets, upgraded, type=pa.list_(CLASS_LABEL), mask=labels.is_null()))
        lists = pa.chunked_array(chunks, type=pa.list_(CLASS_LABEL))
        table = table.set_column(table.column_names.index("labels"), LABELS_SCHEMA.field("labels"), lists)
    if "unlabeled_area" in table.column_names:
        unlabeled = table.column("unlabeled_area")
        distractor = pa.compute.if_else(pa.compute.is_null(unlabeled), pa.scalar(None, pa.int64()), pa.scalar(0, pa.int64()))
        table = table.add_column(table.column_names.index("unlabeled_area") + 1, LABELS_SCHEMA.field("distractor_area"), distractor)
    return table


def _upgrade_version_2(table: pa.Table) -> pa.Table:
    at = table.column_names.index("kept_classes") if "kept_classes" in table.column_names else table.num_columns
    for name in ("low_margin_share", "mean_margin"):
        table = table.add_column(at, LABELS_SCHEMA.field(name), pa.nulls(table.num_rows, pa.float32()))
    return table


VERSION_4_COLUMNS = ("content_hash", "phash", "duplicate_of", "model_seconds", "tiled_windows")


def _upgrade_version_3(table: pa.Table) -> pa.Table:
    at = table.column_names.index("taxonomy_hash") if "taxonomy_hash" in table.column_names else table.num_columns
    for name in reversed(VERSION_4_COLUMNS):
        if name not in table.column_names:  # a table made from a newer one may still hold them
            field = LABELS_SCHEMA.field(name)
            values = pa.nulls(table.num_rows, field.type)
            if name == "tiled_windows" and "status" in table.column_names:
                values = pa.compute.if_else(pa.compute.equal(table["status"], STATUS_OK), pa.scalar(0, pa.int32()), values)
            table = table.add_column(at, field, values)
    return table


def _as_current_version(table: pa.Table) -> pa.Table:
    """An upgraded table says it is of the current version, in its column and its metadata."""
    metadata = {**(table.schema.metadata or {}), b"sed_label.schema_version": str(LABELS_SCHEMA_VERSION).encode()}
    if "schema_version" in table.column_names:
        versions = pa.array([LABELS_SCHEMA_VERSION] * table.num_rows, pa.int16())
        table = table.set_column(table.column_names.index("schema_version"), LABELS_SCHEMA.field("schema_version"), versions)
    return table.replace_schema_metadata(metadata)


def read_labels_parquet(data: bytes, columns: list[str] | None = None) -> pa.Table:
    """A labels Parquet file's bytes -> its table (only `columns`, if given, in that order), checked
    and upgraded by `read_labels_table`; a column an older file lacks comes from the upgrade."""
    stored = pq.read_schema(pa.BufferReader(data)).names
    read = None if columns is None else [name for name in columns if name in stored]
    if columns is not None and "distractor_area" in columns and "unlabeled_area" in stored and "unlabeled_area" not in read:
        read.append("unlabeled_area")  # the upgrade makes distractor_area from it
    table = read_labels_table(pq.read_table(pa.BufferReader(data), columns=read))
    return table if columns is None else table.select(columns)


# PNG label maps: uint8 with 255 = unlabeled up to 254 classes, else uint16 with 65535 = unlabeled.
PNG_UINT8_MAX_CLASSES = 254


def png_unlabeled_value(num_classes: int) -> int:
    return 255 if num_classes <= PNG_UINT8_MAX_CLASSES else 65535


# COCO: category id = class index + 1 (COCO reserves 0); image id = image_index.
COCO_CATEGORY_OFFSET = 1

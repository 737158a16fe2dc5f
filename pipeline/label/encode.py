"""Pipeline step (CPU): label maps -> COCO RLE per class, areas, boxes, PNG bytes; rows of the schema."""

from __future__ import annotations

import datetime as dt
import io
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image
from pycocotools import mask as mask_utils

from schemas import LABELS_SCHEMA, LABELS_SCHEMA_VERSION, STATUS_OK, png_unlabeled_value

from ..infer import UNLABELED

ENCODED_SCHEMA = LABELS_SCHEMA.append(pa.field("label_png", pa.binary()))


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """Boolean (H, W) -> COCO compressed RLE with string counts, area and [x, y, w, h] box."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {
        "rle_counts": rle["counts"].decode("ascii"),
        "area": int(mask_utils.area(rle)),
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
    }


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
    batch: dict[str, np.ndarray], num_classes: int, taxonomy_hash: str, checkpoint_hash: str, write_png: bool
) -> pa.Table:
    """The model step's output -> rows of the labels schema (plus PNG bytes when asked for)."""
    n = len(batch["image_index"])
    labels, pngs = [], []
    for i in range(n):
        if batch["status"][i] != STATUS_OK:
            labels.append(None)
            pngs.append(None)
            continue
        label_map = batch["label_map"][i]
        entries = []
        for class_id, mean_prob, max_prob in zip(batch["class_ids"][i], batch["mean_probs"][i], batch["max_probs"][i]):
            entry = {"class_id": int(class_id), "mean_prob": float(mean_prob), "max_prob": float(max_prob)}
            entry.update(encode_mask(label_map == class_id))
            entries.append(entry)
        labels.append(entries)
        pngs.append(encode_png(label_map, num_classes) if write_png else None)
    ok = batch["status"] == STATUS_OK
    now = dt.datetime.now(dt.timezone.utc)
    columns = {
        "schema_version": [LABELS_SCHEMA_VERSION] * n,
        "image_index": batch["image_index"].tolist(),
        "image_id": list(batch["image_id"]),
        "source": list(batch["source"]),
        "shard_id": list(batch["shard_id"]),
        "status": list(batch["status"]),
        "error": [e if e else None for e in batch["error"]],
        "width": [int(w) if k else None for w, k in zip(batch["width"], ok)],
        "height": [int(h) if k else None for h, k in zip(batch["height"], ok)],
        "labels": labels,
        "unlabeled_area": [int(u) if k else None for u, k in zip(batch["unlabeled_area"], ok)],
        "kept_classes": [batch["kept_classes"][i].tolist() if ok[i] else None for i in range(n)],
        "taxonomy_hash": [taxonomy_hash] * n,
        "checkpoint_hash": [checkpoint_hash] * n,
        "labeled_at": [now] * n,
        "label_png": pngs,
    }
    return pa.table(columns, schema=ENCODED_SCHEMA)

"""COCO for a job's labels: categories, each row's image and annotations as JSON fragments (made
by the encode tasks, across the cluster), and a shard's document joined from them (in the driver:
string joins, no per-row work)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from schemas import COCO_CATEGORY_OFFSET, LABELS_SCHEMA_VERSION, STATUS_OK


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


def coco_fragments(row: dict[str, Any], num_classes: int) -> tuple[str | None, str | None]:
    """A row's COCO image and its annotations as JSON text (the annotations comma-separated), or
    (None, None) for an error row: what `shard_document` joins."""
    images, annotations = coco_images_and_annotations([row], num_classes)
    if not images:
        return None, None
    return json.dumps(images[0]), ", ".join(json.dumps(a) for a in annotations)


def shard_document(shard_id: str, classes: Sequence[str], images: Iterable[str | None], annotations: Iterable[str | None]) -> bytes:
    """A shard's COCO file from its rows' fragments (in image order; None and "" are skipped)."""
    info = {"description": f"sed-label pseudo-labels, shard {shard_id}", "schema_version": LABELS_SCHEMA_VERSION}
    return (
        f'{{"info": {json.dumps(info)}, "images": [{", ".join(i for i in images if i)}], '
        f'"annotations": [{", ".join(a for a in annotations if a)}], "categories": {json.dumps(coco_categories(classes))}}}'
    ).encode()

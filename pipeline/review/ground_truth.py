"""Reviewed images as ground truth: label maps, the images, a training spec and the manifest.

    GT/labels/<image id>.png   output class ids; 255 (65535 past 254 classes) = unlabeled
    GT/images/<image id>       the reviewed image, read as the job read it
    GT/train.yaml              a fine-tuning spec: the job's model and taxonomy on GT
    GT/review.json             which images were reviewed, by whom, when; written last

`sed-label report JOB --ground-truth GT/labels` measures the job on them and `sed-label train
GT/train.yaml` fine-tunes on them. Everything is checked and decoded before the first file is
written; a second import into the same folder replaces the first (files it listed and the new one
does not are removed).
"""

from __future__ import annotations

import datetime as dt
import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import yaml
from PIL import Image

from schemas import png_unlabeled_value

from ..label.commit import redact_url
from ..storage import OutputStore, filesystem, to_url
from .rows import ReviewedJob, ReviewError, image_name, label_name

LABELS, IMAGES = "labels", "images"
MANIFEST, TRAIN_SPEC = "review.json", "train.yaml"
FINE_TUNE_EPOCHS = 20  # passes over the reviewed images in the generated training spec
FINE_TUNE_BATCH = 4


@dataclass
class Correction:
    """One reviewed image's ground truth, in output class ids (`unlabeled` where nothing was painted)."""

    image_index: int
    label_map: np.ndarray
    reviewed_by: str | None
    reviewed_at: str | None
    overlap_pixels: int  # painted by two regions of different classes (the later one kept)
    unpainted_pixels: int
    origin: str  # where in the export it came from (a Label Studio task, a CVAT file)


def unlabeled_value(job: ReviewedJob) -> int:
    return png_unlabeled_value(len(job.classes))


def write_ground_truth(
    job: ReviewedJob,
    corrections: list[Correction],
    rows_by_index: dict[int, dict[str, Any]],
    url: str,
    storage_options: dict[str, Any],
    input_storage_options: dict[str, Any],
    provenance: dict[str, Any],
) -> dict[str, Any]:
    """Write the corrections (of the job's rows `rows_by_index`, by image index) as ground truth
    under `url`; returns the manifest."""
    if not corrections:
        raise ReviewError("the export holds no annotated image: nothing to import")
    rows = [rows_by_index[c.image_index] for c in corrections]
    images = job.image_bytes(rows, input_storage_options)
    labels = [label_name(row["image_id"]) for row in rows]
    _refuse_collisions(rows, labels)
    files: dict[str, bytes] = {}
    entries = []
    for row, correction, data, label in zip(rows, corrections, images, labels):
        image = f"{IMAGES}/{image_name(row['image_id'], data)}"
        files[f"{LABELS}/{label}"] = _png(correction.label_map)
        files[image] = data
        entries.append(
            {
                "image_index": row["image_index"],
                "image_id": row["image_id"],
                "source": redact_url(row["source"]),
                "label": f"{LABELS}/{label}",
                "image": image,
                "reviewed_by": correction.reviewed_by,
                "reviewed_at": correction.reviewed_at,
                "overlap_pixels": correction.overlap_pixels,
                "unpainted_pixels": correction.unpainted_pixels,
                "origin": correction.origin,
            }
        )
    store = OutputStore(url, storage_options)
    previous = store.read_json(MANIFEST) if store.exists(MANIFEST) else None
    store.write_many(files)
    store.write(TRAIN_SPEC, training_spec(job, url, len(entries)).encode("utf-8"))
    manifest = {
        **provenance,
        "job": redact_url(job.url),
        "taxonomy_hash": job.record["taxonomy_hash"],
        "checkpoint_hash": job.record["checkpoint_hash"],
        "classes": job.classes,
        "unlabeled_value": unlabeled_value(job),
        "imported_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "images": entries,
    }
    store.write_json(MANIFEST, manifest)
    for stale in _stale_files(previous, files):
        store.remove(stale)
    return manifest


def _refuse_collisions(rows: list[dict[str, Any]], labels: list[str]) -> None:
    seen: dict[str, str] = {}
    for row, label in zip(rows, labels):
        if label in seen:
            raise ReviewError(f"images {seen[label]!r} and {row['image_id']!r} would share the label map {LABELS}/{label}")
        seen[label] = row["image_id"]


def _stale_files(previous: dict[str, Any] | None, written: dict[str, bytes]) -> list[str]:
    if not previous:
        return []
    listed = [name for entry in previous.get("images", []) for name in (entry["label"], entry["image"])]
    return [name for name in listed if name not in written]


def _png(label_map: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(label_map).save(buffer, format="PNG")
    return buffer.getvalue()


def training_spec(job: ReviewedJob, url: str, images: int) -> str:
    """A `sed-label train` spec fine-tuning the job's model on the reviewed images, at the job's
    resolution, with the paper's recipe otherwise; `FINE_TUNE_EPOCHS` passes over them."""
    spec = job.record["spec"]
    inference = spec["inference"]
    batch = min(FINE_TUNE_BATCH, images)
    resolution = inference.get("short_edge") or spec["model"]["image_size"]
    fs, root = filesystem(url)
    where = to_url(fs, root).rstrip("/") + "/"  # absolute: the spec may be run from anywhere
    document = {
        "data": {"url": where},
        "taxonomy": _without_storage_options(spec["taxonomy"]),
        "model": _without_storage_options(spec["model"]),
        "recipe": {
            "iterations": max(1, math.ceil(FINE_TUNE_EPOCHS * images / batch)),
            "batch_size": batch,
            "crop": spec["model"]["image_size"],
            "short_edge": resolution,
            "max_long_edge": inference.get("max_size") or 2666,
        },
        "output": {"url": where + "finetune/", "checkpoint_every": 1000},
        "ray": {"address": spec["ray"].get("address")},
    }
    header = (
        f"# Fine-tuning on the {images} reviewed images of {redact_url(job.url)} (written by `sed-label review import`).\n"
        "# Storage options are not copied (they may hold credentials): add them where needed. Run: sed-label train THIS_FILE\n"
    )
    return header + yaml.safe_dump(document, sort_keys=False)


def _without_storage_options(section: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in section.items() if key != "storage_options"}

"""Pipeline step: planned images -> decoded RGB arrays, or error rows with the reason."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from schemas import ACCESS_DENIED, NOT_FOUND, READ_FAILED, STATUS_ERROR, STATUS_OK

from .decode import DecodeError, decode_image
from .fingerprints import content_hash, perceptual_hash
from .sources import read_images

# An error row's image placeholder: it keeps the column's type without holding pixels.
NO_IMAGE = np.zeros((1, 1, 3), dtype=np.uint8)


def read_error_message(source: str, exc: Exception) -> str:
    """"REASON: object: exception" for a failed read: the reason says whether the object is gone,
    access to it is denied (fsspec's object stores raise FileNotFoundError and PermissionError, as
    local files do; HTTP-based ones may carry the status instead), or something else failed."""
    status = getattr(exc, "status", None) or getattr(exc, "code", None)
    if isinstance(exc, FileNotFoundError) or status == 404:
        reason = NOT_FOUND
    elif isinstance(exc, PermissionError) or status in (401, 403):
        reason = ACCESS_DENIED
    else:
        reason = READ_FAILED
    return f"{reason}: {source}: {type(exc).__name__}: {exc}"


def read_and_decode(
    plan_rows: pa.Table, image_column: str, max_pixels: int, storage_options: dict[str, Any], fingerprints: bool = False
) -> dict[str, np.ndarray]:
    """Read a batch of plan rows through fsspec and decode them on CPU; failures become error rows.

    `fingerprints` adds each decoded image's `content_hash` and `phash` (`fingerprints.py`; null for
    error rows)."""
    rows = plan_rows.to_pylist()
    data = read_images(rows, image_column, storage_options)
    images, statuses, errors, widths, heights = [], [], [], [], []
    for row, value in zip(rows, data):
        image, error = None, ""
        if isinstance(value, DecodeError):  # a Parquet cell without image bytes
            error = str(value)
        elif isinstance(value, Exception):
            error = read_error_message(row["source"], value)
        else:
            try:
                image = decode_image(value, max_pixels)
            except DecodeError as exc:
                error = str(exc)
        images.append(NO_IMAGE if image is None else image)
        statuses.append(STATUS_ERROR if image is None else STATUS_OK)
        errors.append(error)
        heights.append(0 if image is None else image.shape[0])
        widths.append(0 if image is None else image.shape[1])
    image_array = np.empty(len(images), dtype=object)
    image_array[:] = images
    hashes = {}
    if fingerprints:
        for name, function in (("content_hash", content_hash), ("phash", perceptual_hash)):
            hashes[name] = np.array([function(image) if status == STATUS_OK else None for image, status in zip(images, statuses)], dtype=object)
    return {
        "image_index": np.array([r["image_index"] for r in rows], dtype=np.int64),
        "image_id": np.array([r["image_id"] for r in rows], dtype=object),
        "shard_id": np.array([r["shard_id"] for r in rows], dtype=object),
        "source": np.array([r["source"] for r in rows], dtype=object),
        "status": np.array(statuses, dtype=object),
        "error": np.array(errors, dtype=object),
        "width": np.array(widths, dtype=np.int32),
        "height": np.array(heights, dtype=np.int32),
        "image": image_array,
        **hashes,
    }

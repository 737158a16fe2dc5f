"""Pipeline step: planned images -> decoded RGB arrays, or error rows with the reason."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from schemas import STATUS_ERROR, STATUS_OK

from .decode import DecodeError, decode_image
from .sources import read_images

# An error row's image placeholder: it keeps the column's type without holding pixels.
NO_IMAGE = np.zeros((1, 1, 3), dtype=np.uint8)


def read_and_decode(
    plan_rows: pa.Table, image_column: str, max_pixels: int, storage_options: dict[str, Any]
) -> dict[str, np.ndarray]:
    """Read a batch of plan rows through fsspec and decode them on CPU; failures become error rows."""
    rows = plan_rows.to_pylist()
    data = read_images(rows, image_column, storage_options)
    images, statuses, errors, widths, heights = [], [], [], [], []
    for row, value in zip(rows, data):
        try:
            if isinstance(value, Exception):
                raise DecodeError(f"cannot read {row['source']}: {type(value).__name__}: {value}")
            image = decode_image(value, max_pixels)
        except DecodeError as exc:
            images.append(NO_IMAGE)
            statuses.append(STATUS_ERROR)
            errors.append(str(exc))
            widths.append(0)
            heights.append(0)
            continue
        images.append(image)
        statuses.append(STATUS_OK)
        errors.append("")
        heights.append(image.shape[0])
        widths.append(image.shape[1])
    image_array = np.empty(len(images), dtype=object)
    image_array[:] = images
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
    }

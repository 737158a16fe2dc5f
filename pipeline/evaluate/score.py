"""Pipeline step: label maps against their ground truth -> each image's confusion counts, sparse.

A benchmark's driver sums these into one `SemSegEvaluator`, so no prediction is kept: a row
carries the few (prediction, ground truth) pairs the image holds, not its pixels.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from schemas import STATUS_ERROR, STATUS_OK

from ..datasets import DatasetError, read_label_map
from ..metrics import SemSegEvaluator


def score_labels(
    batch: dict[str, np.ndarray],
    label_urls: list[str],
    classes: list[str],
    ignore_label: int,
    storage_options: dict[str, Any],
) -> dict[str, np.ndarray]:
    """Rows of `SEDInference` -> `confusion_index` / `confusion_count` (flat indices into the
    `SemSegEvaluator` matrix and their pixel counts); failures keep `status` and `error`."""
    n = len(batch["image_index"])
    status, error = batch["status"].copy(), batch["error"].copy()
    indices, counts = np.empty(n, dtype=object), np.empty(n, dtype=object)
    for i in range(n):
        indices[i] = counts[i] = np.zeros(0, np.int64)
        if status[i] != STATUS_OK:
            continue
        url = label_urls[int(batch["image_index"][i])]
        evaluator = SemSegEvaluator(classes, ignore_label=ignore_label)
        try:
            evaluator.process(batch["label_map"][i], read_label_map(url, storage_options))
        except (DatasetError, OSError) as exc:
            status[i], error[i] = STATUS_ERROR, f"ground truth unreadable: {exc}"
            continue
        except ValueError as exc:  # another size, or values outside the dataset's classes
            status[i], error[i] = STATUS_ERROR, f"ground truth mismatch: {url}: {exc}"
            continue
        flat = evaluator.confusion.reshape(-1)
        indices[i] = np.flatnonzero(flat)
        counts[i] = flat[indices[i]]
    return {
        "image_index": batch["image_index"],
        "image_id": batch["image_id"],
        "status": status,
        "error": error,
        "confusion_index": indices,
        "confusion_count": counts,
    }

"""Statistics of a job's labels, streamed shard by shard over the committed Parquet files.

Everything kept is O(classes) or O(gallery size): a job of millions of images is summarised in the
memory of one shard.
"""

from __future__ import annotations

import heapq
import random
from array import array
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from schemas import STATUS_OK, error_reason

from ..fingerprints import phash_bits

HISTOGRAM_BINS = 20


@dataclass
class ImageSummary:
    image_index: int
    image_id: str
    shard_id: str
    confidence: float  # area-weighted mean probability of the labelled pixels
    row: dict[str, Any]


@dataclass
class LabelStatistics:
    classes: list[str]
    gallery_size: int = 8
    seed: int = 0
    images: int = 0
    ok: int = 0
    errors_by_reason: Counter = field(default_factory=Counter)
    error_examples: list[dict[str, str]] = field(default_factory=list)
    total_pixels: int = 0
    unlabeled_pixels: int = 0
    distractor_pixels: int = 0
    duplicates: int = 0  # rows that reuse another's labels (duplicate_of)
    model_seconds: float = 0.0  # the model's time on the rows it labelled
    model_seconds_saved: float = 0.0  # the time their originals took, summed over the duplicates
    _per_minute: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        t = len(self.classes)
        self.class_pixels = np.zeros(t, dtype=np.int64)
        self.class_images = np.zeros(t, dtype=np.int64)
        self.class_probability_sums = np.zeros(t, dtype=np.float64)  # mean_prob x area, summed
        self.mean_prob_histogram = np.zeros((t, HISTOGRAM_BINS), dtype=np.int64)
        self.kept_counts: Counter = Counter()
        self._least_confident: list[tuple[float, int, ImageSummary]] = []  # max-heap by -confidence
        self._sample: list[ImageSummary] = []
        self._random = random.Random(self.seed)
        self._seen_ok = 0
        # Every ok row's perceptual hash and index, 16 bytes a row, for the near-duplicate groups.
        self.phashes, self.phash_indices = array("Q"), array("q")

    def add_row(self, row: dict[str, Any]) -> None:
        self.images += 1
        if row.get("duplicate_of") is not None:
            self.duplicates += 1
            self.model_seconds_saved += row["model_seconds"] or 0.0
        if row["status"] != STATUS_OK:
            self.errors_by_reason[error_reason(row["error"])] += 1
            if len(self.error_examples) < 20:
                self.error_examples.append({"image_id": row["image_id"], "error": row["error"] or ""})
            return
        self.ok += 1
        if row.get("duplicate_of") is None:
            self.model_seconds += row.get("model_seconds") or 0.0
        if row.get("phash") is not None:
            self.phashes.append(phash_bits(row["phash"]))
            self.phash_indices.append(row["image_index"])
        pixels = row["width"] * row["height"]
        self.total_pixels += pixels
        self.unlabeled_pixels += row["unlabeled_area"] or 0
        self.distractor_pixels += row.get("distractor_area") or 0
        weighted = 0.0
        labelled = 0
        for label in row["labels"]:
            c = label["class_id"]
            self.class_pixels[c] += label["area"]
            self.class_images[c] += 1
            self.class_probability_sums[c] += label["mean_prob"] * label["area"]
            b = min(int(label["mean_prob"] * HISTOGRAM_BINS), HISTOGRAM_BINS - 1)
            self.mean_prob_histogram[c, b] += 1
            weighted += label["mean_prob"] * label["area"]
            labelled += label["area"]
        self.kept_counts[len(row["kept_classes"] or [])] += 1
        self._per_minute[int(row["labeled_at"].timestamp() // 60)] += 1
        summary = ImageSummary(row["image_index"], row["image_id"], row["shard_id"], weighted / labelled if labelled else 0.0, row)
        entry = (-summary.confidence, -summary.image_index, summary)
        if len(self._least_confident) < self.gallery_size:
            heapq.heappush(self._least_confident, entry)
        elif self._least_confident and entry > self._least_confident[0]:
            heapq.heapreplace(self._least_confident, entry)
        # Reservoir sampling: a uniform random sample whatever the number of images.
        self._seen_ok += 1
        if len(self._sample) < self.gallery_size:
            self._sample.append(summary)
        else:
            j = self._random.randrange(self._seen_ok)
            if j < self.gallery_size:
                self._sample[j] = summary

    @property
    def least_confident(self) -> list[ImageSummary]:
        return [entry[2] for entry in sorted(self._least_confident, reverse=True)]

    @property
    def random_sample(self) -> list[ImageSummary]:
        return sorted(self._sample, key=lambda s: s.image_index)

    def throughput(self) -> list[tuple[int, int]]:
        """(minute since the first label, images labelled in that minute)."""
        if not self._per_minute:
            return []
        first = min(self._per_minute)
        return [(minute - first, self._per_minute[minute]) for minute in range(first, max(self._per_minute) + 1)]

    def to_dict(self) -> dict[str, Any]:
        labelled = max(int(self.class_pixels.sum()) + self.unlabeled_pixels + self.distractor_pixels, 1)
        return {
            "images": self.images,
            "ok": self.ok,
            "errors": self.images - self.ok,
            "duplicates": self.duplicates,
            "model_seconds": round(self.model_seconds, 3),
            "model_seconds_saved": round(self.model_seconds_saved, 3),
            "errors_by_reason": dict(self.errors_by_reason.most_common()),
            "error_examples": self.error_examples,
            "unlabeled_share": self.unlabeled_pixels / labelled,
            "distractor_share": self.distractor_pixels / labelled,
            "classes": [
                {
                    "class_id": i,
                    "name": name,
                    "pixel_share": float(self.class_pixels[i] / labelled),
                    "images": int(self.class_images[i]),
                    # the mean probability of the class's pixels (null: never predicted)
                    "mean_prob": float(self.class_probability_sums[i] / self.class_pixels[i]) if self.class_pixels[i] else None,
                    "mean_prob_histogram": self.mean_prob_histogram[i].tolist(),
                }
                for i, name in enumerate(self.classes)
            ],
            "kept_classes_per_image": {str(k): v for k, v in sorted(self.kept_counts.items())},
            "taxonomy_size": len(self.classes),
            "throughput_per_minute": self.throughput(),
            "least_confident": [{"image_id": s.image_id, "confidence": s.confidence} for s in self.least_confident],
        }

"""A prepared benchmark dataset on storage: its layout, its writer and its reader.

    DIR/images/<id>.jpg      the image (copied byte for byte; ADE20K-847: resized and re-encoded)
    DIR/labels/<id>.png|tif  the label map in train ids (uint8 PNG, or uint16 TIFF)
    DIR/dataset.json         what it is and every item; written last, so it marks a finished folder
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..storage import filesystem, join, to_url, write_bytes
from .labelmaps import decode_label_map, encode_label_map
from .registry import DatasetError, DatasetSpec, get_dataset
from .raw import Sample

MANIFEST = "dataset.json"
FORMAT_VERSION = 1
IMAGES_DIR = "images"
LABELS_DIR = "labels"


@dataclass(frozen=True)
class BenchmarkItem:
    image_id: str
    image_url: str
    label_url: str


@dataclass(frozen=True)
class PreparedDataset:
    spec: DatasetSpec
    split: str
    url: str
    items: list[BenchmarkItem]
    limit: int | None  # prepared from only the first N images of the split


class PreparedWriter:
    def __init__(self, spec: DatasetSpec, split: str, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.spec = spec
        self.split = split
        self.url = url
        self.fs, self.root = filesystem(url, storage_options)
        self.root = self.root.rstrip("/")
        self.fs.makedirs(join(self.root, IMAGES_DIR), exist_ok=True)
        self.fs.makedirs(join(self.root, LABELS_DIR), exist_ok=True)
        self.items: list[dict[str, str]] = []

    def add(self, sample: Sample) -> None:
        if sample.labels.dtype != np.dtype(self.spec.label_dtype):
            raise DatasetError(f"{self.spec.name} label maps are {self.spec.label_dtype}, got {sample.labels.dtype} for {sample.image_id}")
        image = f"{IMAGES_DIR}/{sample.image_id}{sample.image_extension}"
        label = f"{LABELS_DIR}/{sample.image_id}{self.spec.label_extension}"
        # Plain writes: the manifest, written last and atomically, is what marks the folder complete.
        self.fs.pipe_file(join(self.root, image), sample.image)
        self.fs.pipe_file(join(self.root, label), encode_label_map(sample.labels))
        self.items.append({"id": sample.image_id, "image": image, "label": label})

    def finish(self, raw_url: str, skipped: list[str], limit: int | None) -> dict[str, Any]:
        manifest = {
            "format_version": FORMAT_VERSION,
            "dataset": self.spec.name,
            "split": self.split,
            "ignore_label": self.spec.ignore_label,
            "label_dtype": self.spec.label_dtype,
            "raw_root": raw_url,
            "prepared_at": time.time(),
            "limit": limit,
            "images": len(self.items),
            "skipped": skipped,
            "items": self.items,
        }
        write_bytes(self.fs, join(self.root, MANIFEST), json.dumps(manifest, indent=1).encode("utf-8"))
        return manifest


def read_prepared(name: str, url: str, storage_options: dict[str, Any] | None = None) -> PreparedDataset:
    """The items of a folder written by `sed-label prepare NAME`, with URLs any worker can open."""
    spec = get_dataset(name)
    fs, root = filesystem(url, storage_options)
    root = root.rstrip("/")
    try:
        manifest = json.loads(fs.cat_file(join(root, MANIFEST)))
    except FileNotFoundError:
        raise DatasetError(
            f"{url!r} is not a prepared dataset (no {MANIFEST}); run `sed-label prepare {name} RAW_ROOT --output {url}` first"
        ) from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DatasetError(f"{url}/{MANIFEST} has format version {manifest.get('format_version')!r}; this sed-label reads {FORMAT_VERSION}")
    if manifest["dataset"] != name:
        raise DatasetError(f"{url!r} holds the prepared {manifest['dataset']!r}, not {name!r}")
    items = [
        BenchmarkItem(item["id"], to_url(fs, join(root, item["image"])), to_url(fs, join(root, item["label"])))
        for item in manifest["items"]
    ]
    return PreparedDataset(spec, manifest["split"], url, items, manifest["limit"])


def read_label_map(url: str, storage_options: dict[str, Any] | None = None) -> np.ndarray:
    fs, path = filesystem(url, storage_options)
    return decode_label_map(fs.cat_file(path), url)

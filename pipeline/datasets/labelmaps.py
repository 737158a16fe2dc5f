"""Label-map conversions of the paper's dataset preparation, and the files they are stored in.

Pure numpy: raw class values in, train ids out (the ignore value where a dataset says so). The
formats that read raw files live in `ade.py`, `pascal.py` and `coco.py`.
"""

from __future__ import annotations

import functools
import io
import json

import numpy as np
from PIL import Image

from .registry import DatasetError, read_data_file

IGNORE_UINT8 = 255
IGNORE_UINT16 = 65535


def map_values(values: np.ndarray, pairs: dict[int, int], missing: int, dtype: str) -> np.ndarray:
    """Each value replaced by `pairs[value]`, or by `missing` when it has no entry."""
    uniques, inverse = np.unique(values, return_inverse=True)
    mapped = np.array([pairs.get(int(value), missing) for value in uniques], dtype=dtype)
    return mapped[inverse].reshape(values.shape)


def ade150_train_ids(annotation: np.ndarray) -> np.ndarray:
    """ADEChallengeData2016: value v -> v - 1, and 0 ("other") -> 255."""
    if annotation.dtype != np.uint8:
        raise DatasetError(f"an ADE20K-150 annotation must be 8-bit, got {annotation.dtype}")
    return annotation - np.uint8(1)  # uint8 arithmetic: 0 wraps to 255, as the paper's script does


def ade_object_classes(segmentation_rgb: np.ndarray) -> np.ndarray:
    """ADE20K 2021 `*_seg.png`: the object class of each pixel, (R // 10) * 256 + G."""
    red = segmentation_rgb[..., 0].astype(np.int32)
    green = segmentation_rgb[..., 1].astype(np.int32)
    return red // 10 * 256 + green


@functools.cache
def _ade847_pairs() -> dict[int, int]:
    return {entry["ade_id"]: entry["train_id"] for entry in json.loads(read_data_file("ade847_categories.json"))}


def ade847_train_ids(object_classes: np.ndarray) -> np.ndarray:
    """ADE20K object classes -> the 847 train ids; every other class is 65535 (ignore)."""
    return map_values(object_classes, _ade847_pairs(), IGNORE_UINT16, "uint16")


@functools.cache
def _pc59_pairs() -> dict[int, int]:
    ids = sorted(json.loads(read_data_file("pc59_context_ids.json"))["context_ids_sorted"])
    # The i-th smallest id becomes train id i - 1: background (0, the smallest) falls off the end.
    return {context_id: i - 1 for i, context_id in enumerate(ids) if i > 0}


def pc59_train_ids(category_ids: np.ndarray) -> np.ndarray:
    """PASCAL-Context category ids -> the 59 train ids; 0 and ids not kept are 255."""
    return map_values(category_ids, _pc59_pairs(), IGNORE_UINT8, "uint8")


def pc459_train_ids(label_map: np.ndarray, source: str) -> np.ndarray:
    """PASCAL-Context `LabelMap` (1..459) -> `LabelMap - 1` as uint16 (459 is the ignore value)."""
    if not np.issubdtype(label_map.dtype, np.integer):
        raise DatasetError(f"{source}: LabelMap must hold integers, got {label_map.dtype}")
    if label_map.size and (label_map.min() < 1 or label_map.max() > IGNORE_UINT16):
        # The paper's script asserts LabelMap - 1 >= 0: a 0 has no train id.
        raise DatasetError(f"{source}: LabelMap values must lie in 1..65535, found {int(label_map.min())}..{int(label_map.max())}")
    return (label_map.astype(np.int64) - 1).astype(np.uint16)


def voc_train_ids(label: np.ndarray, background: int) -> np.ndarray:
    """VOC 1..20 -> 0..19, 255 stays, background 0 -> `background`; anything else -> 255."""
    pairs = {0: background, 255: IGNORE_UINT8, **{voc: voc - 1 for voc in range(1, 21)}}
    return map_values(label, pairs, IGNORE_UINT8, "uint8")


@functools.cache
def _coco_stuff_pairs() -> dict[int, int]:
    entries = json.loads(read_data_file("coco_stuff171_categories.json"))
    return {entry["stuffthingmaps_id"]: entry["train_id"] for entry in entries}


def coco_stuff_train_ids(stuffthingmap: np.ndarray) -> np.ndarray:
    """stuffthingmaps pixel values -> the 171 train ids; everything else 255."""
    return map_values(stuffthingmap, _coco_stuff_pairs(), IGNORE_UINT8, "uint8")


def encode_label_map(labels: np.ndarray) -> bytes:
    """uint8 -> PNG (mode L); uint16 -> TIFF (mode I;16), as the paper stores them."""
    buffer = io.BytesIO()
    if labels.dtype == np.uint8:
        Image.fromarray(labels).save(buffer, format="PNG")
    elif labels.dtype == np.uint16:
        Image.fromarray(labels).save(buffer, format="TIFF")
    else:
        raise ValueError(f"label maps are stored as uint8 or uint16, got {labels.dtype}")
    return buffer.getvalue()


def decode_label_map(data: bytes, source: str) -> np.ndarray:
    """A single-channel label map (PNG or TIFF) as uint8 or uint16."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            labels = np.array(image)
    except OSError as exc:
        raise DatasetError(f"{source} is not a readable label map: {exc}") from exc
    if labels.ndim != 2 or labels.dtype not in (np.uint8, np.uint16):
        raise DatasetError(f"{source} must be a single-channel uint8 or uint16 label map, got {labels.dtype} {labels.shape}")
    return labels

"""ADE20K: ADEChallengeData2016 (150 classes) and ADE20K_2021_17_01 (847 classes)."""

from __future__ import annotations

import io
import posixpath

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .labelmaps import ade150_train_ids, ade847_train_ids, ade_object_classes
from .raw import RawRoot, Sample
from .registry import DatasetError

ADE_FULL_MAX_SHORT_SIDE = 512


class Ade150:
    """ADEChallengeData2016 validation: annotation v -> v - 1, 0 -> 255; images as they are."""

    def __init__(self, raw: RawRoot) -> None:
        self.raw = raw

    def items(self) -> list[str]:
        self.raw.require_dir("images/validation", "the validation images")
        return [posixpath.basename(p)[: -len(".png")] for p in self.raw.files_under("annotations/validation", ".png")]

    def convert(self, image_id: str) -> Sample:
        labels = ade150_train_ids(self.raw.read_image_array(f"annotations/validation/{image_id}.png"))
        return Sample(image_id, self.raw.read(f"images/validation/{image_id}.jpg"), ".jpg", labels)


class AdeFull:
    """ADE20K_2021_17_01, the `_val_` images: class from `*_seg.png`, short side at most 512."""

    def __init__(self, raw: RawRoot) -> None:
        self.raw = raw

    def items(self) -> list[str]:
        # The paper's split rule: the second "_" field of the file name is "val" (ADE_val_00000001.jpg).
        images = self.raw.files_under("images", ".jpg")
        return sorted((p for p in images if posixpath.basename(p).split("_")[1:2] == ["val"]), key=posixpath.basename)

    def convert(self, relative: str) -> Sample:
        image = self.raw.read_image_array(relative)
        classes = ade_object_classes(self.raw.read_image_array(relative[: -len(".jpg")] + "_seg.png"))
        height, width = image.shape[:2]
        size = ade_full_size(height, width)
        if size is not None:
            image = resize_bilinear(image, size)
            classes = resize_nearest(classes, size)
        # Re-encoded with PIL's JPEG defaults, resized or not, as the paper's script saves them.
        buffer = io.BytesIO()
        try:
            Image.fromarray(image).save(buffer, format="JPEG")
        except OSError as exc:  # e.g. 4-channel (CMYK) pixels, which the paper's script cannot save either
            raise DatasetError(f"{self.raw.describe(relative)}: cannot store its {image.shape} pixels as JPEG: {exc}") from exc
        image_id = posixpath.basename(relative)[: -len(".jpg")]
        return Sample(image_id, buffer.getvalue(), ".jpg", ade847_train_ids(classes))


def ade_full_size(height: int, width: int, short_side: int = ADE_FULL_MAX_SHORT_SIDE) -> tuple[int, int] | None:
    """New (height, width) with the short side `short_side`, or None when it is not longer already.

    The long side is `round(long / short * short_side)`, Python's round (half to even), as the
    paper's script computes it.
    """
    if width >= height > short_side:
        return short_side, round(width / float(height) * short_side)
    if height >= width > short_side:
        return round(height / float(width) * short_side), short_side
    return None


def resize_bilinear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 (H, W[, C]) -> `size`, with OpenCV's `INTER_LINEAR` arithmetic (the paper used cv2).

    Half-pixel centres, edge pixels repeated, no antialiasing, rounded to the nearest integer.
    OpenCV's 11-bit fixed-point weights can put a pixel 1 away from this float computation.
    """
    pixels = torch.tensor(image, dtype=torch.float32)  # a copy: PIL-backed arrays are read-only
    channels_last = pixels.dim() == 3
    pixels = pixels.permute(2, 0, 1)[None] if channels_last else pixels[None, None]
    resized = F.interpolate(pixels, size=size, mode="bilinear", align_corners=False, antialias=False)
    resized = torch.floor(resized + 0.5).clamp(0, 255).to(torch.uint8)[0]
    return (resized.permute(1, 2, 0) if channels_last else resized[0]).numpy()


def resize_nearest(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W) -> `size` with OpenCV's `INTER_NEAREST`: source index floor(d / scale), no half-pixel shift."""
    height, width = labels.shape
    rows = _nearest_sources(height, size[0])
    columns = _nearest_sources(width, size[1])
    return labels[rows[:, None], columns[None, :]]


def _nearest_sources(source: int, target: int) -> np.ndarray:
    inverse_scale = 1.0 / (target / source)  # computed as OpenCV does, in double precision
    return np.minimum(np.floor(np.arange(target) * inverse_scale).astype(np.int64), source - 1)

"""PASCAL: Context 59 (Detail API JSON), Context 459 (`.mat` label maps), VOC 2012 (20 classes)."""

from __future__ import annotations

import io
import json
import posixpath
from typing import Any

import numpy as np
import scipy.io
from pycocotools import mask as mask_utils

from .labelmaps import IGNORE_UINT8, pc59_train_ids, pc459_train_ids, voc_train_ids
from .raw import RawRoot, Sample
from .registry import DatasetError, read_data_file

DETAIL_JSON = "trainval_merged.json"


class PascalContextDetail:
    """PC-59 from PASCAL in Detail's `trainval_merged.json`, images of phase `val`.

    The file's layout (the Detail API's): `images` with `image_id`, `file_name`, `height`, `width`,
    `phase`; `annos_segmentation` with `image_id`, `category_id` and a COCO-style `segmentation`
    (RLE, compressed or not, or polygons). Each image's annotations are painted in the file's order
    (a later one wins where they overlap), then the category ids become PC-59 train ids.
    """

    def __init__(self, raw: RawRoot) -> None:
        self.raw = raw
        self.images: dict[Any, dict[str, Any]] = {}
        self.annotations: dict[Any, list[dict[str, Any]]] = {}

    def items(self) -> list[Any]:
        self.raw.require_dir("JPEGImages", "the VOC2010 images")
        try:
            data = json.loads(self.raw.read(DETAIL_JSON))
            self.images = {image["image_id"]: image for image in data["images"] if image["phase"] == "val"}
            for annotation in data["annos_segmentation"]:
                if annotation["image_id"] in self.images:
                    self.annotations.setdefault(annotation["image_id"], []).append(annotation)
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise DatasetError(f"{self.raw.describe(DETAIL_JSON)} is not a PASCAL in Detail annotation file: {exc!r}") from exc
        return sorted(self.images, key=lambda key: self.images[key]["file_name"])

    def convert(self, key: Any) -> Sample:
        image = self.images[key]
        height, width = image["height"], image["width"]
        category_ids = np.zeros((height, width), dtype=np.int32)
        for annotation in self.annotations.get(key, []):
            mask = decode_segmentation(annotation["segmentation"], height, width, image["file_name"])
            category_ids[mask] = annotation["category_id"]
        stem = posixpath.splitext(image["file_name"])[0]
        return Sample(stem, self.raw.read(f"JPEGImages/{image['file_name']}"), ".jpg", pc59_train_ids(category_ids))


def decode_segmentation(segmentation: Any, height: int, width: int, source: str) -> np.ndarray:
    """A COCO-style segmentation (compressed RLE, uncompressed RLE, or polygons) -> bool (H, W)."""
    if isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), str):
        rle = segmentation
    elif isinstance(segmentation, dict):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    elif isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    else:
        raise DatasetError(f"{source}: a segmentation must be an RLE dict or a list of polygons, got {type(segmentation).__name__}")
    if list(rle["size"]) != [height, width]:
        raise DatasetError(f"{source}: a segmentation of size {rle['size']} on an image of {height}x{width}")
    return mask_utils.decode(rle).astype(bool)


class PascalContextMat:
    """PC-459 from the `trainval/<id>.mat` files (`LabelMap`), for the paper's validation ids."""

    def __init__(self, raw: RawRoot) -> None:
        self.raw = raw

    def items(self) -> list[str]:
        self.raw.require_dir("JPEGImages", "the VOC2010 images")
        self.raw.require_dir("trainval", "the PASCAL-Context .mat label maps")
        return [line.strip() for line in read_data_file("pascal_context_val_ids.txt").splitlines() if line.strip()]

    def convert(self, image_id: str) -> Sample:
        relative = f"trainval/{image_id}.mat"
        try:
            label_map = scipy.io.loadmat(io.BytesIO(self.raw.read(relative)))["LabelMap"]
        except (ValueError, KeyError, scipy.io.matlab.MatReadError) as exc:
            raise DatasetError(f"{self.raw.describe(relative)} holds no readable LabelMap: {exc!r}") from exc
        labels = pc459_train_ids(label_map, self.raw.describe(relative))
        return Sample(image_id, self.raw.read(f"JPEGImages/{image_id}.jpg"), ".jpg", labels)


class Voc:
    """VOC 2012 `SegmentationClassAug`, ids of `ImageSets/Segmentation/val.txt`.

    Background becomes `background` (255 for VOC-20, 20 for VOC-20b); an image whose label map is
    then all ignore is skipped, as the paper's script does.
    """

    def __init__(self, raw: RawRoot, background: int) -> None:
        self.raw = raw
        self.background = background

    def items(self) -> list[str]:
        self.raw.require_dir("JPEGImages", "the VOC2012 images")
        self.raw.require_dir("SegmentationClassAug", "the augmented VOC label maps")
        return self.raw.read("ImageSets/Segmentation/val.txt").decode("utf-8").split()

    def convert(self, image_id: str) -> Sample | None:
        labels = voc_train_ids(self.raw.read_image_array(f"SegmentationClassAug/{image_id}.png"), self.background)
        if (labels == IGNORE_UINT8).all():
            return None
        return Sample(image_id, self.raw.read(f"JPEGImages/{image_id}.jpg"), ".jpg", labels)

"""COCO-Stuff-171 from `stuffthingmaps_trainval2017` (the paper's training set)."""

from __future__ import annotations

import posixpath

from .labelmaps import coco_stuff_train_ids
from .raw import RawRoot, Sample

STUFFTHINGMAPS = "stuffthingmaps_trainval2017"


class CocoStuff:
    """Pixel value -> train id with the 171 categories; everything else 255. Images as they are."""

    def __init__(self, raw: RawRoot, split: str) -> None:
        self.raw = raw
        self.split = split

    def items(self) -> list[str]:
        self.raw.require_dir(self.split, f"the COCO {self.split} images")
        maps = self.raw.files_under(f"{STUFFTHINGMAPS}/{self.split}", ".png")
        return [posixpath.basename(p)[: -len(".png")] for p in maps]

    def convert(self, image_id: str) -> Sample:
        labels = coco_stuff_train_ids(self.raw.read_image_array(f"{STUFFTHINGMAPS}/{self.split}/{image_id}.png"))
        return Sample(image_id, self.raw.read(f"{self.split}/{image_id}.jpg"), ".jpg", labels)

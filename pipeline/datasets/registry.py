"""The benchmark datasets of the SED paper, as data: classes, label convention, claimed mIoU.

A dataset is found by name; an unknown name is an error listing the known ones. `raw_format`
names the converter of the official download (see `prepare.py`); the registry itself knows no
file format.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import sed_model
from schemas import PromptGroup

from ..taxonomy import Taxonomy

EXACT = None  # top-k of the paper's main rows: no early rejection
FAST = 8  # top-k of the paper's "fast" rows


class DatasetError(ValueError):
    """An unknown dataset, or raw or prepared files that do not match what a dataset needs."""


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    title: str  # as the paper's tables name it
    class_list: str  # file under data/class_lists/: the prompts, in train-id order
    ignore_label: int
    label_dtype: str  # "uint8" (PNG label maps) or "uint16" (TIFF)
    raw_format: str  # which converter of prepare.py reads the official download
    raw_layout: str  # what RAW_ROOT must hold, for the README and error messages
    splits: tuple[str, ...] = ("val",)  # the first is the default (the evaluation split)
    training_split: str | None = None  # the split to train on, if the benchmark has one
    # VOC-20b: the prompts from this index on form one class, "background" (a prompt group).
    background_prompts_from: int | None = None
    # mIoU claimed by the paper (Table 1), keyed by (model preset, top-k).
    claimed_miou: dict[tuple[str, int | None], float] = field(default_factory=dict)

    @property
    def label_extension(self) -> str:
        return ".png" if self.label_dtype == "uint8" else ".tif"

    def prompts(self) -> list[str]:
        """The class names the model is prompted with (verbatim)."""
        return json.loads(read_data_file("class_lists", self.class_list))

    def taxonomy(self) -> Taxonomy:
        """The benchmark's taxonomy with the paper's templates: one class per prompt, except VOC-20b,
        whose 39 PASCAL-Context prompts form the class "background" (its ground truth's class 20)."""
        prompts = self.prompts()
        classes: list[str | PromptGroup] = list(prompts)
        if self.background_prompts_from is not None:
            start = self.background_prompts_from
            classes = [*prompts[:start], PromptGroup(name="background", prompts=prompts[start:])]
        return Taxonomy.build(classes, [], tuple(sed_model.IMAGENET_TEMPLATES))

    def claimed(self, model: str | dict[str, Any], top_k: int | None) -> float | None:
        return self.claimed_miou.get((model, top_k)) if isinstance(model, str) else None


def _claims(base: float, base_fast: float, large: float, large_fast: float) -> dict[tuple[str, int | None], float]:
    return {
        ("convnext_b", EXACT): base,
        ("convnext_b", FAST): base_fast,
        ("convnext_l", EXACT): large,
        ("convnext_l", FAST): large_fast,
    }


_VOC_LAYOUT = "VOCdevkit/VOC2012 with JPEGImages/, ImageSets/Segmentation/val.txt and SegmentationClassAug/"

DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            "ade20k-150", "A-150", "ade150.json", 255, "uint8", "ade20k_150",
            "ADEChallengeData2016 with images/validation/ and annotations/validation/",
            claimed_miou=_claims(31.8, 31.6, 35.3, 35.2),
        ),
        DatasetSpec(
            "ade20k-847", "A-847", "ade847.json", 65535, "uint16", "ade20k_full",
            "ADE20K_2021_17_01 with images/ (the *_val_*.jpg images and their *_seg.png)",
            claimed_miou=_claims(11.2, 11.4, 13.7, 13.9),
        ),
        DatasetSpec(
            "pascal-context-59", "PC-59", "pc59.json", 255, "uint8", "pascal_context_detail",
            "VOCdevkit/VOC2010 with JPEGImages/ and trainval_merged.json (PASCAL in Detail)",
            claimed_miou=_claims(57.7, 57.3, 60.9, 60.6),
        ),
        DatasetSpec(
            "pascal-context-459", "PC-459", "pc459.json", 459, "uint16", "pascal_context_mat",
            "VOCdevkit/VOC2010 with JPEGImages/ and trainval/*.mat (PASCAL-Context, 459 classes)",
            claimed_miou=_claims(18.6, 18.6, 22.1, 22.6),
        ),
        DatasetSpec(
            "voc20", "VOC-20", "voc20.json", 255, "uint8", "voc_without_background", _VOC_LAYOUT,
            claimed_miou=_claims(94.4, 94.4, 96.1, 96.1),
        ),
        DatasetSpec(
            "voc20b", "VOC-20b", "voc20b.json", 255, "uint8", "voc_with_background", _VOC_LAYOUT,
            background_prompts_from=20,
        ),
        DatasetSpec(
            "coco-stuff-171", "COCO-Stuff-171", "coco.json", 255, "uint8", "coco_stuff",
            "the COCO folder with val2017/ (or train2017/) and stuffthingmaps_trainval2017/val2017/ (or train2017/)",
            splits=("val2017", "train2017"),
            training_split="train2017",
        ),
    )
}


def get_dataset(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except KeyError:
        raise DatasetError(f"unknown dataset {name!r}: known datasets are {sorted(DATASETS)}") from None


def read_data_file(*parts: str) -> str:
    """A file shipped under data/ (mapping files and class lists; see data/README.md)."""
    return resources.files("pipeline.datasets").joinpath("data", *parts).read_text(encoding="utf-8")

"""Labelled images for training and validation: where they come from, their batches, their classes.

    a folder (`data.url` with images/ + labels/, any fsspec URL) -> items sorted by name, ignore 255
    a benchmark prepared by `sed-label prepare NAME` (`data.dataset`) -> its items and ignore id
    -> `batch_indices(iteration)`: epochs of seeded permutations -> `load_batch`: read, augment

The batches are a function of (seed, iteration) alone, so a resumed run sees the same data.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

import sed_model
from schemas import TrainDataSpec, TrainSpec

from ..datasets import BenchmarkItem, DatasetError, DatasetSpec, read_label_map, read_prepared
from ..decode import DecodeError, decode_image
from ..retry import is_transient, with_retries
from ..sources import IMAGE_EXTENSIONS
from ..storage import filesystem, to_url
from ..taxonomy import Taxonomy, load_taxonomy
from .augment import AugmentSettings, augment


class TrainDataError(ValueError):
    """Training or validation data that cannot be used; the message names the field or the file."""


@dataclass(frozen=True)
class LabelledData:
    items: list[BenchmarkItem]
    ignore_label: int
    dataset: DatasetSpec | None  # the prepared benchmark the items come from, if any
    storage_options: dict[str, Any]


def labelled_data(data: TrainDataSpec, field: str = "data") -> LabelledData:
    """The items `data` names (the first `data.limit` of them); `field` names the spec section in errors."""
    try:
        if data.dataset is not None:
            prepared = read_prepared(data.dataset, data.url, data.storage_options)
            expected = _expected_split(prepared.spec, data, field)
            if prepared.split != expected:
                raise TrainDataError(
                    f"{field}.url: {data.url} holds {data.dataset}'s {prepared.split} split, not {expected}"
                    + ("" if data.split else f" (name it in {field}.split to use it deliberately)")
                )
            items, ignore_label, dataset = prepared.items, prepared.spec.ignore_label, prepared.spec
        else:
            items, ignore_label, dataset = _folder_items(data, field), data.ignore_label, None
    except DatasetError as exc:
        raise TrainDataError(f"{field}: {exc}") from exc
    except OSError as exc:  # permissions, credentials, an unreachable endpoint
        raise TrainDataError(f"{field}.url: cannot list {data.url}: {type(exc).__name__}: {exc}") from exc
    if not items:
        raise TrainDataError(f"{field}.url: no labelled images in {data.url}")
    return LabelledData(items[: data.limit], ignore_label, dataset, data.storage_options)


def _expected_split(dataset: DatasetSpec, data: TrainDataSpec, field: str) -> str:
    """The split `field` must hold: the one it names, else for validation the benchmark's
    evaluation split (its default) and for training data its training split, so that a run never
    trains on a benchmark's evaluation images by mistake."""
    if data.split is not None:
        if data.split not in dataset.splits:
            raise TrainDataError(f"{field}.split: {dataset.name} has the splits {list(dataset.splits)}, not {data.split!r}")
        return data.split
    if field == "validation":
        return dataset.splits[0]
    if dataset.training_split is None:
        raise TrainDataError(
            f"{field}.split: {dataset.name} ({data.url}) has only evaluation splits {list(dataset.splits)}; "
            "name the one to train on to fine-tune on it deliberately"
        )
    return dataset.training_split


def _folder_items(data: TrainDataSpec, field: str) -> list[BenchmarkItem]:
    fs, root = filesystem(data.url, data.storage_options)
    images_root = posixpath.join(root.rstrip("/"), data.images_dir)
    labels_root = posixpath.join(root.rstrip("/"), data.labels_dir)
    if not fs.isdir(images_root):
        raise TrainDataError(f"{field}.url: {to_url(fs, images_root)} is not a folder of images")
    labels = {posixpath.splitext(posixpath.basename(p))[0]: p for p in fs.find(labels_root) if p.lower().endswith(".png")}
    items = []
    for path in sorted(fs.find(images_root)):
        stem, extension = posixpath.splitext(posixpath.basename(path))
        if extension.lower() not in IMAGE_EXTENSIONS:
            continue
        if stem not in labels:
            raise TrainDataError(f"{field}: image {to_url(fs, path)} has no label map {data.labels_dir}/{stem}.png")
        items.append(BenchmarkItem(stem, to_url(fs, path), to_url(fs, labels[stem])))
    return items


def training_taxonomy(spec: TrainSpec, data: LabelledData) -> Taxonomy:
    """The spec's taxonomy, or the prepared benchmark's classes with the paper's templates."""
    if spec.taxonomy is None:
        if data.dataset is None:
            raise TrainDataError("taxonomy is required unless data.dataset names a prepared benchmark")
        return Taxonomy(tuple(data.dataset.prompts()), tuple(sed_model.IMAGENET_TEMPLATES))
    taxonomy = load_taxonomy(spec.taxonomy)
    check_class_count(taxonomy, data, "data")
    return taxonomy


def check_class_count(taxonomy: Taxonomy, data: LabelledData, field: str) -> None:
    """A benchmark's label ids index its own class list: the taxonomy must have as many classes."""
    if data.dataset is not None and len(taxonomy.classes) != len(data.dataset.prompts()):
        raise TrainDataError(
            f"taxonomy has {len(taxonomy.classes)} classes, but {field}.dataset {data.dataset.name} "
            f"labels {len(data.dataset.prompts())}; its label ids would name other classes"
        )


@dataclass(frozen=True)
class TrainingInputs:
    data: LabelledData
    taxonomy: Taxonomy
    validation: LabelledData | None


def training_inputs(spec: TrainSpec) -> TrainingInputs:
    """What a run reads before it starts, checked: the training images, the taxonomy, the validation images."""
    data = labelled_data(spec.data)
    taxonomy = training_taxonomy(spec, data)
    validation = None
    if spec.validation is not None:
        validation = labelled_data(spec.validation, "validation")
        check_class_count(taxonomy, validation, "validation")
        check_validation_labels(taxonomy, validation)
    return TrainingInputs(data, taxonomy, validation)


def validation_taxonomy(taxonomy: Taxonomy, data: LabelledData) -> Taxonomy:
    """What validation scores in: the training taxonomy, or the benchmark's where its classes group
    those prompts (VOC-20b: the 39 PASCAL-Context prompts are its class "background")."""
    if data.dataset is not None:
        benchmark = data.dataset.taxonomy()
        if benchmark.prompts == taxonomy.prompts:
            return benchmark
    return taxonomy


def check_validation_labels(taxonomy: Taxonomy, data: LabelledData) -> None:
    """Read every validation pair once before training: sizes match, ids are classes or the ignore id.

    Each evaluation reads them all anyway; a bad one found now costs no training (found at the first
    evaluation, it would stop the run there).
    """
    count = len(validation_taxonomy(taxonomy, data).classes)
    for item in data.items:
        _, truth = read_pair(item, data.storage_options)
        bad = np.unique(truth[(truth >= count) & (truth != data.ignore_label)])
        if bad.size:
            raise TrainDataError(
                f"validation label map {item.label_url} holds ids {bad[:10].tolist()} outside 0..{count - 1} "
                f"and the ignore id {data.ignore_label}"
            )


def batch_indices(iteration: int, batch_size: int, num_items: int, seed: int) -> list[int]:
    """The dataset indices of iteration `iteration`'s batch: epochs of seeded permutations, in order."""
    indices = []
    for position in range(iteration * batch_size, (iteration + 1) * batch_size):
        epoch, offset = divmod(position, num_items)
        indices.append(int(np.random.default_rng([seed, epoch]).permutation(num_items)[offset]))
    return indices


def read_pair(item: BenchmarkItem, storage_options: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The item's RGB image `(H, W, 3)` uint8 and its label map `(H, W)` uint8/uint16, checked alike in size.

    The image is decoded as every job decodes it (`decode.decode_image`: EXIF orientation applied).
    Storage faults are retried (`with_retries`); one that persists is raised as it is, so the run
    starts new workers, while what retrying cannot fix (a missing or undecodable file, access
    denied) is a `TrainDataError`, which stops the run at once.
    """
    fs, path = filesystem(item.image_url, storage_options)
    try:
        image = decode_image(with_retries(lambda: fs.cat_file(path), f"reading {item.image_url}"))
    except (OSError, DecodeError) as exc:
        if is_transient(exc):
            raise
        raise TrainDataError(f"cannot read image {item.image_url}: {type(exc).__name__}: {exc}") from exc
    try:
        label = with_retries(lambda: read_label_map(item.label_url, storage_options), f"reading {item.label_url}")
    except (OSError, DatasetError) as exc:
        if is_transient(exc):
            raise
        raise TrainDataError(f"cannot read label map {item.label_url}: {exc}") from exc
    if label.shape != image.shape[:2]:
        raise TrainDataError(f"label map {item.label_url} is {label.shape[::-1]}, its image {image.shape[1::-1]} (width, height)")
    return image, label


def load_batch(spec: TrainSpec, data: LabelledData, iteration: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This worker's share of iteration `iteration`'s batch: uint8 images `(b, 3, S, S)`, labels `(b, S, S)`."""
    recipe = spec.recipe
    settings = AugmentSettings(
        recipe.short_edge, recipe.max_long_edge, recipe.crop, recipe.colour, recipe.flip, ignore_label=data.ignore_label
    )
    indices = batch_indices(iteration, recipe.batch_size, len(data.items), recipe.seed)
    images, labels = [], []
    for slot in range(rank, recipe.batch_size, world):
        image, label = read_pair(data.items[indices[slot]], data.storage_options)
        # Each image's augmentation depends on (seed, iteration, slot) only: resumable, worker-independent.
        image, label = augment(image, label, np.random.default_rng([recipe.seed, iteration, slot]), settings)
        images.append(torch.from_numpy(image).permute(2, 0, 1))
        labels.append(torch.from_numpy(label.astype(np.int64)))
    size = max(i.shape[-2] for i in images), max(i.shape[-1] for i in images)
    if any(i.shape[-2:] != size for i in images):
        raise TrainDataError(f"augmented images differ in size ({[tuple(i.shape[-2:]) for i in images]}); set recipe.crop")
    return torch.stack(images), torch.stack(labels)

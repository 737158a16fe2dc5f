"""Training data: folders and prepared benchmarks, their taxonomy and ignore id, and the batches."""

from __future__ import annotations

import io
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image

import sed_model
from pipeline.datasets import get_dataset
from pipeline.datasets.prepared import PreparedWriter
from pipeline.datasets.raw import Sample
from pipeline.taxonomy import Taxonomy
from pipeline.train.data import (
    LabelledData,
    TrainDataError,
    batch_indices,
    labelled_data,
    load_batch,
    read_pair,
    training_inputs,
    training_taxonomy,
    validation_taxonomy,
)
from schemas import TaxonomySpec, TrainSpec, ValidationSpec


def write_folder(root: Path, count: int = 2, size: int = 32) -> None:
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir(parents=True)
    for i in range(count):
        Image.fromarray(np.full((size, size, 3), 40 * i, np.uint8)).save(root / "images" / f"img{i}.jpg")
        Image.fromarray(np.full((size, size), i, np.uint8)).save(root / "labels" / f"img{i}.png")


def write_prepared_pc459(root: Path) -> None:
    """A prepared PASCAL-Context-459 folder (uint16 TIFF label maps, ignore id 459), as `prepare` writes it."""
    write_prepared(root, "pascal-context-459", "val", first_id=300)


def write_prepared(root: Path, name: str, split: str, first_id: int = 0) -> None:
    spec = get_dataset(name)
    writer = PreparedWriter(spec, split, str(root))
    for i, (width, height) in enumerate([(48, 40), (40, 48)]):
        buffer = io.BytesIO()
        Image.fromarray(np.full((height, width, 3), 100, np.uint8)).save(buffer, format="JPEG")
        labels = np.full((height, width), first_id + i, spec.label_dtype)
        labels[0, 0] = spec.ignore_label
        writer.add(Sample(f"2008_00000{i}", buffer.getvalue(), ".jpg", labels))
    writer.finish("raw", [], None)


def spec_for(data: dict, taxonomy: list[str] | None = None, **recipe) -> TrainSpec:
    return TrainSpec.model_validate(
        {
            "data": data,
            "taxonomy": {"classes": taxonomy} if taxonomy else None,
            "model": {"clip_model": "convnext_b", "weights": None},
            "recipe": {"batch_size": 2, **recipe},
            "output": {"url": "memory://unused"},
        }
    )


def test_a_folder_gives_sorted_pairs_with_ignore_255_and_its_limit(tmp_path):
    write_folder(tmp_path / "data", count=3)
    data = labelled_data(spec_for({"url": str(tmp_path / "data")}, ["a", "b", "c"]).data)
    assert [item.image_id for item in data.items] == ["img0", "img1", "img2"] and data.ignore_label == 255
    assert data.dataset is None
    limited = labelled_data(spec_for({"url": str(tmp_path / "data"), "limit": 2}, ["a"]).data)
    assert len(limited.items) == 2


def test_images_without_labels_are_refused(tmp_path):
    write_folder(tmp_path / "data")
    (tmp_path / "data" / "labels" / "img1.png").unlink()
    with pytest.raises(TrainDataError, match="img1.jpg has no label map labels/img1.png"):
        labelled_data(spec_for({"url": str(tmp_path / "data")}, ["a"]).data)


def test_a_prepared_benchmark_brings_its_classes_ignore_id_and_16_bit_labels(tmp_path):
    write_prepared_pc459(tmp_path / "pc459")
    spec = spec_for({"url": str(tmp_path / "pc459"), "dataset": "pascal-context-459", "split": "val"}, crop=64, short_edge=40, colour=False)
    data = labelled_data(spec.data)
    assert [item.image_id for item in data.items] == ["2008_000000", "2008_000001"] and data.ignore_label == 459
    taxonomy = training_taxonomy(spec, data)
    assert len(taxonomy.classes) == 459 and taxonomy.templates == tuple(sed_model.IMAGENET_TEMPLATES)

    images, labels = load_batch(spec, data, iteration=0, rank=0, world=1)
    assert images.shape == (2, 3, 64, 64) and labels.shape == (2, 64, 64)
    for image, label in zip(images, labels):
        ids = set(label.unique().tolist())
        assert ids <= {300, 301, 459} and ids & {300, 301}  # 16-bit ids survive augmentation
        assert (label[-1] == 459).all() and (image[:, -1] == 128).all()  # padding: the dataset's ignore id


def test_a_taxonomy_must_match_the_benchmarks_class_count(tmp_path):
    write_prepared_pc459(tmp_path / "pc459")
    spec = spec_for({"url": str(tmp_path / "pc459"), "dataset": "pascal-context-459", "split": "val"}, ["sky", "tree"])
    with pytest.raises(TrainDataError, match="taxonomy has 2 classes, but data.dataset pascal-context-459 labels 459"):
        training_taxonomy(spec, labelled_data(spec.data))


def test_a_grouped_taxonomy_names_the_label_ids_by_its_classes(tmp_path):
    write_folder(tmp_path / "data")
    spec = spec_for({"url": str(tmp_path / "data")}, ["sky", "tree"])
    grouped = TaxonomySpec(classes=["sky", {"name": "green", "prompts": ["tree", "grass"]}], distractors=["wall"])
    taxonomy = training_taxonomy(spec.model_copy(update={"taxonomy": grouped}), labelled_data(spec.data))
    assert taxonomy.classes == ("sky", "green") and taxonomy.prompt_class == (0, 1, 1, -1)


def test_validation_on_voc20b_scores_its_background_prompts_as_background():
    voc20b = get_dataset("voc20b")
    flat = Taxonomy(tuple(voc20b.prompts()), tuple(sed_model.IMAGENET_TEMPLATES))
    data = LabelledData(items=[], ignore_label=255, storage_options={}, dataset=voc20b)
    assert validation_taxonomy(flat, data) == voc20b.taxonomy()
    assert validation_taxonomy(flat, LabelledData(items=[], ignore_label=255, storage_options={}, dataset=None)) is flat


def test_an_unprepared_folder_says_how_to_prepare_it(tmp_path):
    with pytest.raises(TrainDataError, match="data: .*sed-label prepare coco-stuff-171"):
        labelled_data(spec_for({"url": str(tmp_path), "dataset": "coco-stuff-171"}).data)


def test_training_on_an_evaluation_split_must_be_asked_for(tmp_path):
    """Training data defaults to the benchmark's training split, validation to its evaluation split."""
    write_prepared(tmp_path / "val2017", "coco-stuff-171", "val2017")
    write_prepared(tmp_path / "train2017", "coco-stuff-171", "train2017")
    coco = {"dataset": "coco-stuff-171"}
    assert len(labelled_data(spec_for({"url": str(tmp_path / "train2017"), **coco}).data).items) == 2
    with pytest.raises(TrainDataError, match=r"data.url: .*val2017 holds coco-stuff-171's val2017 split, not train2017 \(name it in data.split"):
        labelled_data(spec_for({"url": str(tmp_path / "val2017"), **coco}).data)
    assert labelled_data(spec_for({"url": str(tmp_path / "val2017"), "split": "val2017", **coco}).data).items

    assert labelled_data(ValidationSpec(url=str(tmp_path / "val2017"), **coco), "validation").items
    with pytest.raises(TrainDataError, match="validation.url: .* holds coco-stuff-171's train2017 split, not val2017"):
        labelled_data(ValidationSpec(url=str(tmp_path / "train2017"), **coco), "validation")

    write_prepared_pc459(tmp_path / "pc459")
    with pytest.raises(TrainDataError, match=r"data.split: pascal-context-459 \(.*pc459\) has only evaluation splits \['val'\]"):
        labelled_data(spec_for({"url": str(tmp_path / "pc459"), "dataset": "pascal-context-459"}).data)
    with pytest.raises(TrainDataError, match=r"data.split: coco-stuff-171 has the splits \['val2017', 'train2017'\], not 'val'"):
        labelled_data(spec_for({"url": str(tmp_path / "val2017"), "split": "val", **coco}).data)
    with pytest.raises(ValueError, match="split applies to prepared datasets"):
        spec_for({"url": str(tmp_path / "data"), "split": "val"})


def test_batches_are_a_function_of_seed_and_iteration():
    first = [batch_indices(i, 4, 10, seed=3) for i in range(5)]
    assert first == [batch_indices(i, 4, 10, seed=3) for i in range(5)]
    flat = [index for batch in first for index in batch]
    assert sorted(flat[:10]) == list(range(10))  # each epoch is a permutation
    assert first != [batch_indices(i, 4, 10, seed=4) for i in range(5)]


def test_validation_labels_are_checked_before_training(tmp_path):
    write_folder(tmp_path / "data")
    write_folder(tmp_path / "val", count=3)
    Image.fromarray(np.full((32, 32), 7, np.uint8)).save(tmp_path / "val" / "labels" / "img2.png")
    spec = spec_for({"url": str(tmp_path / "data")}, ["a", "b", "c"]).model_copy(
        update={"validation": ValidationSpec(url=str(tmp_path / "val"))}
    )
    with pytest.raises(TrainDataError, match=r"validation label map .*img2.png holds ids \[7\] outside 0..2 and the ignore id 255"):
        training_inputs(spec)
    Image.fromarray(np.full((32, 32), 255, np.uint8)).save(tmp_path / "val" / "labels" / "img2.png")
    inputs = training_inputs(spec)
    assert len(inputs.validation.items) == 3 and inputs.taxonomy.classes == ("a", "b", "c")


def test_a_folders_ignore_id_pads_the_labels(tmp_path):
    write_folder(tmp_path / "data", count=1, size=40)
    spec = spec_for({"url": str(tmp_path / "data"), "ignore_label": 7}, ["a"], batch_size=1, crop=64, short_edge=40, colour=False)
    data = labelled_data(spec.data)
    assert data.ignore_label == 7
    _, labels = load_batch(spec, data, iteration=0, rank=0, world=1)
    assert (labels[0, 40:] == 7).all() and (labels[0, :40, :40] == 0).all()


class FlakyStorage:
    """A file system whose reads fail with a connection reset `failures` times, then succeed."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.real = fsspec.filesystem("file")

    def cat_file(self, path: str) -> bytes:
        if self.failures:
            self.failures -= 1
            raise ConnectionResetError("connection reset by peer")
        return self.real.cat_file(path)


def test_storage_faults_are_retried_and_only_bad_data_is_a_data_error(tmp_path, monkeypatch):
    """A fault that passes is retried; one that persists is raised as it is (the run starts new
    workers); a missing or undecodable file is a TrainDataError (the run stops at once)."""
    import pipeline.retry
    import pipeline.train.data

    write_folder(tmp_path / "data", count=1)
    item = labelled_data(spec_for({"url": str(tmp_path / "data")}, ["a"]).data).items[0]
    monkeypatch.setattr(pipeline.retry, "FIRST_DELAY_SECONDS", 0.01)
    monkeypatch.setattr(pipeline.retry, "STORAGE_RETRY_SECONDS", 1.0)
    storage = FlakyStorage(failures=2)
    monkeypatch.setattr(pipeline.train.data, "filesystem", lambda url, options: (storage, url))
    image, _ = read_pair(item, {})
    assert image.shape == (32, 32, 3) and storage.failures == 0

    storage.failures = 10**6
    with pytest.raises(ConnectionResetError):
        read_pair(item, {})
    monkeypatch.undo()

    (tmp_path / "data" / "images" / "img0.jpg").write_bytes(b"not a JPEG")
    with pytest.raises(TrainDataError, match="cannot read image .*img0.jpg: DecodeError: not an image"):
        read_pair(item, {})
    (tmp_path / "data" / "images" / "img0.jpg").unlink()
    with pytest.raises(TrainDataError, match="cannot read image .*img0.jpg: FileNotFoundError"):
        read_pair(item, {})

"""pipeline.encode, pipeline.writers and pipeline.commit: masks -> RLE/PNG -> committed shard files.

The model step's output is hand-made here (the columns SEDInference.__call__ returns), so no model,
no Ray: label maps -> encode_labels -> ShardWriter -> Parquet + COCO + PNG + commit marker.
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from pipeline.label.commit import REDACTED, JobOutput, job_fingerprint, redact
from pipeline.label.encode import WORK_COLUMNS, encode_labels, encode_mask, encode_png, safe_name
from pipeline.infer import UNLABELED
from pipeline.label.run import _merges_coco, merge_coco
from pipeline.label.coco import coco_images_and_annotations
from pipeline.label.writers import ShardWriter
from pipeline.storage import StorageError
from schemas import LABELS_SCHEMA, LABELS_SCHEMA_VERSION, STATUS_ERROR, STATUS_OK, JobSpec, read_labels_parquet, read_labels_table
from schemas.labels import VERSION_4_COLUMNS

CLASSES = ["sky", "tree", "road"]
MARGIN_COLUMNS = ("mean_margin", "low_margin_share")

# pycocotools' own decode() trips a NumPy 2 deprecation inside the library; not ours to test.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")


def decode_rle(counts: str, height: int, width: int) -> np.ndarray:
    return mask_utils.decode({"size": [height, width], "counts": counts.encode()})


def read_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


# encode_mask -------------------------------------------------------------------------------------------------


def test_encode_mask_round_trips_with_area_and_bbox():
    mask = np.zeros((7, 12), bool)  # non-square, so a transposed RLE would not round-trip
    mask[2:5, 3:10] = True
    mask[6, 0] = True
    encoded = encode_mask(mask)
    assert isinstance(encoded["rle_counts"], str)
    np.testing.assert_array_equal(decode_rle(encoded["rle_counts"], 7, 12), mask.astype(np.uint8))
    assert encoded["area"] == 22
    assert encoded["bbox"] == [0.0, 2.0, 10.0, 5.0]  # [x, y, w, h] of the union


def test_encode_mask_of_random_masks_round_trips():
    rng = np.random.default_rng(1)
    for shape in [(1, 1), (5, 3), (16, 33)]:
        mask = rng.random(shape) < 0.4
        encoded = encode_mask(mask)
        np.testing.assert_array_equal(decode_rle(encoded["rle_counts"], *shape), mask)
        assert encoded["area"] == int(mask.sum())


def test_encode_mask_empty():
    encoded = encode_mask(np.zeros((4, 6), bool))
    assert encoded["area"] == 0
    assert encoded["bbox"] == [0.0, 0.0, 0.0, 0.0]
    assert not decode_rle(encoded["rle_counts"], 4, 6).any()


# encode_png --------------------------------------------------------------------------------------------------


def test_encode_png_uint8_with_255_for_unlabeled():
    label_map = np.array([[0, 1, 2], [UNLABELED, 9, 0]], np.uint16)
    image = Image.open(io.BytesIO(encode_png(label_map, num_classes=10)))
    assert image.mode == "L"
    values = np.asarray(image)
    assert values.dtype == np.uint8
    np.testing.assert_array_equal(values, [[0, 1, 2], [255, 9, 0]])


def test_encode_png_uint8_up_to_254_classes():
    label_map = np.array([[253, UNLABELED]], np.uint16)
    values = read_png(encode_png(label_map, num_classes=254))
    assert values.dtype == np.uint8
    np.testing.assert_array_equal(values, [[253, 255]])


def test_encode_png_uint16_with_65535_for_unlabeled_beyond_254_classes():
    label_map = np.array([[0, 254, 299], [UNLABELED, 255, 1]], np.uint16)
    values = read_png(encode_png(label_map, num_classes=300))
    assert values.dtype == np.uint16
    np.testing.assert_array_equal(values, [[0, 254, 299], [65535, 255, 1]])


# safe_name ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "image_id",
    [
        "../../etc/passwd",
        "/abs/x.jpg",
        "a b/ünïcode 名前.png",
        "..",
        ".",
        "dir/..",
        "....png",
        "C:\\Windows\\..\\x.png",
        "名前.png",
        "x" * 500 + ".jpg",
        "",
    ],
)
def test_safe_name_is_one_harmless_relative_component(image_id):
    name = safe_name(7, image_id)
    assert "/" not in name and "\\" not in name
    assert name not in ("", ".", "..") and not name.startswith(".")
    assert not os.path.isabs(name)
    assert name.isascii()
    assert len(name) <= 9 + 1 + 80  # index, '_', capped stem
    assert name.startswith("000000007")


def test_safe_name_keeps_a_readable_stem():
    assert safe_name(3, "photos/2024/IMG 0001.JPG") == "000000003_IMG_0001"


def test_safe_name_caps_long_names():
    assert len(safe_name(1, "y" * 500 + ".png")) == 9 + 1 + 80
    assert len(safe_name(1, "y" * 500 + ".png", max_length=20)) == 9 + 1 + 20


def test_safe_name_same_basename_different_images_get_different_names():
    assert safe_name(1, "a/img.png") != safe_name(2, "b/img.png")
    # Even names that sanitise to the same stem stay distinct through the index.
    assert safe_name(1, "ünï.png") != safe_name(2, "äöü.png")


# coco_images_and_annotations --------------------------------------------------------------------------------


def test_coco_skips_error_rows_and_offsets_category_ids():
    mask = np.zeros((3, 4), bool)
    mask[1, 1:3] = True
    label = {"class_id": 0, "mean_prob": 0.5, "max_prob": 0.9, **encode_mask(mask)}
    rows = [
        {"image_index": 3, "image_id": "a.png", "status": STATUS_OK, "width": 4, "height": 3,
         "labels": [label, {**label, "class_id": 2}]},
        {"image_index": 4, "image_id": "b.png", "status": STATUS_ERROR, "width": None, "height": None, "labels": None},
        {"image_index": 5, "image_id": "c.png", "status": STATUS_OK, "width": 4, "height": 3, "labels": [label]},
    ]
    images, annotations = coco_images_and_annotations(rows, num_classes=3)
    assert [i["id"] for i in images] == [3, 5]
    assert images[0] == {"id": 3, "file_name": "a.png", "width": 4, "height": 3}
    assert [a["image_id"] for a in annotations] == [3, 3, 5]
    assert [a["category_id"] for a in annotations] == [1, 3, 1]
    assert len({a["id"] for a in annotations}) == 3 and all(a["id"] >= 1 for a in annotations)  # COCO ids > 0
    assert annotations[0]["segmentation"] == {"size": [3, 4], "counts": label["rle_counts"]}
    assert annotations[0]["area"] == 2 and annotations[0]["bbox"] == [1.0, 1.0, 2.0, 1.0]


# ShardWriter + JobOutput -------------------------------------------------------------------------------------


def model_output(shard: str = "000003") -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Two rows as SEDInference.__call__ returns them: image 7 labelled, image 6 an error row.

    Rows are deliberately out of image_index order: writers must sort them.
    """
    label_map = np.full((5, 8), 2, np.uint16)  # H=5, W=8
    label_map[:2, :3] = 0
    label_map[4, 7] = UNLABELED

    def objects(*values):
        array = np.empty(len(values), dtype=object)
        array[:] = values
        return array

    batch = {
        "image_index": np.array([7, 6], np.int64),
        "image_id": objects("dir/b.png", "dir/a.png"),
        "shard_id": objects(shard, shard),
        "source": objects("/data/dir/b.png", "/data/dir/a.png"),
        "status": objects(STATUS_OK, STATUS_ERROR),
        "error": objects("", "not an image: no known image format matches these bytes"),
        "width": np.array([8, 0], np.int32),
        "height": np.array([5, 0], np.int32),
        "label_map": objects(label_map, np.zeros((1, 1), np.uint16)),
        "class_ids": objects(np.array([0, 2], np.int32), np.zeros(0, np.int32)),
        "mean_probs": objects(np.array([0.6, 0.8], np.float32), np.zeros(0, np.float32)),
        "max_probs": objects(np.array([0.7, 0.95], np.float32), np.zeros(0, np.float32)),
        "kept_classes": objects(np.array([0, 1, 2], np.int32), np.zeros(0, np.int32)),
        "unlabeled_area": np.array([1, 0], np.int64),
        "distractor_area": np.array([2, 0], np.int64),
        # Class 0 is a group whose prompt "tree" won most of its pixels; class 2 is one prompt.
        "top_prompts": objects('["tree", null]', "[]"),
        "mean_margin": np.array([0.25, 0.0], np.float32),
        "low_margin_share": np.array([0.125, 0.0], np.float32),
        "margin_map": objects(np.arange(40, dtype=np.uint8).reshape(5, 8) * 6, None),
    }
    return batch, label_map


def test_encode_labels_rows_and_their_png_written_by_the_encode_task(tmp_path):
    batch, label_map = model_output()
    table = encode_labels(batch, len(CLASSES), "tax", "ckpt", output={"url": str(tmp_path), "storage_options": {}}, formats=("parquet", "png"))
    rows = table.to_pylist()
    ok, error = rows
    assert [label["class_id"] for label in ok["labels"]] == [0, 2]
    assert [label["area"] for label in ok["labels"]] == [6, 33]
    assert ok["labels"][1]["mean_prob"] == pytest.approx(0.8)
    assert (ok["width"], ok["height"], ok["unlabeled_area"], ok["kept_classes"]) == (8, 5, 1, [0, 1, 2])
    assert ok["distractor_area"] == 2 and [label["top_prompt"] for label in ok["labels"]] == ["tree", None]
    assert error["distractor_area"] is None
    assert ok["error"] is None and ok["schema_version"] == LABELS_SCHEMA_VERSION
    assert ok["png_file"] == f"png/000003/{safe_name(7, 'dir/b.png')}.png"
    png = (tmp_path / ok["png_file"]).read_bytes()
    np.testing.assert_array_equal(read_png(png), np.where(label_map == UNLABELED, 255, label_map))
    assert error["labels"] is None and error["png_file"] is None and error["width"] is None
    assert error["error"].startswith("not an image")
    assert [p.name for p in (tmp_path / "png" / "000003").iterdir()] == [f"{safe_name(7, 'dir/b.png')}.png"]
    assert encode_labels(batch, len(CLASSES), "tax", "ckpt").column("png_file").null_count == 2
    assert ok["mean_margin"] == pytest.approx(0.25) and ok["low_margin_share"] == pytest.approx(0.125)
    assert error["mean_margin"] is None and error["low_margin_share"] is None
    assert table.column("confidence_file").null_count == 2  # not asked for
    assert not (tmp_path / "confidence").exists()


def test_encode_labels_writes_the_margin_maps_of_format_confidence(tmp_path):
    batch, _ = model_output()
    table = encode_labels(batch, len(CLASSES), "tax", "ckpt", output={"url": str(tmp_path), "storage_options": {}}, formats=("parquet", "confidence"))
    ok, error = table.to_pylist()
    assert ok["png_file"] is None and error["confidence_file"] is None
    assert ok["confidence_file"] == f"confidence/000003/{safe_name(7, 'dir/b.png')}.png"
    np.testing.assert_array_equal(read_png((tmp_path / ok["confidence_file"]).read_bytes()), batch["margin_map"][0])


def test_shard_writer_commits_parquet_coco_png_and_marker(tmp_path):
    shard = "000003"
    batch, label_map = model_output(shard)
    table = encode_labels(
        batch, len(CLASSES), "tax-hash", "ckpt-hash", output={"url": str(tmp_path / "out"), "storage_options": {}}, formats=("parquet", "png", "confidence")
    )
    store = JobOutput(str(tmp_path / "out"))
    writer = ShardWriter(store, shard, 2, ["parquet", "coco", "png"], CLASSES, {"sed_label.classes": json.dumps(CLASSES)})
    writer.add(table.slice(0, 1))  # rows stream in, in any order
    assert not writer.complete
    writer.add(table.slice(1, 1))
    assert writer.complete
    stats = writer.commit()
    out = tmp_path / "out"

    # Parquet: the labels schema exactly, with its version in the metadata, rows sorted by image_index.
    parquet = pq.read_table(out / "labels" / f"{shard}.parquet")
    assert parquet.schema.names == LABELS_SCHEMA.names
    assert parquet.schema.equals(LABELS_SCHEMA, check_metadata=False)
    metadata = parquet.schema.metadata
    assert metadata[b"sed_label.schema_version"] == str(LABELS_SCHEMA_VERSION).encode()
    assert json.loads(metadata[b"sed_label.classes"]) == CLASSES
    read_labels_table(parquet)  # the project's own reader accepts it
    assert parquet.column("image_index").to_pylist() == [6, 7]
    assert parquet.column("status").to_pylist() == [STATUS_ERROR, STATUS_OK]
    assert "png_file" not in parquet.schema.names

    # COCO: loadable by pycocotools; each annotation's mask is the label map's pixels of its class.
    coco = COCO(str(out / "coco" / f"{shard}.json"))
    assert sorted(coco.imgs) == [7]  # the error row has no COCO image
    assert {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())} == {1: "sky", 2: "tree", 3: "road"}
    annotations = coco.loadAnns(coco.getAnnIds(imgIds=[7]))
    assert sorted(a["category_id"] for a in annotations) == [1, 3]
    for annotation in annotations:
        expected = label_map == annotation["category_id"] - 1
        np.testing.assert_array_equal(coco.annToMask(annotation), expected.astype(np.uint8))
        assert annotation["area"] == int(expected.sum())

    # PNG (written by encode_labels): only for the ok row, named safely, 255 where unlabeled.
    pngs = sorted((out / "png" / shard).iterdir())
    assert [p.name for p in pngs] == [f"{safe_name(7, 'dir/b.png')}.png"]
    np.testing.assert_array_equal(read_png(pngs[0].read_bytes()), np.where(label_map == UNLABELED, 255, label_map))

    # The marker is written last and counts the rows.
    marker = json.loads((out / "_committed" / f"{shard}.json").read_text())
    assert (marker["images"], marker["ok"], marker["errors"]) == (2, 1, 1)
    assert marker["errors_by_reason"] == {"not an image": 1}
    assert marker["files"][0] == f"labels/{shard}.parquet"
    assert set(marker["files"]) == {f"labels/{shard}.parquet", f"coco/{shard}.json", f"png/{shard}/{pngs[0].name}", f"confidence/{shard}/{pngs[0].name}"}
    assert stats["ok"] == 1 and stats["errors"] == 1
    assert list(store.committed_shards()) == [shard]
    assert store.committed_shards()[shard]["ok"] == 1
    # No temporary files are left behind by the atomic writes.
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]


def test_shard_writer_without_coco_or_png_writes_only_parquet(tmp_path):
    batch, _ = model_output("000000")
    store = JobOutput(str(tmp_path))
    writer = ShardWriter(store, "000000", 2, ["parquet"], CLASSES, {})
    writer.add(encode_labels(batch, len(CLASSES), "t", "c"))
    assert writer.commit()["files"] == ["labels/000000.parquet"]
    assert not (tmp_path / "coco").exists() and not (tmp_path / "png").exists()


def test_shard_writer_refuses_more_rows_than_expected(tmp_path):
    batch, _ = model_output()
    writer = ShardWriter(JobOutput(str(tmp_path)), "000003", 1, ["parquet"], CLASSES, {})
    with pytest.raises(RuntimeError, match="2 rows for 1 images"):
        writer.add(encode_labels(batch, len(CLASSES), "t", "c"))


def test_committed_shards_is_empty_before_any_commit(tmp_path):
    assert JobOutput(str(tmp_path / "fresh")).committed_shards() == {}


# redact and job_fingerprint ---------------------------------------------------------------------------------------


def secret_spec() -> dict:
    return {
        "input": {"url": "s3://bucket/in", "storage_options": {"key": "AKIA-INPUT", "secret": "s3cr3t-input"}},
        "taxonomy": {"classes": ["a"], "storage_options": {"token": "tok-tax"}},
        "model": {"weights": "s3://w.pth", "storage_options": {"client_kwargs": {"aws_secret_access_key": "deep-secret"}}},
        "output": {"url": "s3://bucket/out", "storage_options": {}},
        "extra": [{"storage_options": {"password": "in-a-list"}}],
    }


def test_redact_hides_every_storage_option_value():
    spec = secret_spec()
    redacted = redact(spec)
    text = json.dumps(redacted)
    for secret in ("AKIA-INPUT", "s3cr3t-input", "tok-tax", "deep-secret", "in-a-list"):
        assert secret not in text
    assert redacted["input"]["url"] == "s3://bucket/in"  # everything else is kept
    assert redacted["taxonomy"]["classes"] == ["a"]
    assert redacted["output"]["storage_options"] == {}
    assert spec == secret_spec()  # the input is not modified in place


def test_redact_keeps_storage_option_keys():
    redacted = redact(secret_spec())
    assert redacted["input"]["storage_options"] == {"key": REDACTED, "secret": REDACTED}


def job_spec(**input_overrides) -> JobSpec:
    return JobSpec(
        input={"url": "s3://bucket/in", **input_overrides},
        taxonomy={"classes": ["a", "b"]},
        model={"weights": None},
        output={"url": "/tmp/out"},
    )


def test_job_fingerprint_ignores_credentials_and_batch_size_but_not_inputs():
    base = job_fingerprint(job_spec(), "tax", "ckpt")
    assert job_fingerprint(job_spec(storage_options={"key": "k", "secret": "s"}), "tax", "ckpt") == base
    bigger_batches = job_spec()
    bigger_batches.inference.batch_size = 64
    assert job_fingerprint(bigger_batches, "tax", "ckpt") == base
    assert job_fingerprint(job_spec(url="s3://bucket/other"), "tax", "ckpt") != base
    assert job_fingerprint(job_spec(shard_size=8), "tax", "ckpt") != base
    assert job_fingerprint(job_spec(), "tax2", "ckpt") != base
    assert job_fingerprint(job_spec(), "tax", "ckpt2") != base


# The job's start and end: listing, many markers at once, the merged COCO file -----------------------------------


def test_committed_shard_ids_come_from_one_listing_and_markers_are_read_many_at_a_time(tmp_path, monkeypatch):
    store = JobOutput(str(tmp_path))
    for shard in ("000002", "000000", "000001"):
        store.commit_shard(shard, {"shard_id": shard, "images": 1})
    reads = []
    monkeypatch.setattr(store, "read_bytes", lambda relative: reads.append(relative) or b"{}")
    assert store.committed_shard_ids() == ["000000", "000001", "000002"]
    assert reads == []  # the start of a job reads no marker
    monkeypatch.undo()
    markers = store.committed_shards(["000001", "000002"])
    assert list(markers) == ["000001", "000002"] and markers["000002"]["images"] == 1


def test_read_many_keeps_the_order_and_names_a_missing_file(tmp_path):
    store = JobOutput(str(tmp_path))
    store.write_many({f"f{i}": bytes([i]) for i in range(40)})
    assert store.read_many([f"f{i}" for i in reversed(range(40))]) == [bytes([i]) for i in reversed(range(40))]
    with pytest.raises(StorageError, match="cannot read .*missing"):
        store.read_many(["f1", "missing"])


def test_merged_coco_holds_every_shards_images_and_annotations(tmp_path):
    store = JobOutput(str(tmp_path))
    for shard, index in (("000000", 6), ("000001", 7)):
        batch, _ = model_output(shard)
        batch["image_index"] = np.array([index + 10, index], np.int64)
        batch["status"] = np.array([STATUS_OK, STATUS_OK], dtype=object)
        batch["label_map"][1] = np.zeros((5, 8), np.uint16)
        batch["class_ids"][1] = np.array([0], np.int32)
        batch["mean_probs"][1] = batch["max_probs"][1] = np.array([0.5], np.float32)
        batch["top_prompts"][1] = "[null]"
        batch["width"], batch["height"] = np.array([8, 8], np.int32), np.array([5, 5], np.int32)
        writer = ShardWriter(store, shard, 2, ["parquet", "coco"], CLASSES, {})
        writer.add(encode_labels(batch, len(CLASSES), "t", "c"))
        writer.commit()
    merge_coco(store.url, {}, CLASSES, ["000000", "000001"])
    coco = COCO(str(tmp_path / "labels.coco.json"))
    assert sorted(coco.imgs) == [6, 7, 16, 17]
    assert len(coco.anns) == 6 and len({a["id"] for a in coco.anns.values()}) == 6


@pytest.mark.parametrize(
    ("setting", "images", "formats", "merges"),
    [("auto", 100_000, ["parquet", "coco"], True), ("auto", 100_001, ["parquet", "coco"], False),
     (True, 10**7, ["parquet", "coco"], True), (False, 10, ["parquet", "coco"], False), (True, 10, ["parquet"], False)],
)
def test_merge_coco_setting(setting, images, formats, merges):
    spec = JobSpec.model_validate(
        {"input": {"url": "x"}, "taxonomy": {"classes": ["a"]}, "model": {"weights": None},
         "output": {"url": "o", "formats": formats, "merge_coco": setting}}
    )
    assert _merges_coco(spec, images) == merges


def test_labels_of_schema_version_1_read_as_the_current_version(tmp_path):
    """Version 1 rows (before prompt groups and distractors) gain distractor_area 0 and null top_prompts."""
    batch, _ = model_output()
    current = encode_labels(batch, len(CLASSES), "tax", "ckpt").drop_columns(list(WORK_COLUMNS)).cast(LABELS_SCHEMA)
    entries = current.column("labels").combine_chunks()
    flat = entries.flatten()
    old_entry = pa.struct([f for f in flat.type if f.name != "top_prompt"])
    old_labels = pa.ListArray.from_arrays(
        entries.offsets, pa.StructArray.from_arrays([flat.field(f.name) for f in old_entry], fields=list(old_entry)), mask=entries.is_null()
    )
    version_1 = current.drop_columns(["distractor_area", *MARGIN_COLUMNS, *VERSION_4_COLUMNS]).set_column(current.column_names.index("labels"), "labels", old_labels)
    version_1 = version_1.set_column(0, "schema_version", pa.array([1, 1], pa.int16()))
    version_1 = version_1.replace_schema_metadata({b"sed_label.schema_version": b"1"})

    upgraded = read_labels_table(version_1)
    assert upgraded.schema.equals(LABELS_SCHEMA, check_metadata=False)
    ok, error = upgraded.to_pylist()
    assert ok["distractor_area"] == 0 and error["distractor_area"] is None and error["labels"] is None
    assert [label["top_prompt"] for label in ok["labels"]] == [None, None]
    assert [label["area"] for label in ok["labels"]] == [label["area"] for label in current.to_pylist()[0]["labels"]]
    assert ok["schema_version"] == LABELS_SCHEMA_VERSION and ok["mean_margin"] is None and ok["low_margin_share"] is None
    with pytest.raises(ValueError, match="version 9 is not readable"):
        read_labels_table(version_1.replace_schema_metadata({b"sed_label.schema_version": b"9"}))


def test_a_version_1_file_reads_any_columns_asked_for(tmp_path):
    batch, _ = model_output()
    current = encode_labels(batch, len(CLASSES), "tax", "ckpt").drop_columns(list(WORK_COLUMNS)).cast(LABELS_SCHEMA)
    entries = current.column("labels").combine_chunks()
    old_entry = pa.struct([f for f in entries.type.value_type if f.name != "top_prompt"])
    values = entries.values
    old_labels = pa.ListArray.from_arrays(
        entries.offsets, pa.StructArray.from_arrays([values.field(f.name) for f in old_entry], fields=list(old_entry)), mask=entries.is_null()
    )
    version_1 = current.drop_columns(["distractor_area", *MARGIN_COLUMNS, *VERSION_4_COLUMNS]).set_column(current.column_names.index("labels"), "labels", old_labels)
    sink = pa.BufferOutputStream()
    pq.write_table(version_1.replace_schema_metadata({b"sed_label.schema_version": b"1"}), sink)
    data = sink.getvalue().to_pybytes()
    assert read_labels_parquet(data, columns=["distractor_area", "status"]).to_pylist() == [
        {"distractor_area": 0, "status": STATUS_OK},
        {"distractor_area": None, "status": STATUS_ERROR},
    ]
    assert read_labels_parquet(data, columns=["unlabeled_area"]).column_names == ["unlabeled_area"]
    assert [l["top_prompt"] for l in read_labels_parquet(data, columns=["labels"]).column("labels")[0].as_py()] == [None, None]


def test_labels_of_schema_version_2_read_with_unmeasured_margins():
    """Version 2 rows (before uncertainty scores) gain null mean_margin and low_margin_share."""
    batch, _ = model_output()
    current = encode_labels(batch, len(CLASSES), "tax", "ckpt").drop_columns(list(WORK_COLUMNS)).cast(LABELS_SCHEMA)
    version_2 = current.drop_columns([*MARGIN_COLUMNS, *VERSION_4_COLUMNS]).set_column(0, "schema_version", pa.array([2, 2], pa.int16()))
    version_2 = version_2.replace_schema_metadata({b"sed_label.schema_version": b"2"})
    upgraded = read_labels_table(version_2)
    assert upgraded.schema.equals(LABELS_SCHEMA, check_metadata=False)
    assert upgraded.column("mean_margin").null_count == 2 and upgraded.column("low_margin_share").null_count == 2
    unchanged = [{**row, "schema_version": 2} for row in upgraded.drop_columns([*MARGIN_COLUMNS, *VERSION_4_COLUMNS]).to_pylist()]
    assert unchanged == version_2.to_pylist()
    sink = pa.BufferOutputStream()
    pq.write_table(version_2, sink)
    subset = read_labels_parquet(sink.getvalue().to_pybytes(), columns=["image_index", "mean_margin"])
    assert subset.to_pylist() == [{"image_index": 7, "mean_margin": None}, {"image_index": 6, "mean_margin": None}]


def test_labels_of_schema_version_3_read_with_nothing_hashed_reused_or_timed():
    """Version 3 rows (before duplicates and tiling) gain null content_hash, phash, duplicate_of and
    model_seconds, and tiled_windows 0 where labelled (nothing was tiled)."""
    batch, _ = model_output()
    current = encode_labels(batch, len(CLASSES), "tax", "ckpt").drop_columns(list(WORK_COLUMNS)).cast(LABELS_SCHEMA)
    version_3 = current.drop_columns(list(VERSION_4_COLUMNS)).set_column(0, "schema_version", pa.array([3, 3], pa.int16()))
    version_3 = version_3.replace_schema_metadata({b"sed_label.schema_version": b"3"})
    upgraded = read_labels_table(version_3)
    assert upgraded.schema.equals(LABELS_SCHEMA, check_metadata=False)
    assert all(upgraded.column(name).null_count == 2 for name in VERSION_4_COLUMNS if name != "tiled_windows")
    statuses = upgraded.column("status").to_pylist()
    assert upgraded.column("tiled_windows").to_pylist() == [0 if status == "ok" else None for status in statuses] and "ok" in statuses
    assert upgraded.column("schema_version").to_pylist() == [LABELS_SCHEMA_VERSION] * 2
    sink = pa.BufferOutputStream()
    pq.write_table(version_3, sink)
    subset = read_labels_parquet(sink.getvalue().to_pybytes(), columns=["image_index", "duplicate_of", "unlabeled_area", "distractor_area"])
    assert subset.to_pylist() == [
        {"image_index": 7, "duplicate_of": None, "unlabeled_area": 1, "distractor_area": 2},
        {"image_index": 6, "duplicate_of": None, "unlabeled_area": None, "distractor_area": None},
    ]


def test_urls_lose_their_credentials_and_signatures():
    from pipeline.label.commit import redact_url

    assert redact_url("https://user:secret@host:8080/a/b.jpg?X-Amz-Signature=abc") == "https://***@host:8080/a/b.jpg?***"
    assert redact_url("s3://bucket/prefix/") == "s3://bucket/prefix/"
    assert redact_url("http://host:9000/a?sig=1") == "http://host:9000/a?***"
    assert redact_url("/local/path") == "/local/path"

"""`prepare` for every benchmark dataset, on tiny raw datasets written in the official formats.

The expected label maps are written out by hand from the conversion rules of the paper's scripts
(reference README, "Preparing the benchmark datasets"), not computed by the code under test.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image
from pycocotools import mask as mask_utils
from typer.testing import CliRunner

from jobs.cli import app
from pipeline.datasets import DatasetError, get_dataset, prepare_dataset, read_label_map, read_prepared
from pipeline.datasets.ade import resize_bilinear
from tests.helpers import REFERENCE_DIR, REPO

REFERENCE_DATASETS = REFERENCE_DIR / "datasets"


def save_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def jpeg(width: int, height: int, value: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (value, value // 2, 200)).save(buffer, format="JPEG")
    return buffer.getvalue()


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def prepared_labels(output: Path | str, name: str) -> dict[str, np.ndarray]:
    dataset = read_prepared(name, str(output))
    return {item.image_id: read_label_map(item.label_url) for item in dataset.items}


def test_shipped_mapping_files_are_the_reference_ones():
    shipped = REPO / "pipeline" / "datasets" / "data"
    for reference in REFERENCE_DATASETS.iterdir():
        assert (shipped / reference.name).read_bytes() == reference.read_bytes(), reference.name
    for reference in (REFERENCE_DATASETS.parent / "class_lists").iterdir():
        assert (shipped / "class_lists" / reference.name).read_bytes() == reference.read_bytes(), reference.name


def test_ade20k_150(tmp_path):
    raw = tmp_path / "ADEChallengeData2016"
    annotation = np.array([[0, 1, 150], [2, 0, 75]], dtype=np.uint8)
    save_png(raw / "annotations/validation/ADE_val_00000001.png", annotation)
    image = jpeg(3, 2)
    write(raw / "images/validation/ADE_val_00000001.jpg", image)
    manifest = prepare_dataset("ade20k-150", str(raw), str(tmp_path / "out"))
    assert manifest["images"] == 1
    # v -> v - 1, and 0 ("other") -> 255
    expected = np.array([[255, 0, 149], [1, 255, 74]], dtype=np.uint8)
    labels = prepared_labels(tmp_path / "out", "ade20k-150")["ADE_val_00000001"]
    assert labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, expected)
    assert (tmp_path / "out/images/ADE_val_00000001.jpg").read_bytes() == image  # the image as it was
    assert Image.open(tmp_path / "out/labels/ADE_val_00000001.png").format == "PNG"


def ade_seg(height: int, width: int) -> np.ndarray:
    """An ADE20K `_seg.png`: class (R // 10) * 256 + G; instance in B (ignored)."""
    seg = np.zeros((height, width, 3), dtype=np.uint8)
    seg[..., 2] = 7
    return seg


def test_ade20k_847_decodes_maps_and_resizes(tmp_path):
    raw = tmp_path / "ADE20K_2021_17_01"
    folder = raw / "images/ADE/validation/urban/street"
    # A big image: short side 1024 > 512, so image and label are resized.
    seg = ade_seg(1024, 1025)
    seg[101:, :601] = (115, 162, 7)  # (115 // 10) * 256 + 162 = 2978: "wall", train id 0
    seg[101:, 601:] = (92, 116, 7)  # (92 // 10) * 256 + 116 = 2420: "sky", train id 2
    seg[:101] = (0, 1, 7)  # class 1: not among the 847 -> 65535
    save_png(folder / "ADE_val_00000002_seg.png", seg)
    write(folder / "ADE_val_00000002.jpg", jpeg(1025, 1024))
    # A small one (short side <= 512): not resized.
    small = ade_seg(2, 3)
    small[0] = (115, 162, 1)
    small[1, 0] = (92, 116, 1)
    save_png(folder / "ADE_val_00000001_seg.png", small)
    write(folder / "ADE_val_00000001.jpg", jpeg(3, 2))
    # Training images and other files are not part of the validation set.
    save_png(raw / "images/ADE/training/urban/ADE_train_00000001_seg.png", small)
    write(raw / "images/ADE/training/urban/ADE_train_00000001.jpg", jpeg(3, 2))
    save_png(folder / "ADE_val_00000001/instance_000_ADE_val_00000001.png", np.zeros((2, 3), np.uint8))

    manifest = prepare_dataset("ade20k-847", str(raw), str(tmp_path / "out"))
    assert [item["id"] for item in manifest["items"]] == ["ADE_val_00000001", "ADE_val_00000002"]
    labels = prepared_labels(tmp_path / "out", "ade20k-847")
    assert all(v.dtype == np.uint16 for v in labels.values())
    assert Image.open(tmp_path / "out/labels/ADE_val_00000001.tif").mode == "I;16"
    np.testing.assert_array_equal(labels["ADE_val_00000001"], [[0, 0, 0], [2, 65535, 65535]])

    big = labels["ADE_val_00000002"]
    # Short side 1024 -> 512; long side round(1025 / 1024 * 512) = round(512.5) = 512 (half to even).
    assert big.shape == (512, 512)
    # OpenCV's nearest: source index floor(d * 1024 / 512) = 2d for rows, floor(d * 1025 / 512) for
    # columns. Row 50 reads row 100 (class 1), row 51 reads row 102; column 300 reads 600 (wall),
    # column 301 reads 602 (sky). A half-pixel nearest (PIL's) would read row 101 and column 601.
    assert (big[:51] == 65535).all()
    assert (big[51:, :301] == 0).all()
    assert (big[51:, 301:] == 2).all()
    image = Image.open(tmp_path / "out/images/ADE_val_00000002.jpg")
    assert image.format == "JPEG" and image.size == (512, 512)


def test_ade_resize_uses_opencv_bilinear_arithmetic():
    # Halving [0, 100, 200, 255]: output x reads source x' = (x + 0.5) * 2 - 0.5 = 0.5 and 2.5,
    # so (0 + 100) / 2 = 50 and (200 + 255) / 2 = 227.5 -> 228. PIL's antialiased filter would
    # average wider windows.
    row = np.array([[0, 100, 200, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(resize_bilinear(row, (1, 2)), [[50, 228]])
    colour = np.stack([row, row, row], axis=-1)
    np.testing.assert_array_equal(resize_bilinear(colour, (1, 2))[0, :, 1], [50, 228])


def detail_json(path: Path) -> None:
    """PASCAL in Detail's layout, one val image (4 x 5) with four annotations, one train image."""
    height, width = 4, 5
    top_left = np.zeros((height, width), np.uint8, order="F")
    top_left[:2, :2] = 1
    compressed = mask_utils.encode(top_left)
    annotations = [
        # category 2: rows 0-1, columns 0-1, compressed RLE as the Detail file stores it
        {"id": 1, "image_id": 2008000002, "category_id": 2, "segmentation": {"size": [height, width], "counts": compressed["counts"].decode()}},
        # category 458: the polygon x 3..5, y 0..4 -> columns 3-4, every row
        {"id": 2, "image_id": 2008000002, "category_id": 458, "segmentation": [[3, 0, 5, 0, 5, 4, 3, 4]]},
        # category 9, later, over the first one: column-major RLE, 5 zeros then 2 ones -> column 1, rows 1-2
        {"id": 3, "image_id": 2008000002, "category_id": 9, "segmentation": {"size": [height, width], "counts": [5, 2, 13]}},
        # category 3 (not one of the 59): row 3, column 0
        {"id": 4, "image_id": 2008000002, "category_id": 3, "segmentation": {"size": [height, width], "counts": [3, 1, 16]}},
        {"id": 5, "image_id": 2008000003, "category_id": 2, "segmentation": {"size": [2, 2], "counts": [0, 4]}},
    ]
    data = {
        "info": {},
        "images": [
            {"image_id": 2008000002, "file_name": "2008_000002.jpg", "height": height, "width": width, "phase": "val"},
            {"image_id": 2008000003, "file_name": "2008_000003.jpg", "height": 2, "width": 2, "phase": "train"},
        ],
        "annos_segmentation": annotations,
        "categories": [{"category_id": c, "name": f"c{c}"} for c in (2, 3, 9, 458)],
    }
    path.write_text(json.dumps(data))


def test_pascal_context_59(tmp_path):
    raw = tmp_path / "VOC2010"
    write(raw / "JPEGImages/2008_000002.jpg", jpeg(5, 4))
    write(raw / "JPEGImages/2008_000003.jpg", jpeg(2, 2))
    detail_json(raw / "trainval_merged.json")
    manifest = prepare_dataset("pascal-context-59", str(raw), str(tmp_path / "out"))
    assert [item["id"] for item in manifest["items"]] == ["2008_000002"]
    # Painted category ids:      train ids (sorted 60 ids: 0, 2, 9, ..., 458 -> 255, 0, 1, ..., 58):
    #   2   2 0 458 458            0   0 255 58 58
    #   2   9 0 458 458            0   1 255 58 58
    #   0   9 0 458 458          255   1 255 58 58
    #   3   0 0 458 458          255 255 255 58 58   (3 is not kept)
    expected = np.array(
        [[0, 0, 255, 58, 58], [0, 1, 255, 58, 58], [255, 1, 255, 58, 58], [255, 255, 255, 58, 58]], dtype=np.uint8
    )
    labels = prepared_labels(tmp_path / "out", "pascal-context-59")["2008_000002"]
    np.testing.assert_array_equal(labels, expected)


def test_pascal_context_459(tmp_path):
    raw = tmp_path / "VOC2010"
    (raw / "trainval").mkdir(parents=True)
    maps = {
        "2008_000002": np.array([[1, 2, 459], [17, 300, 1]], dtype=np.uint16),
        "2008_000003": np.array([[460, 5]], dtype=np.uint16),
    }
    for image_id, label_map in maps.items():
        scipy.io.savemat(raw / "trainval" / f"{image_id}.mat", {"LabelMap": label_map})
        write(raw / "JPEGImages" / f"{image_id}.jpg", jpeg(2, 1))
    # The paper's val list starts 2008_000002, 2008_000003; convert those two.
    prepare_dataset("pascal-context-459", str(raw), str(tmp_path / "out"), limit=2)
    labels = prepared_labels(tmp_path / "out", "pascal-context-459")
    np.testing.assert_array_equal(labels["2008_000002"], [[0, 1, 458], [16, 299, 0]])  # LabelMap - 1
    np.testing.assert_array_equal(labels["2008_000003"], [[459, 4]])  # 459: the ignore value
    assert labels["2008_000002"].dtype == np.uint16
    assert Image.open(tmp_path / "out/labels/2008_000002.tif").mode == "I;16"
    assert read_prepared("pascal-context-459", str(tmp_path / "out")).limit == 2
    # The whole list needs every file: the first missing one is named.
    with pytest.raises(DatasetError, match=r"trainval/2008_000007\.mat"):
        prepare_dataset("pascal-context-459", str(raw), str(tmp_path / "out2"))


def test_pascal_context_459_refuses_a_zero_label(tmp_path):
    raw = tmp_path / "VOC2010"
    (raw / "trainval").mkdir(parents=True)
    scipy.io.savemat(raw / "trainval/2008_000002.mat", {"LabelMap": np.array([[0, 3]], dtype=np.uint16)})
    write(raw / "JPEGImages/2008_000002.jpg", jpeg(2, 1))
    with pytest.raises(DatasetError, match=r"2008_000002\.mat.*1\.\.65535"):
        prepare_dataset("pascal-context-459", str(raw), str(tmp_path / "out"), limit=1)


def voc_raw(tmp_path: Path) -> Path:
    raw = tmp_path / "VOC2012"
    labels = {
        "2007_000033": np.array([[0, 1, 20], [255, 5, 100]], dtype=np.uint8),
        "2007_000042": np.array([[0, 0], [255, 0]], dtype=np.uint8),  # background and boundary only
        "2007_000061": np.array([[255, 255]], dtype=np.uint8),  # all ignore
    }
    for image_id, label in labels.items():
        save_png(raw / "SegmentationClassAug" / f"{image_id}.png", label)
        write(raw / "JPEGImages" / f"{image_id}.jpg", jpeg(label.shape[1], label.shape[0]))
    write(raw / "ImageSets/Segmentation/val.txt", "\n".join(labels).encode() + b"\n")
    return raw


def test_voc20_drops_background(tmp_path):
    manifest = prepare_dataset("voc20", str(voc_raw(tmp_path)), str(tmp_path / "out"))
    # 1..20 -> 0..19, 0 -> 255, 255 stays, others (100) -> 255; then all-ignore images are skipped.
    assert manifest["skipped"] == ["2007_000042", "2007_000061"]
    labels = prepared_labels(tmp_path / "out", "voc20")
    assert list(labels) == ["2007_000033"]
    np.testing.assert_array_equal(labels["2007_000033"], [[255, 0, 19], [255, 4, 255]])


def test_voc20b_keeps_background_as_class_20(tmp_path):
    manifest = prepare_dataset("voc20b", str(voc_raw(tmp_path)), str(tmp_path / "out"))
    assert manifest["skipped"] == ["2007_000061"]
    labels = prepared_labels(tmp_path / "out", "voc20b")
    np.testing.assert_array_equal(labels["2007_000033"], [[20, 0, 19], [255, 4, 255]])
    np.testing.assert_array_equal(labels["2007_000042"], [[20, 20], [255, 20]])


def test_coco_stuff_171_through_the_cli(tmp_path):
    raw = tmp_path / "coco"
    for split, image_id in (("val2017", "000000000139"), ("train2017", "000000000009")):
        save_png(raw / "stuffthingmaps_trainval2017" / split / f"{image_id}.png", np.array([[0, 11, 12], [181, 255, 91]], np.uint8))
        write(raw / split / f"{image_id}.jpg", jpeg(3, 2))
    result = CliRunner().invoke(app, ["prepare", "coco-stuff-171", str(raw), "--output", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "1 images written" in result.output
    labels = prepared_labels(tmp_path / "out", "coco-stuff-171")
    # 0 person -> 0; 11 (COCO id 12, unused) -> 255; 12 stop sign -> 11; 181 wood -> 170; 91 banner -> 80
    np.testing.assert_array_equal(labels["000000000139"], [[0, 255, 11], [170, 255, 80]])
    result = CliRunner().invoke(app, ["prepare", "coco-stuff-171", str(raw), "--split", "train2017", "--output", str(tmp_path / "train")])
    assert result.exit_code == 0, result.output
    assert list(prepared_labels(tmp_path / "train", "coco-stuff-171")) == ["000000000009"]


def test_errors_name_what_is_missing(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["prepare", "ade20k-151", str(tmp_path)])
    assert result.exit_code == 2 and "known datasets are" in result.output and "ade20k-150" in result.output
    result = runner.invoke(app, ["prepare", "voc20", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "nowhere" in result.output and "does not exist" in result.output
    (tmp_path / "VOC2012/JPEGImages").mkdir(parents=True)
    result = runner.invoke(app, ["prepare", "voc20", str(tmp_path / "VOC2012")])
    assert result.exit_code == 2 and "VOC2012/SegmentationClassAug" in result.output
    with pytest.raises(DatasetError, match="not a prepared dataset.*sed-label prepare voc20"):
        read_prepared("voc20", str(tmp_path))


def test_a_prepared_folder_is_read_only_as_its_own_dataset(tmp_path):
    prepare_dataset("voc20", str(voc_raw(tmp_path)), str(tmp_path / "out"))
    with pytest.raises(DatasetError, match="holds the prepared 'voc20', not 'voc20b'"):
        read_prepared("voc20b", str(tmp_path / "out"))
    item = read_prepared("voc20", str(tmp_path / "out")).items[0]
    assert item.image_url == str(tmp_path / "out/images/2007_000033.jpg")


def test_registry_claims_and_classes():
    ade = get_dataset("ade20k-150")
    assert ade.claimed("convnext_b", None) == 31.8 and ade.claimed("convnext_l", 8) == 35.2
    assert ade.claimed({"embed_dim": 64}, None) is None and ade.claimed("convnext_b", 4) is None
    assert get_dataset("pascal-context-459").claimed("convnext_l", 8) == 22.6
    voc20b = get_dataset("voc20b")
    taxonomy = voc20b.taxonomy()
    assert len(voc20b.prompts()) == 59 and taxonomy.classes[20] == "background" and len(taxonomy.classes) == 21
    assert taxonomy.class_prompts(20) == tuple(voc20b.prompts()[20:]) and not taxonomy.distractors
    assert voc20b.claimed("convnext_b", None) is None
    assert get_dataset("ade20k-150").taxonomy().is_flat
    assert get_dataset("ade20k-150").prompts()[7] == "bed "  # verbatim, trailing space kept


def test_raw_root_and_output_may_be_fsspec_urls(tmp_path):
    import fsspec

    memory = fsspec.filesystem("memory")
    local_raw = voc_raw(tmp_path)
    for path in local_raw.rglob("*"):
        if path.is_file():
            memory.pipe_file(f"/voc-raw/{path.relative_to(local_raw)}", path.read_bytes())
    prepare_dataset("voc20", "memory://voc-raw", "memory://voc-prepared")
    labels = prepared_labels("memory://voc-prepared", "voc20")
    np.testing.assert_array_equal(labels["2007_000033"], [[255, 0, 19], [255, 4, 255]])
    image_url = read_prepared("voc20", "memory://voc-prepared").items[0].image_url
    with fsspec.open(image_url, "rb") as f:
        assert f.read() == (local_raw / "JPEGImages/2007_000033.jpg").read_bytes()

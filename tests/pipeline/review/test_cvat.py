"""pipeline.review.cvat: pre-annotations out as "CVAT for images 1.1", corrections back from
"Segmentation mask 1.1".

`mask_rle` against the example of annotation_tools.md §2.2; `annotations_xml` parsed with
xml.etree and its masks decoded by a decoder written here; `SegmentationExport` read from exports
built here by hand (folder and zip; RGB, palette and index class PNGs), as §2.3 describes them.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from xml.etree import ElementTree

import fsspec
import numpy as np
import pytest
from PIL import Image

from pipeline.review.cvat import SegmentationExport, annotations_xml, mask_rle
from pipeline.review.rows import ReviewError

UNLABELED = 255


def decode_cvat_rle(runs: list[int], left: int, top: int, width: int, height: int, image_height: int, image_width: int) -> np.ndarray:
    """CVAT's mask RLE: alternating background/foreground run lengths over the box, row-major."""
    assert sum(runs) == width * height
    box = np.zeros(width * height, bool)
    position = 0
    for k, run in enumerate(runs):
        if k % 2 == 1:
            box[position : position + run] = True
        position += run
    mask = np.zeros((image_height, image_width), bool)
    mask[top : top + height, left : left + width] = box.reshape(height, width)
    return mask


# mask_rle ----------------------------------------------------------------------------------------------------

CAR_RLE = [0, 1, 7, 4, 2, 4, 2, 4]  # annotation_tools.md §2.2, left 0 top 0 width 6 height 4


def test_the_documented_car_mask_encodes_to_its_runs_and_box():
    car = decode_cvat_rle(CAR_RLE, 0, 0, 6, 4, 6, 8)  # an 8x6 image: height 6, width 8
    # By hand: pixel (0, 0), then rows 1-3, columns 2-5.
    expected = np.zeros((6, 8), bool)
    expected[0, 0] = True
    expected[1:4, 2:6] = True
    np.testing.assert_array_equal(car, expected)
    assert mask_rle(car) == (CAR_RLE, 0, 0, 6, 4)


def test_the_documented_road_mask_encodes_to_its_runs_and_box():
    road = decode_cvat_rle([0, 2, 4, 18], 0, 3, 8, 3, 6, 8)  # §2.2: left 0 top 3 width 8 height 3
    expected = np.zeros((6, 8), bool)
    expected[3:, :] = True
    expected[3, 2:6] = False  # the car's bottom row
    np.testing.assert_array_equal(road, expected)
    assert mask_rle(road) == ([0, 2, 4, 18], 0, 3, 8, 3)


def test_a_box_that_starts_unpainted_starts_with_its_background_run():
    mask = np.zeros((5, 7), bool)
    mask[1, 4] = True
    mask[3, 2:5] = True  # box: rows 1-3, columns 2-4
    assert mask_rle(mask) == ([2, 1, 3, 3], 2, 1, 3, 3)  # 0 0 1 / 0 0 0 / 1 1 1


def test_a_box_that_starts_painted_starts_with_a_zero_run():
    mask = np.zeros((4, 4), bool)
    mask[1, 1] = True
    mask[2, 2] = True
    assert mask_rle(mask) == ([0, 1, 2, 1], 1, 1, 2, 2)


def test_a_single_pixel_and_a_full_image():
    one = np.zeros((3, 3), bool)
    one[2, 1] = True
    assert mask_rle(one) == ([0, 1], 1, 2, 1, 1)
    assert mask_rle(np.ones((2, 5), bool)) == ([0, 10], 0, 0, 5, 2)


def test_random_masks_runs_sum_to_the_box_and_decode_back():
    rng = np.random.default_rng(5)
    for shape in [(1, 1), (9, 14), (31, 17)]:
        mask = rng.random(shape) < 0.3
        mask[rng.integers(shape[0]), rng.integers(shape[1])] = True  # never empty
        runs, left, top, width, height = mask_rle(mask)
        assert sum(runs) == width * height
        assert all(run > 0 for run in runs[1:])
        rows, columns = np.nonzero(mask)
        assert (left, top, width, height) == (columns.min(), rows.min(), columns.max() - columns.min() + 1, rows.max() - rows.min() + 1)
        np.testing.assert_array_equal(decode_cvat_rle(runs, left, top, width, height, *shape), mask)


# annotations_xml ---------------------------------------------------------------------------------------------

CLASSES = ["road", "car", "sky"]
COLOURS = ["#ff0000", "#0000ff", "#00ff00"]


def xml_items() -> list[dict]:
    first = np.full((6, 8), 2, np.uint16)  # sky
    first[3:, :] = 0  # road
    first[1:4, 2:6] = 1  # car
    first[0, 0] = 1  # a second car component
    first[5, 7] = 65535  # unlabeled
    second = np.full((4, 3), 65535, np.uint16)
    second[1:3, 1] = 1
    return [
        {"name": "dir/img1.png", "width": 8, "height": 6, "label_map": first, "class_ids": [0, 1, 2]},
        {"name": "img 2 & <x>.jpg", "width": 3, "height": 4, "label_map": second, "class_ids": [1]},
    ]


def test_annotations_xml_has_one_image_per_item_and_one_mask_per_class():
    items = xml_items()
    root = ElementTree.fromstring(annotations_xml(items, CLASSES, COLOURS))
    assert root.tag == "annotations" and root.findtext("version") == "1.1"
    images = root.findall("image")
    assert [(i.get("id"), i.get("name"), i.get("width"), i.get("height")) for i in images] == [
        ("0", "dir/img1.png", "8", "6"),
        ("1", "img 2 & <x>.jpg", "3", "4"),
    ]
    assert [[m.get("label") for m in image.findall("mask")] for image in images] == [["road", "car", "sky"], ["car"]]
    for image in images:
        for mask in image.findall("mask"):
            assert mask.get("source") == "auto" and mask.get("z_order") == "0" and mask.get("occluded") == "0"


def test_annotations_xml_masks_decode_to_the_label_maps():
    items = xml_items()
    root = ElementTree.fromstring(annotations_xml(items, CLASSES, COLOURS))
    for item, image in zip(items, root.findall("image")):
        for mask in image.findall("mask"):
            runs = [int(v) for v in mask.get("rle").split(",")]
            box = [int(mask.get(key)) for key in ("left", "top", "width", "height")]
            decoded = decode_cvat_rle(runs, *box, item["height"], item["width"])
            class_id = CLASSES.index(mask.get("label"))
            np.testing.assert_array_equal(decoded, item["label_map"] == class_id)


def test_annotations_xml_meta_lists_every_class_with_its_colour():
    root = ElementTree.fromstring(annotations_xml(xml_items(), CLASSES, COLOURS))
    task = root.find("meta/task")
    assert task.findtext("size") == "2"
    labels = [(label.findtext("name"), label.findtext("color"), label.findtext("type")) for label in task.findall("labels/label")]
    assert labels == [("road", "#ff0000", "mask"), ("car", "#0000ff", "mask"), ("sky", "#00ff00", "mask")]


def test_annotations_xml_starts_with_an_xml_declaration():
    data = annotations_xml(xml_items(), CLASSES, COLOURS)
    assert data.startswith(b"<?xml") and b"utf-8" in data.split(b"\n", 1)[0].lower()


# SegmentationExport ------------------------------------------------------------------------------------------

ROAD, CAR, TREE = (128, 64, 128), (0, 0, 142), (107, 142, 35)
LABELMAP = "# label:color_rgb:parts:actions\nbackground:0,0,0::\nroad:128,64,128::\ncar:0,0,142::\n"
# The job's classes, in an order other than labelmap.txt's: road -> 2, car -> 0.
JOB_CLASSES = ["car", "sky", "road"]
HEIGHT, WIDTH = 4, 5


def index_map() -> np.ndarray:
    """Index per labelmap line: 0 background, 1 road, 2 car."""
    return np.array(
        [
            [0, 0, 1, 1, 1],
            [0, 2, 2, 1, 1],
            [2, 2, 0, 1, 0],
            [1, 1, 1, 1, 0],
        ],
        np.uint8,
    )


def expected_ids(indices: np.ndarray, to_class: dict[int, int]) -> np.ndarray:
    out = np.full(indices.shape, UNLABELED, np.int64)
    for index, class_id in to_class.items():
        out[indices == index] = class_id
    return out


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def rgb_png(indices: np.ndarray) -> bytes:
    palette = np.array([(0, 0, 0), ROAD, CAR], np.uint8)
    return png(Image.fromarray(palette[indices], "RGB"))


def palette_png(indices: np.ndarray) -> bytes:
    # Palette entries in another order than the labelmap's, so the index is not the label.
    image = Image.fromarray(np.array([2, 0, 1], np.uint8)[indices], "P")
    image.putpalette([*ROAD, *CAR, 0, 0, 0] + [0] * (256 - 3) * 3)
    return png(image)


def index_png(indices: np.ndarray) -> bytes:
    return png(Image.fromarray(indices, "L"))


def export_files(labelmap: str = LABELMAP, **extra: bytes) -> dict[str, bytes]:
    indices = index_map()
    files = {
        "labelmap.txt": labelmap.encode(),
        "ImageSets/Segmentation/default.txt": b"img1\nimg2\nsub/img3\n",
        "SegmentationClass/img1.png": rgb_png(indices),
        "SegmentationClass/img2.png": palette_png(indices[::-1].copy()),
        "SegmentationClass/sub/img3.png": index_png(indices[:, ::-1].copy()),
        "SegmentationObject/img1.png": rgb_png(np.zeros_like(indices)),
    }
    files.update(extra)
    return files


def write_folder(root: Path, files: dict[str, bytes]) -> str:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return str(root)


def write_zip(path: Path, files: dict[str, bytes]) -> str:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return str(path)


def write_to_object_storage(url: str, files: dict[str, bytes], as_zip: bool) -> str:
    """The export in fsspec's in-memory object store (as it would lie in a bucket)."""
    fs = fsspec.filesystem("memory")
    if as_zip:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            for name, data in files.items():
                archive.writestr(name, data)
        fs.pipe(f"{url}.zip", buffer.getvalue())
        return f"{url}.zip"
    fs.pipe({f"{url}/{name}": data for name, data in files.items()})
    return url


@pytest.fixture(params=["folder", "zip", "stored folder", "stored zip"])
def export(request, tmp_path) -> SegmentationExport:
    files = export_files()
    if request.param == "folder":
        return SegmentationExport(write_folder(tmp_path / "export", files))
    if request.param == "zip":
        return SegmentationExport(write_zip(tmp_path / "export.zip", files))
    return SegmentationExport(write_to_object_storage(f"memory://reviews/{tmp_path.name}/export", files, request.param == "stored zip"))


def test_masks_are_named_without_extension_including_folders(export):
    masks = export.masks()
    assert sorted(masks) == ["img1", "img2", "sub/img3"]
    assert masks["img1"] == rgb_png(index_map())


def test_labelmap_is_read_in_file_order(export):
    assert export.labels == [("background", (0, 0, 0)), ("road", ROAD), ("car", CAR)]


def test_rgb_palette_and_index_pngs_give_the_jobs_class_ids(export):
    indices = index_map()
    masks = export.masks()
    expected = {
        "img1": indices,
        "img2": indices[::-1],
        "sub/img3": indices[:, ::-1],
    }
    for name, source in expected.items():
        correction = export.correction(name, masks[name], JOB_CLASSES, 3, (HEIGHT, WIDTH), UNLABELED, None, "rev")
        np.testing.assert_array_equal(correction.label_map, expected_ids(source, {1: 2, 2: 0}))
        assert correction.label_map.dtype == np.uint8
        assert correction.unpainted_pixels == int((source == 0).sum())
        assert correction.image_index == 3 and correction.reviewed_by == "rev" and correction.overlap_pixels == 0
        assert name in correction.origin


def test_background_is_a_class_when_the_job_has_one(export):
    classes = ["road", "background", "car"]
    correction = export.correction("img1", export.masks()["img1"], classes, 0, (HEIGHT, WIDTH), UNLABELED, None, None)
    np.testing.assert_array_equal(correction.label_map, expected_ids(index_map(), {0: 1, 1: 0, 2: 2}))
    assert correction.unpainted_pixels == 0


def test_unpainted_pixels_take_the_class_asked_for(export):
    correction = export.correction("sub/img3", export.masks()["sub/img3"], JOB_CLASSES, 0, (HEIGHT, WIDTH), UNLABELED, 1, None)
    source = index_map()[:, ::-1]
    np.testing.assert_array_equal(correction.label_map, expected_ids(source, {0: 1, 1: 2, 2: 0}))
    assert correction.unpainted_pixels == int((source == 0).sum()) == 6


def test_more_than_254_classes_use_65535_for_unlabeled(export):
    classes = [f"c{i}" for i in range(300)]
    classes[299], classes[0] = "road", "car"
    correction = export.correction("img1", export.masks()["img1"], classes, 0, (HEIGHT, WIDTH), 65535, None, None)
    assert correction.label_map.dtype == np.uint16
    expected = expected_ids(index_map(), {1: 299, 2: 0})
    expected[expected == UNLABELED] = 65535
    np.testing.assert_array_equal(correction.label_map, expected)


def test_a_colour_not_in_labelmap_is_refused_naming_file_and_colour(tmp_path):
    bad = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    bad[2, 3] = (1, 2, 3)
    files = export_files(**{"SegmentationClass/odd.png": png(Image.fromarray(bad, "RGB"))})
    export = SegmentationExport(write_folder(tmp_path / "e", files))
    with pytest.raises(ReviewError, match=r"odd\.png.*\(1, 2, 3\).*labelmap\.txt"):
        export.correction("odd", export.masks()["odd"], JOB_CLASSES, 0, (HEIGHT, WIDTH), UNLABELED, None, None)


def test_a_labelmap_label_that_is_not_a_job_class_is_refused(tmp_path):
    files = export_files(labelmap=LABELMAP + f"tree:{TREE[0]},{TREE[1]},{TREE[2]}::\n")
    export = SegmentationExport(write_zip(tmp_path / "e.zip", files))
    with pytest.raises(ReviewError, match="'tree'"):
        export.correction("img1", export.masks()["img1"], JOB_CLASSES, 0, (HEIGHT, WIDTH), UNLABELED, None, None)


def test_a_png_of_another_size_than_its_image_is_refused(export):
    with pytest.raises(ReviewError, match=r"img1\.png is 5x4, its image 4x5"):
        export.correction("img1", export.masks()["img1"], JOB_CLASSES, 0, (WIDTH, HEIGHT), UNLABELED, None, None)


def test_an_index_beyond_labelmap_is_refused(tmp_path):
    indices = index_map()
    indices[0, 0] = 3  # labelmap.txt has three labels: 0, 1, 2
    export = SegmentationExport(write_folder(tmp_path / "e", export_files(**{"SegmentationClass/img9.png": index_png(indices)})))
    with pytest.raises(ReviewError, match=r"img9\.png: index 3 .*3 labels"):
        export.correction("img9", export.masks()["img9"], JOB_CLASSES, 0, (HEIGHT, WIDTH), UNLABELED, None, None)


def test_a_folder_without_labelmap_is_refused(tmp_path):
    files = export_files()
    del files["labelmap.txt"]
    with pytest.raises(ReviewError, match="labelmap.txt"):
        SegmentationExport(write_folder(tmp_path / "e", files))


def test_a_path_that_is_neither_zip_nor_folder_is_refused(tmp_path):
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(ReviewError, match="neither a zip nor a folder"):
        SegmentationExport(str(tmp_path / "x.txt"))


def test_a_malformed_labelmap_line_is_refused_with_its_number(tmp_path):
    files = export_files(labelmap=LABELMAP + "car:0,0::\n")
    with pytest.raises(ReviewError, match="line 5"):
        SegmentationExport(write_folder(tmp_path / "e", files))

"""pipeline.review.label_studio: the labelling config and tasks a review exports, and the
corrections read back from Label Studio's JSON export.

Tasks are checked by decoding their brush RLE (with `rle_to_alpha`, itself checked against the
documented bytes in test_brush_rle.py); exports are built here in the shape Label Studio's JSON
export has (annotation id, result, was_cancelled, completed_by, created_at/updated_at), as
annotation_tools.md §1.2 and §1.7 describe them.
"""

from __future__ import annotations

from xml.etree import ElementTree

import numpy as np
import pytest

from pipeline.review.brush_rle import mask_to_rle, rle_to_alpha
from pipeline.review.label_studio import corrections, label_config, task
from pipeline.review.rows import ReviewError
from schemas import LOW_MARGIN

from .test_brush_rle import reference_encode

CLASSES = ["road", "car", "sky"]
COLOURS = ["#ff0000", "#0000ff", "#00ff00"]
UNLABELED = 255


# label_config ------------------------------------------------------------------------------------------------


def controls(config: str) -> ElementTree.Element:
    root = ElementTree.fromstring(config)
    assert root.tag == "View"
    return root


@pytest.mark.parametrize("layer, image", [(False, False), (True, False), (False, True), (True, True)])
def test_label_config_has_one_label_per_class_and_the_uncertainty_parts_only_when_asked(layer, image):
    root = controls(label_config(CLASSES, COLOURS, layer, image))
    images = root.findall("Image")
    assert [(i.get("name"), i.get("value")) for i in images] == [("image", "$image")] + ([("uncertainty", "$uncertainty")] if image else [])
    brushes = {b.get("name"): b for b in root.findall("BrushLabels")}
    assert set(brushes) == ({"tag", "uncertain"} if layer else {"tag"})
    assert brushes["tag"].get("toName") == "image"
    assert [(l.get("value"), l.get("background")) for l in brushes["tag"].findall("Label")] == list(zip(CLASSES, COLOURS))
    if layer:
        assert brushes["uncertain"].get("toName") == "image"
        assert [l.get("value") for l in brushes["uncertain"].findall("Label")] == ["low_confidence"]


def test_label_config_quotes_class_names():
    names = ['a "quoted" & <odd> name', "it's"]
    root = controls(label_config(names, ["#000000", "#ffffff"], False, False))
    assert [l.get("value") for l in root.find("BrushLabels").findall("Label")] == names


# task --------------------------------------------------------------------------------------------------------

HEIGHT, WIDTH = 6, 8


def label_map() -> np.ndarray:
    labels = np.full((HEIGHT, WIDTH), 65535, np.uint16)
    labels[3:, :] = 0  # road
    labels[1:4, 2:6] = 2  # sky (class 2), painted over part of the road
    labels[0, 7] = 2
    return labels


def row(mean_margin=0.125) -> dict:
    return {
        "image_index": 42,
        "image_id": "dir/img1.jpg",
        "width": WIDTH,
        "height": HEIGHT,
        # out of class order on purpose
        "labels": [{"class_id": 2, "mean_prob": 0.61234567}, {"class_id": 0, "mean_prob": 0.9}],
        "mean_margin": mean_margin,
    }


def test_task_has_one_brush_result_per_class_present_decoding_to_its_mask():
    labels = label_map()
    out = task(row(), "/data/local-files/?d=images/img1.jpg", CLASSES, labels, "sed-v1")
    assert out["data"] == {"image": "/data/local-files/?d=images/img1.jpg", "sed_image_index": 42, "sed_image_id": "dir/img1.jpg"}
    (prediction,) = out["predictions"]
    assert prediction["model_version"] == "sed-v1"
    assert prediction["score"] == pytest.approx(0.125)
    results = prediction["result"]
    assert sorted(r["value"]["brushlabels"][0] for r in results) == ["road", "sky"]
    assert len({r["id"] for r in results}) == len(results)
    for result in results:
        assert (result["from_name"], result["to_name"], result["type"]) == ("tag", "image", "brushlabels")
        assert (result["original_width"], result["original_height"]) == (WIDTH, HEIGHT)
        assert result["value"]["format"] == "rle"
        class_id = CLASSES.index(result["value"]["brushlabels"][0])
        np.testing.assert_array_equal(rle_to_alpha(result["value"]["rle"], HEIGHT, WIDTH) > 0, labels == class_id)
        assert not result.get("readonly", False)
    scores = {r["value"]["brushlabels"][0]: r["score"] for r in results}
    assert scores == {"sky": pytest.approx(0.6123, abs=1e-9), "road": pytest.approx(0.9)}


def test_task_score_is_none_for_unmeasured_rows():
    assert task(row(None), "x", CLASSES, label_map(), "v")["predictions"][0]["score"] is None


def test_task_carries_the_uncertainty_image_when_given():
    out = task(row(), "img-url", CLASSES, label_map(), "v", uncertainty_url="unc-url")
    assert out["data"]["uncertainty"] == "unc-url"


def test_task_uncertain_layer_covers_exactly_the_pixels_under_low_margin():
    margin = np.full((HEIGHT, WIDTH), 200, np.uint8)
    values = np.array([0, 10, 24, 25, 26, 27, 28, 255], np.uint8)
    margin[2, :] = values
    margin[5, 3] = 1
    out = task(row(), "x", CLASSES, label_map(), "v", margin_map=margin)
    uncertain = [r for r in out["predictions"][0]["result"] if r["from_name"] == "uncertain"]
    assert len(uncertain) == 1
    (result,) = uncertain
    assert result["readonly"] is True and result["to_name"] == "image" and result["type"] == "brushlabels"
    assert result["value"]["brushlabels"] == ["low_confidence"]
    assert (result["original_width"], result["original_height"]) == (WIDTH, HEIGHT)
    expected = margin.astype(np.float64) / 255 < LOW_MARGIN  # a margin under 0.1 (25 / 255 = 0.098)
    assert expected[2].tolist() == [True, True, True, True, False, False, False, False]
    np.testing.assert_array_equal(rle_to_alpha(result["value"]["rle"], HEIGHT, WIDTH) > 0, expected)
    ids = [r["id"] for r in out["predictions"][0]["result"]]
    assert len(set(ids)) == len(ids) == 3


def test_task_without_doubtful_pixels_has_no_uncertain_layer():
    out = task(row(), "x", CLASSES, label_map(), "v", margin_map=np.full((HEIGHT, WIDTH), 128, np.uint8))
    assert [r["from_name"] for r in out["predictions"][0]["result"]] == ["tag", "tag"]


# corrections -------------------------------------------------------------------------------------------------

SIZES = {7: (HEIGHT, WIDTH), 8: (3, 4)}


def region(name: str, mask: np.ndarray, from_name: str = "tag", kind: str = "brushlabels", size: tuple[int, int] | None = None) -> dict:
    height, width = size or mask.shape
    return {
        "id": f"r-{name}-{int(mask.sum())}",
        "from_name": from_name,
        "to_name": "image",
        "type": kind,
        "original_width": width,
        "original_height": height,
        "image_rotation": 0,
        "origin": "manual",
        "value": {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": [name]},
    }


def annotation(annotation_id: int, result: list[dict], updated_at: str, cancelled: bool = False, email: str = "r@example.com") -> dict:
    return {
        "id": annotation_id,
        "completed_by": {"id": 1, "email": email, "first_name": "", "last_name": ""},
        "result": result,
        "was_cancelled": cancelled,
        "ground_truth": False,
        "created_at": "2024-05-01T09:00:00.000000Z",
        "updated_at": updated_at,
        "lead_time": 12.5,
    }


def export_task(task_id: int, index: int, annotations: list[dict], image_id: str = "img") -> dict:
    return {
        "id": task_id,
        "data": {"image": f"/data/local-files/?d=images/{image_id}", "sed_image_index": index, "sed_image_id": image_id},
        "annotations": annotations,
        "predictions": [],
        "drafts": [],
    }


def box(top: int, bottom: int, left: int, right: int, shape=(HEIGHT, WIDTH)) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[top:bottom, left:right] = True
    return mask


def test_the_latest_annotation_that_was_not_cancelled_is_read():
    old = annotation(1, [region("road", box(0, 2, 0, 8))], "2024-05-01T10:00:00.000000Z", email="old@example.com")
    latest = annotation(2, [region("car", box(2, 4, 0, 8))], "2024-05-02T10:00:00.000000Z")
    cancelled = annotation(3, [region("sky", box(4, 6, 0, 8))], "2024-05-03T10:00:00.000000Z", cancelled=True, email="x@example.com")
    found, untouched = corrections([export_task(11, 7, [cancelled, latest, old])], CLASSES, SIZES, UNLABELED, None)
    assert untouched == []
    (correction,) = found
    expected = np.full((HEIGHT, WIDTH), UNLABELED)
    expected[2:4, :] = 1
    np.testing.assert_array_equal(correction.label_map, expected)
    assert correction.label_map.dtype == np.uint8
    assert correction.image_index == 7
    assert correction.reviewed_by == "r@example.com"
    assert correction.reviewed_at == "2024-05-02T10:00:00.000000Z"
    assert correction.unpainted_pixels == HEIGHT * WIDTH - 16 and correction.overlap_pixels == 0
    assert "task 11" in correction.origin and "annotation 2" in correction.origin


def test_tasks_without_annotations_or_only_cancelled_ones_are_untouched():
    cancelled = annotation(5, [region("road", box(0, 1, 0, 1))], "2024-05-01T10:00:00Z", cancelled=True)
    annotated = annotation(6, [region("road", box(0, 1, 0, 1, (3, 4)))], "2024-05-01T10:00:00Z")
    tasks = [export_task(1, 7, []), export_task(2, 8, [annotated]), export_task(3, 7, [cancelled])]
    del tasks[0]["annotations"]  # a task nobody opened may have no key at all
    found, untouched = corrections(tasks, CLASSES, SIZES, UNLABELED, None)
    assert untouched == [1, 3]
    assert [c.image_index for c in found] == [8]


def test_the_uncertainty_layer_is_skipped():
    doubtful = region("low_confidence", box(0, 6, 0, 8), from_name="uncertain")
    doubtful["readonly"] = True
    road = region("road", box(5, 6, 0, 8))
    found, _ = corrections([export_task(1, 7, [annotation(1, [doubtful, road], "2024-05-01T10:00:00Z")])], CLASSES, SIZES, UNLABELED, None)
    expected = np.full((HEIGHT, WIDTH), UNLABELED)
    expected[5, :] = 0
    np.testing.assert_array_equal(found[0].label_map, expected)


def test_overlapping_regions_the_later_one_wins_and_the_overlap_is_counted():
    road, car = box(0, 4, 0, 5), box(2, 6, 3, 8)  # overlap: rows 2-3, columns 3-4 = 4 pixels
    found, _ = corrections([export_task(1, 7, [annotation(1, [region("road", road), region("car", car)], "2024-05-01T10:00:00Z")])], CLASSES, SIZES, UNLABELED, None)
    expected = np.full((HEIGHT, WIDTH), UNLABELED)
    expected[road] = 0
    expected[car] = 1
    np.testing.assert_array_equal(found[0].label_map, expected)
    assert found[0].overlap_pixels == int((road & car).sum()) == 4
    assert found[0].unpainted_pixels == int((~(road | car)).sum())
    # The other order: the road is on top.
    found, _ = corrections([export_task(1, 7, [annotation(1, [region("car", car), region("road", road)], "2024-05-01T10:00:00Z")])], CLASSES, SIZES, UNLABELED, None)
    expected[car] = 1
    expected[road] = 0
    np.testing.assert_array_equal(found[0].label_map, expected)
    assert found[0].overlap_pixels == 4


def test_two_regions_of_the_same_class_are_united_without_overlap():
    first, second = box(0, 3, 0, 4), box(1, 5, 2, 7)
    found, _ = corrections([export_task(1, 7, [annotation(1, [region("sky", first), region("sky", second)], "2024-05-01T10:00:00Z")])], CLASSES, SIZES, UNLABELED, None)
    np.testing.assert_array_equal(found[0].label_map == 2, first | second)
    assert found[0].overlap_pixels == 0


def test_partial_alpha_counts_as_painted():
    # A region as the editor exports a soft stroke edge: alpha 1..254 still paints (> 0, as LS's converters).
    alpha = np.zeros((HEIGHT, WIDTH), np.uint8)
    alpha[0, :4] = [1, 60, 128, 254]
    result = region("car", alpha > 0)
    rgba = np.repeat(alpha.ravel(), 4).tolist()
    result["value"]["rle"] = reference_encode([("literal", rgba[:16]), ("repeat", rgba[16:])])
    found, _ = corrections([export_task(1, 7, [annotation(1, [result], "2024-05-01T10:00:00Z")])], CLASSES, SIZES, UNLABELED, None)
    np.testing.assert_array_equal(found[0].label_map == 1, alpha > 0)


@pytest.mark.parametrize("unpainted", [None, 2])
def test_unpainted_pixels_are_unlabeled_or_the_class_asked_for(unpainted):
    road = box(0, 2, 0, 3)
    found, _ = corrections([export_task(1, 7, [annotation(1, [region("road", road)], "2024-05-01T10:00:00Z")])], CLASSES, SIZES, UNLABELED, unpainted)
    expected = np.where(road, 0, UNLABELED if unpainted is None else unpainted)
    np.testing.assert_array_equal(found[0].label_map, expected)
    assert found[0].unpainted_pixels == HEIGHT * WIDTH - 6


def test_an_annotation_with_no_region_is_all_unpainted():
    found, untouched = corrections([export_task(4, 8, [annotation(1, [], "2024-05-01T10:00:00Z")])], CLASSES, SIZES, UNLABELED, None)
    assert untouched == [] and found[0].unpainted_pixels == 12
    np.testing.assert_array_equal(found[0].label_map, np.full((3, 4), UNLABELED))


def test_more_than_254_classes_give_a_uint16_map_with_65535_unlabeled():
    classes = [f"c{i}" for i in range(300)]
    found, _ = corrections([export_task(1, 7, [annotation(1, [region("c299", box(0, 1, 0, 2))], "2024-05-01T10:00:00Z")])], classes, SIZES, 65535, None)
    assert found[0].label_map.dtype == np.uint16
    expected = np.full((HEIGHT, WIDTH), 65535)
    expected[0, :2] = 299
    np.testing.assert_array_equal(found[0].label_map, expected)


def test_of_two_valid_annotations_the_later_updated_wins_whatever_their_order():
    early = annotation(9, [region("road", box(0, 1, 0, 8))], "2024-05-01T10:00:00.000000Z")
    late = annotation(4, [region("car", box(0, 1, 0, 8))], "2024-05-01T10:00:01.000000Z")
    for order in ([early, late], [late, early]):
        found, _ = corrections([export_task(1, 7, order)], CLASSES, SIZES, UNLABELED, None)
        assert (found[0].label_map[0] == 1).all()


@pytest.mark.parametrize(
    "earlier, later",
    [
        ("2024-05-01T10:00:00Z", "2024-05-01T10:00:00.500000Z"),  # DRF leaves out microseconds when they are 0
        ("2024-05-01T12:00:00+02:00", "2024-05-01T11:00:00Z"),  # 10:00 UTC, then 11:00 UTC
    ],
)
def test_the_later_annotation_wins_by_time_not_by_string(earlier, later):
    first = annotation(1, [region("road", box(0, 1, 0, 8))], earlier)
    second = annotation(2, [region("car", box(0, 1, 0, 8))], later)
    found, _ = corrections([export_task(1, 7, [first, second])], CLASSES, SIZES, UNLABELED, None)
    assert (found[0].label_map[0] == 1).all()


# corrections: errors -----------------------------------------------------------------------------------------


def one_task(result: list[dict], data: dict | None = None) -> list[dict]:
    entry = export_task(77, 7, [annotation(3, result, "2024-05-01T10:00:00Z")])
    if data is not None:
        entry["data"] = data
    return [entry]


def test_an_unknown_label_is_refused_naming_the_task():
    with pytest.raises(ReviewError, match=r"task 77.*'tree'"):
        corrections(one_task([region("tree", box(0, 1, 0, 1))]), CLASSES, SIZES, UNLABELED, None)


def test_a_region_of_another_size_is_refused_naming_the_task():
    with pytest.raises(ReviewError, match=r"task 77.*4x3 on an image of 8x6"):
        corrections(one_task([region("road", box(0, 1, 0, 1, (3, 4)))]), CLASSES, SIZES, UNLABELED, None)


def test_a_polygon_under_the_brush_control_is_refused():
    polygon = {
        "id": "p1", "from_name": "tag", "to_name": "image", "type": "polygonlabels", "original_width": WIDTH, "original_height": HEIGHT,
        "value": {"points": [[0, 0], [50, 0], [50, 50]], "polygonlabels": ["road"]},
    }
    with pytest.raises(ReviewError, match=r"task 77.*'polygonlabels'"):
        corrections(one_task([polygon]), CLASSES, SIZES, UNLABELED, None)


def test_a_task_not_exported_by_a_review_is_refused():
    with pytest.raises(ReviewError, match=r"task 77.*sed_image_index"):
        corrections(one_task([], data={"image": "x.png"}), CLASSES, SIZES, UNLABELED, None)


def test_a_task_of_an_image_the_job_does_not_hold_is_refused():
    with pytest.raises(ReviewError, match=r"task 77.*'ghost'.*index 99"):
        corrections(one_task([], data={"image": "x", "sed_image_index": 99, "sed_image_id": "ghost"}), CLASSES, SIZES, UNLABELED, None)


def test_a_corrupt_rle_is_refused_naming_the_task():
    broken = region("road", box(0, 1, 0, 1))
    broken["value"]["rle"] = broken["value"]["rle"][:6]
    with pytest.raises(ReviewError, match="task 77"):
        corrections(one_task([broken]), CLASSES, SIZES, UNLABELED, None)

"""The benchmark's parts that need no model: scoring a batch against label maps, the paper's rows."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from pipeline.evaluate.benchmark import paper_row, summary_lines
from pipeline.datasets import get_dataset
from pipeline.metrics import SemSegEvaluator
from pipeline.evaluate.score import score_labels

CLASSES = [f"c{i}" for i in range(21)]


def batch_of(label_maps: list[np.ndarray], statuses: list[str]) -> dict[str, np.ndarray]:
    maps = np.empty(len(label_maps), dtype=object)
    maps[:] = label_maps
    return {
        "image_index": np.arange(len(label_maps)),
        "image_id": np.array([f"img{i}" for i in range(len(label_maps))], dtype=object),
        "status": np.array(statuses, dtype=object),
        "error": np.array(["" if s == "ok" else "decode failed" for s in statuses], dtype=object),
        "label_map": maps,
    }


def test_score_counts_voc20b_background_prompts_as_background_and_reports_bad_ground_truth(tmp_path):
    truth = np.array([[20, 20, 3], [255, 0, 20]], dtype=np.uint8)
    Image.fromarray(truth).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((3, 3), np.uint8)).save(tmp_path / "b.png")  # wrong size for its image
    (tmp_path / "c.png").write_bytes(b"not a png")
    # Prompt 45 (a PASCAL-Context name in VOC-20b's group "background") must count as class 20,
    # as the paper's VOC-20b protocol merges every prompt past the 20 VOC classes into background.
    prompts = np.array([[45, 20, 3], [7, 0, 0]])
    prediction = get_dataset("voc20b").taxonomy().output_labels(torch.from_numpy(prompts), unlabeled=21).numpy().astype(np.uint16)
    np.testing.assert_array_equal(prediction, np.minimum(prompts, 20))
    batch = batch_of([prediction, np.zeros((2, 3), np.uint16), np.zeros((2, 3), np.uint16), np.zeros((1, 1), np.uint16)], ["ok", "ok", "ok", "error"])
    urls = [str(tmp_path / name) for name in ("a.png", "b.png", "c.png", "d.png")]
    rows = score_labels(batch, urls, CLASSES, ignore_label=255, storage_options={})
    assert list(rows["status"]) == ["error" if i else "ok" for i in range(4)]
    assert rows["error"][1].startswith("ground truth mismatch: ") and "is 3x3, its image 3x2" in rows["error"][1]
    assert "ground truth unreadable" in rows["error"][2]
    assert rows["error"][3] == "decode failed"
    # By hand (rows: prediction, columns: ground truth; 21 = unlabeled / ignored):
    # (20, 20) twice [45 -> 20 and 20], (3, 3), (7, ignore), (0, 0), (0, 20).
    expected = SemSegEvaluator(CLASSES).confusion
    for pred, gt, count in ((20, 20, 2), (3, 3, 1), (7, 21, 1), (0, 0, 1), (0, 20, 1)):
        expected[pred, gt] = count
    confusion = np.zeros(22 * 22, np.int64)
    np.add.at(confusion, rows["confusion_index"][0], rows["confusion_count"][0])
    np.testing.assert_array_equal(confusion.reshape(22, 22), expected)
    assert all(rows["confusion_index"][i].size == 0 for i in (1, 2, 3))


def test_paper_rows():
    ade = get_dataset("ade20k-150")
    assert paper_row(ade, "convnext_b", None, None) == {"mIoU": 31.8, "row": "ConvNeXt-B", "note": "SED (CVPR 2024), Table 1, ConvNeXt-B, A-150"}
    assert paper_row(ade, "convnext_l", 8, None)["row"] == "ConvNeXt-L fast (K=8)"
    assert "not comparable" in paper_row(ade, "convnext_b", 8, "measured on 10 of 2000 images only")["note"]
    assert "not one of the paper's" in paper_row(ade, {"embed_dim": 64}, None, None)["note"]
    assert "not --top-k 4" in paper_row(ade, "convnext_b", 4, None)["note"]
    assert paper_row(get_dataset("coco-stuff-171"), "convnext_b", None, None)["note"] == "the paper reports no mIoU for COCO-Stuff-171"


def test_summary_puts_the_measured_miou_beside_the_claimed_one():
    metrics = {"mIoU": 31.7512, "fwIoU": 60.0, "mACC": 45.0, "pACC": 75.25}
    result = {"dataset": "ade20k-150", "images": 2000, "seconds": 100.0, "metrics": metrics, "errors": [],
              "paper": paper_row(get_dataset("ade20k-150"), "convnext_b", None, None)}
    lines = summary_lines(result)
    assert lines[1] == "mIoU 31.75  fwIoU 60.00  mACC 45.00  pACC 75.25"
    assert lines[2] == "paper (SED (CVPR 2024), Table 1, ConvNeXt-B, A-150): mIoU 31.8   measured: mIoU 31.8"

"""`sed-label eval` end to end: a tiny VOC-20 prepared from raw files, the tiny SED, a real local Ray.

The metrics it prints and writes must equal the ones computed here, directly, from `SEDPredictor`
labels on the same images: VOC-20, and VOC-20b, whose 39 PASCAL-Context prompts form its class
"background" (a prompt group), scored as the paper's protocol does (every prediction past the 20 VOC
classes counts as background).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import sed_model
from jobs.cli import app
from pipeline.datasets import get_dataset, prepare_dataset
from tests.helpers import TINY_CHECKPOINT

from .helpers import image_bytes

pytestmark = pytest.mark.usefixtures("local_ray")

SIZES = [(64, 48), (48, 64), (40, 40), (56, 56)]  # (width, height)
TOP_K = 1  # early rejection keeps the tiny model's decoder work small


def voc_raw_values(train_ids: np.ndarray) -> np.ndarray:
    """VOC-20 train ids back to SegmentationClassAug values: class c -> c + 1, 255 stays."""
    return np.where(train_ids == 255, 255, train_ids + 1).astype(np.uint8)


def independent_metrics(predictions: list[np.ndarray], truths: list[np.ndarray], num_classes: int) -> tuple[float, float]:
    """mIoU over the classes present in the ground truth, and pixel accuracy, 255 ignored."""
    prediction = np.concatenate([p.ravel() for p in predictions])
    truth = np.concatenate([t.ravel() for t in truths])
    valid = truth != 255
    ious = []
    for c in range(num_classes):
        in_truth = int((truth == c).sum())
        if not in_truth:
            continue
        true_positive = int(((prediction == c) & (truth == c)).sum())
        false_positive = int(((prediction == c) & (truth != c) & valid).sum())
        ious.append(true_positive / (in_truth + false_positive))
    return 100 * float(np.mean(ious)), 100 * float((prediction == truth)[valid].mean())


def voc_raw_folder(root: Path) -> Path:
    """An empty VOC2012 download's layout (images, augmented labels, the split's list)."""
    raw = root / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClassAug", "ImageSets/Segmentation"):
        (raw / folder).mkdir(parents=True)
    return raw


@pytest.fixture(scope="module")
def voc20_and_labels(tmp_path_factory, reference, tiny_pooling1):
    """Images 0 and 1: the ground truth is the model's own labels on the top half and noise below,
    so IoUs are neither 0 nor 100. Image 2 is a truncated JPEG; image 3 lies past --limit."""
    root = tmp_path_factory.mktemp("eval")
    raw = voc_raw_folder(root)
    predictor = sed_model.SEDPredictor(tiny_pooling1, top_k=TOP_K)
    predictor.set_taxonomy(get_dataset("voc20").prompts())
    rng = np.random.default_rng(0)
    ids, predictions, truths = [], [], []
    for i, (width, height) in enumerate(SIZES):
        image_id = f"2007_00000{i}"
        ids.append(image_id)
        data = image_bytes(width, height, seed=40 + i, fmt="JPEG")
        truth = np.full((height, width), 3, np.uint8)  # image 3: counted, it would add a class
        if i < 2:
            pixels = torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1)
            labels = predictor.label_batch([pixels])[0].labels.numpy()
            truth = labels.astype(np.uint8)
            truth[height // 2 :] = rng.choice([*range(20), 255], size=truth[height // 2 :].shape)
            predictions.append(labels)
            truths.append(truth)
        if i == 2:
            data = data[: len(data) // 2]
        (raw / "JPEGImages" / f"{image_id}.jpg").write_bytes(data)
        Image.fromarray(voc_raw_values(truth)).save(raw / "SegmentationClassAug" / f"{image_id}.png")
    (raw / "ImageSets/Segmentation/val.txt").write_text("\n".join(ids) + "\n")
    prepare_dataset("voc20", str(raw), str(root / "voc20"))
    return root, predictions, truths


def test_eval_metrics_equal_a_direct_confusion_matrix(voc20_and_labels, reference, tmp_path):
    root, predictions, truths = voc20_and_labels
    model_config = tmp_path / "tiny_clip.json"
    model_config.write_text(json.dumps(reference["clip_cfg"]))
    output = tmp_path / "metrics.json"
    command = [
        "eval", "--dataset", "voc20", "--root", str(root / "voc20"), "--model", str(model_config),
        "--weights", str(TINY_CHECKPOINT), "--top-k", str(TOP_K), "--limit", "3", "--output", str(output),
    ]
    result = CliRunner().invoke(app, command)
    # Image 2 cannot be decoded: reported, not counted, and the command ends with code 1.
    assert result.exit_code == 1, result.output
    assert "WARNING: 1 images failed" in result.output and "2007_000002" in result.output
    metrics = json.loads(output.read_text())
    assert metrics["images"] == 2 and metrics["images_in_dataset"] == 4 and metrics["limit"] == 3
    assert metrics["errors"][0]["image_id"] == "2007_000002" and "truncated" in metrics["errors"][0]["error"]

    expected_miou, expected_pacc = independent_metrics(predictions, truths, num_classes=20)
    assert 0 < expected_miou < 100
    assert metrics["metrics"]["mIoU"] == pytest.approx(expected_miou, abs=1e-3)
    assert metrics["metrics"]["pACC"] == pytest.approx(expected_pacc, abs=1e-3)
    assert f"mIoU {expected_miou:.2f}" in result.output
    assert "no claimed value: the model is not one of the paper's" in result.output and metrics["paper"]["mIoU"] is None
    assert metrics["top_k"] == TOP_K
    assert metrics["protocol"] == {"short_edge": 640, "max_size": 2560, "class_attention_pooling": 1, "templates": 80}
    assert "3/3 images" in result.output  # progress


def test_eval_of_an_unprepared_folder_says_how_to_prepare_it(tmp_path):
    result = CliRunner().invoke(
        app, ["eval", "--dataset", "ade20k-150", "--root", str(tmp_path), "--model", "convnext_b", "--weights", "w.pth"]
    )
    assert result.exit_code == 2
    assert "not a prepared dataset" in result.output and "sed-label prepare ade20k-150" in result.output


def test_voc20b_through_its_prompt_group_equals_the_papers_background_merge(tmp_path, reference, tiny_pooling1):
    raw = voc_raw_folder(tmp_path)
    predictor = sed_model.SEDPredictor(tiny_pooling1, top_k=TOP_K)
    predictor.set_taxonomy(get_dataset("voc20b").prompts())
    rng = np.random.default_rng(1)
    ids, predictions, truths = [], [], []
    for i, (width, height) in enumerate(SIZES[:2]):
        image_id = f"2008_00000{i}"
        data = image_bytes(width, height, seed=60 + i, fmt="JPEG")
        pixels = torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1)
        prompts = predictor.label_batch([pixels])[0].labels.numpy()
        merged = np.minimum(prompts, 20)  # the paper's VOC-20b protocol: prompts 20..58 are background
        assert (prompts > 20).any()  # some pixels won by a background prompt: the case is not vacuous
        truth = merged.astype(np.uint8)  # ids 0..19 are VOC classes, 20 background
        truth[height // 2 :] = rng.choice([*range(21), 255], size=truth[height // 2 :].shape)
        raw_truth = np.where(truth == 255, 255, np.where(truth == 20, 0, truth + 1)).astype(np.uint8)
        (raw / "JPEGImages" / f"{image_id}.jpg").write_bytes(data)
        Image.fromarray(raw_truth).save(raw / "SegmentationClassAug" / f"{image_id}.png")
        ids.append(image_id)
        predictions.append(merged)
        truths.append(truth)
    (raw / "ImageSets/Segmentation/val.txt").write_text("\n".join(ids) + "\n")
    prepare_dataset("voc20b", str(raw), str(tmp_path / "voc20b"))
    model_config = tmp_path / "tiny_clip.json"
    model_config.write_text(json.dumps(reference["clip_cfg"]))
    output = tmp_path / "metrics.json"
    command = [
        "eval", "--dataset", "voc20b", "--root", str(tmp_path / "voc20b"), "--model", str(model_config),
        "--weights", str(TINY_CHECKPOINT), "--top-k", str(TOP_K), "--output", str(output),
    ]
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 0, result.output
    metrics = json.loads(output.read_text())
    expected_miou, expected_pacc = independent_metrics(predictions, truths, num_classes=21)
    assert metrics["metrics"]["mIoU"] == pytest.approx(expected_miou, abs=1e-3)
    assert metrics["metrics"]["pACC"] == pytest.approx(expected_pacc, abs=1e-3)

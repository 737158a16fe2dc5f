"""The confusion-matrix evaluator against hand-computed matrices."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.metrics import SemSegEvaluator

CLASSES = ["sky", "road", "car"]


def evaluator(**kwargs) -> SemSegEvaluator:
    ev = SemSegEvaluator(CLASSES, **kwargs)
    # Ground truth: sky x4, road x3, car absent, ignore x1. Prediction: car predicted once.
    gt = np.array([[0, 0, 0, 0], [1, 1, 1, 255]])
    pred = np.array([[0, 0, 0, 1], [1, 1, 2, 0]])
    ev.process(pred, gt)
    return ev


def test_hand_computed_detectron2_semantics():
    results = evaluator().evaluate()
    # sky: tp 3, gt 4, pred 3 (the ignored pixel's prediction does not count) -> IoU 3/4.
    # road: tp 2, gt 3, pred 3 -> IoU 2/4. car: absent from the ground truth -> NaN, not averaged.
    assert results["IoU-sky"] == pytest.approx(75.0)
    assert results["IoU-road"] == pytest.approx(50.0)
    assert math.isnan(results["IoU-car"])
    assert results["mIoU"] == pytest.approx(62.5)
    assert results["ACC-sky"] == pytest.approx(75.0) and results["ACC-road"] == pytest.approx(200 / 3)
    assert results["mACC"] == pytest.approx((75 + 200 / 3) / 2)
    assert results["pACC"] == pytest.approx(500 / 7)
    assert results["fwIoU"] == pytest.approx(75 * 4 / 7 + 50 * 3 / 7)


def test_legacy_semantics_count_predicted_absent_classes_as_zero():
    results = evaluator(semantics="legacy").evaluate()
    assert results["IoU-car"] == 0.0
    assert results["mIoU"] == pytest.approx((75 + 50 + 0) / 3)


def test_streaming_equals_one_big_image_and_torch_inputs():
    rng = np.random.default_rng(0)
    gts = [rng.integers(0, 4, (5, 7)) for _ in range(3)]
    preds = [rng.integers(0, 3, (5, 7)) for _ in range(3)]
    gts = [np.where(g == 3, 255, g) for g in gts]
    streamed = SemSegEvaluator(CLASSES)
    for p, g in zip(preds, gts):
        streamed.process(torch.from_numpy(p), torch.from_numpy(g))
    whole = SemSegEvaluator(CLASSES)
    whole.process(np.concatenate(preds), np.concatenate(gts))
    np.testing.assert_array_equal(streamed.confusion, whole.confusion)
    assert streamed.evaluate() == pytest.approx(whole.evaluate(), nan_ok=True)


def test_16_bit_labels_with_their_own_ignore_value():
    names = [f"c{i}" for i in range(847)]
    ev = SemSegEvaluator(names, ignore_label=65535)
    gt = np.array([[846, 846], [65535, 0]], dtype=np.uint16)
    pred = np.array([[846, 0], [5, 0]], dtype=np.int64)
    ev.process(pred, gt)
    results = ev.evaluate()
    assert results["IoU-c846"] == pytest.approx(50.0) and results["IoU-c0"] == pytest.approx(50.0)
    assert results["mIoU"] == pytest.approx(50.0)


def test_unlabeled_predictions_are_misses_and_a_confusion_pair():
    ev = SemSegEvaluator(CLASSES)
    ev.process(np.array([0, 65535, 1, 0]), np.array([0, 0, 1, 1]))
    results = ev.evaluate()
    assert results["ACC-sky"] == pytest.approx(50.0)
    assert results["IoU-sky"] == pytest.approx(100 / 3)  # tp 1, gt 2, pred 2 -> 1/3
    pairs = ev.confusion_pairs()
    assert {(p["ground_truth"], p["predicted"]) for p in pairs} == {("sky", "(unlabeled)"), ("road", "sky")}
    assert all(p["pixels"] == 1 for p in pairs)


def test_confusion_pairs_are_sorted_by_cost():
    ev = SemSegEvaluator(CLASSES)
    ev.process(np.array([1, 1, 1, 2, 0]), np.array([0, 0, 0, 0, 0]))
    pairs = ev.confusion_pairs()
    assert [(p["predicted"], p["pixels"]) for p in pairs] == [("road", 3), ("car", 1)]
    assert pairs[0]["share_of_ground_truth"] == pytest.approx(0.6)


def test_bad_input_is_named():
    ev = SemSegEvaluator(CLASSES)
    with pytest.raises(ValueError, match=r"outside 0\.\.2.*\[7\]"):
        ev.process(np.array([0]), np.array([7]))
    with pytest.raises(ValueError, match=r"ground truth is 4x2, its image 3x2 \(width x height\)"):
        ev.process(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="semantics"):
        SemSegEvaluator(CLASSES, semantics="new")


def test_unlabeled_predictions_count_as_misses():
    """Pixels predicted as no class (below min_confidence, or won by a distractor) are misses."""
    evaluator = SemSegEvaluator(CLASSES)
    evaluator.process(np.array([[0, 65535, 3]]), np.array([[0, 1, 2]]))
    assert evaluator.confusion[len(CLASSES), 1] == 1 and evaluator.confusion[len(CLASSES), 2] == 1 and evaluator.confusion[0, 0] == 1

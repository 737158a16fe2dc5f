"""Semantic-segmentation metrics from a streamed confusion matrix, in detectron2's shape.

`SemSegEvaluator` follows detectron2's evaluator of the same name: `reset` / `process` / `evaluate`,
a bincount confusion matrix with the ignore label in its own bin, flat result keys (`mIoU`,
`IoU-<class>`, ...). Nothing but the (T+1) x (T+1) matrix is kept, so any number of images streams
through it.

Two semantics for the mean IoU:
- `"detectron2"` (detectron2 since July 2022, the paper's): the mean over classes present in the
  ground truth; a class only predicted does not count.
- `"legacy"` (detectron2 before): a class predicted but absent from the ground truth counts with
  IoU 0, as older papers computed it.
Predictions outside `0..T-1` (pixels left unlabeled by `min_confidence`) count as wrong for the
ground-truth class, in a bin of their own.

It is the one comparison of label maps with ground truth: `sed-label eval` (per image, summed on
the driver), validation during training, and the report's agreement with `--ground-truth` all
count through `process`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

Semantics = Literal["detectron2", "legacy"]


class SemSegEvaluator:
    """A confusion matrix of predicted and ground-truth label maps; predictions outside the classes
    (unlabeled pixels) count as misses."""

    def __init__(
        self,
        class_names: Sequence[str],
        ignore_label: int = 255,
        semantics: Semantics = "detectron2",
    ) -> None:
        if semantics not in ("detectron2", "legacy"):
            raise ValueError(f"semantics must be 'detectron2' or 'legacy', got {semantics!r}")
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.ignore_label = ignore_label
        self.semantics = semantics
        self.reset()

    def reset(self) -> None:
        # Rows: prediction (last row = unlabeled); columns: ground truth (last column = ignore).
        self.confusion = np.zeros((self.num_classes + 1, self.num_classes + 1), dtype=np.int64)

    def process(self, prediction: Any, ground_truth: Any) -> None:
        """Add one image: integer label maps of the same shape (numpy or torch).

        A ground truth of another size, or holding ids that are neither classes nor the ignore
        label, is a `ValueError` saying so.
        """
        prediction = np.asarray(prediction).astype(np.int64, copy=False)
        ground_truth = np.asarray(ground_truth).astype(np.int64, copy=False)
        if prediction.shape != ground_truth.shape:
            raise ValueError(
                f"ground truth is {_size(ground_truth.shape)}, its image {_size(prediction.shape)} (width x height)"
            )
        prediction, ground_truth = prediction.ravel(), ground_truth.ravel()
        n = self.num_classes
        gt = np.where(ground_truth == self.ignore_label, n, ground_truth)
        if ((gt < 0) | (gt > n)).any():
            bad = sorted(set(ground_truth[(gt < 0) | (gt > n)].tolist()))[:10]
            raise ValueError(f"ground truth holds labels outside 0..{n - 1} and the ignore label {self.ignore_label}: {bad}")
        pred = np.where((prediction < 0) | (prediction >= n), n, prediction)
        self.confusion += np.bincount((n + 1) * pred + gt, minlength=(n + 1) ** 2).reshape(n + 1, n + 1)

    def evaluate(self) -> dict[str, float]:
        """mIoU, fwIoU, mACC, pACC and per-class IoU/ACC, in percent (NaN for classes without data)."""
        n = self.num_classes
        valid_gt = self.confusion[:, :n]  # ignored ground truth left out
        tp = np.diagonal(self.confusion)[:n].astype(np.float64)
        pos_gt = valid_gt.sum(axis=0).astype(np.float64)  # includes pixels predicted as unlabeled
        pos_pred = valid_gt[:n].sum(axis=1).astype(np.float64)
        union = pos_gt + pos_pred - tp
        acc = np.full(n, np.nan)
        iou = np.full(n, np.nan)
        present = pos_gt > 0
        acc[present] = tp[present] / pos_gt[present]
        # detectron2: classes present in the ground truth; legacy: also those only predicted (IoU 0).
        counted = present & (union > 0) if self.semantics == "detectron2" else union > 0
        iou[counted] = tp[counted] / union[counted]
        miou = iou[counted].sum() / max(counted.sum(), 1)
        total = pos_gt.sum()
        weights = pos_gt / total if total else np.zeros(n)
        results = {
            "mIoU": 100 * miou,
            "fwIoU": 100 * float(np.nansum(iou[present] * weights[present])),
            "mACC": 100 * acc[present].sum() / max(present.sum(), 1),
            "pACC": 100 * tp.sum() / total if total else float("nan"),
        }
        for name, value in zip(self.class_names, iou):
            results[f"IoU-{name}"] = 100 * value
        for name, value in zip(self.class_names, acc):
            results[f"ACC-{name}"] = 100 * value
        return results

    def confusion_pairs(self, top: int = 10) -> list[dict[str, Any]]:
        """The (ground truth, prediction) class pairs that cost the most pixels, most first."""
        n = self.num_classes
        errors = self.confusion[:, :n].T.copy()  # rows: ground truth; columns: prediction (+ unlabeled)
        gt_pixels = errors.sum(axis=1)
        np.fill_diagonal(errors[:, :n], 0)
        order = np.argsort(errors, axis=None)[::-1][:top]
        pairs = []
        for flat in order:
            gt, pred = divmod(int(flat), n + 1)
            if errors[gt, pred] == 0:
                break
            pairs.append(
                {
                    "ground_truth": self.class_names[gt],
                    "predicted": self.class_names[pred] if pred < n else "(unlabeled)",
                    "pixels": int(errors[gt, pred]),
                    "share_of_ground_truth": float(errors[gt, pred] / gt_pixels[gt]),
                }
            )
        return pairs


def _size(shape: tuple[int, ...]) -> str:
    return "x".join(str(n) for n in shape[::-1])

"""Validation during training: the paper's evaluation protocol on labelled images, mIoU over all workers.

Each worker labels its share of the images (`items[rank::world]`) with `SEDPredictor` (short side
640, class-attention pooling 1x1, probabilities resized to the image, exact unless `top_k`) and
counts them into a `SemSegEvaluator`; the confusion matrices are summed over the workers
(`all_reduce`), so every worker ends with the same metrics, those of all the images.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

import sed_model

from ..metrics import SemSegEvaluator
from ..taxonomy import Taxonomy
from .data import LabelledData, TrainDataError, read_pair, validation_taxonomy

VALIDATION_METRICS = ("mIoU", "fwIoU", "mACC", "pACC")


def validate(
    model: sed_model.SED,
    text: torch.Tensor,
    taxonomy: Taxonomy,
    data: LabelledData,
    top_k: int | None,
    rank: int = 0,
    world: int = 1,
) -> dict[str, float]:
    """`val_mIoU`, `val_fwIoU`, `val_mACC`, `val_pACC` (percent) and `val_images` over all of `data`.

    With `world > 1` every worker must call it (the confusion matrices are summed collectively).
    The model is left in the training mode it came in.
    """
    scored = validation_taxonomy(taxonomy, data)
    evaluator = SemSegEvaluator(scored.classes, ignore_label=data.ignore_label)
    training = model.training
    predictor = sed_model.SEDPredictor(model, top_k=top_k)  # puts the model in eval mode
    predictor.set_taxonomy(list(taxonomy.prompts), text_features=text)
    try:
        for item in data.items[rank::world]:
            image, truth = read_pair(item, data.storage_options)
            prompt_labels = predictor.label_batch([torch.from_numpy(image).permute(2, 0, 1)])[0].labels
            labels = scored.output_labels(prompt_labels, unlabeled=len(scored.classes)).cpu().numpy()
            try:
                evaluator.process(labels, truth)
            except ValueError as exc:
                raise TrainDataError(f"validation label map {item.label_url}: {exc}") from exc
    finally:
        model.train(training)
    if world > 1 and dist.is_available() and dist.is_initialized():
        confusion = torch.from_numpy(evaluator.confusion).to(text.device)
        dist.all_reduce(confusion)
        evaluator.confusion = confusion.cpu().numpy()
    results = evaluator.evaluate()
    metrics = {f"val_{name}": float(results[name]) for name in VALIDATION_METRICS}
    metrics["val_images"] = len(data.items)
    return metrics

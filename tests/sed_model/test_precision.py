"""The bfloat16 inference mode: opt-in, float32 outputs, labels close to float32's."""

from __future__ import annotations

import pytest
import torch

import sed_model


def test_bfloat16_labels_mostly_agree_with_float32(tiny_pooling1, reference):
    image, text = reference["images"][0], reference["text_features"]
    exact = tiny_pooling1.predict_batch([image], text)[0]
    fast = tiny_pooling1.predict_batch([image], text, precision="bfloat16")[0]
    assert fast.probs.dtype == torch.float32 and fast.probs.shape == exact.probs.shape
    assert not torch.equal(fast.probs, exact.probs)  # it really ran in another precision
    assert (fast.probs - exact.probs).abs().max() < 0.05
    # The tiny model's random decoder has tiny margins between classes (88% agree here; chance is
    # 17%): this checks bfloat16 computes the same function, not how close a trained model gets.
    assert (fast.labels == exact.labels).float().mean() > 0.8


def test_bfloat16_early_rejection_reports_its_kept_classes(tiny_pooling1, reference, cer_cases):
    text = cer_cases["text_features"][:40]
    prediction = tiny_pooling1.predict_batch([reference["images"][1]], text, top_k=1, precision="bfloat16")[0]
    assert 0 < prediction.kept.numel() < len(text)
    assert torch.all(prediction.probs[[c for c in range(len(text)) if c not in prediction.kept.tolist()]] == 0)


def test_predictor_takes_the_precision_and_refuses_unknown_ones(tiny_pooling1, reference):
    with pytest.raises(ValueError, match="precision"):
        sed_model.SEDPredictor(tiny_pooling1, precision="float16")
    with pytest.raises(ValueError, match="precision"):
        tiny_pooling1.predict(reference["images"][0], reference["text_features"], precision="fp8")
    predictor = sed_model.SEDPredictor(tiny_pooling1, precision="bfloat16", short_edge=None)
    predictor.set_taxonomy(reference["classes"], text_features=reference["text_features"])
    labeling = predictor.label_batch([reference["images"][0]])[0]
    assert labeling.labels.shape == reference["images"][0].shape[-2:]

"""Dropping the text tower: less memory in labelling workers, the same labels, a clear error."""

import pytest
import torch

from tests.helpers import tiny_model


def test_dropped_text_tower_frees_its_weights_and_keeps_the_labels(reference, cer_cases):
    model = tiny_model(reference["clip_cfg"], 1)
    text = cer_cases["text_features"][:6]
    images = [reference["images"][0]]
    before = model.predict_batch(images, text, top_k=2)[0]
    params = sum(p.numel() for p in model.parameters())
    text_params = sum(p.numel() for p in model.backbone.clip.transformer.parameters())

    model.drop_text_tower()

    assert sum(p.numel() for p in model.parameters()) <= params - text_params
    after = model.predict_batch(images, text, top_k=2)[0]
    torch.testing.assert_close(after.probs, before.probs, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="text tower was dropped"):
        model.encode_classes(["sky"], ["a photo of a {}."] * model.config.num_templates)

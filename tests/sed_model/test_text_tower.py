"""Dropping the text tower: less memory in labelling workers, the same labels, a clear error."""

import pytest
import torch

import sed_model

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


def test_text_tower_cut_after_the_longest_prompt_equals_the_full_context(reference):
    """The causal tower pools the end-of-text token: the padding after it changes nothing, so
    `encode_text` runs only up to the longest prompt (short and long prompts in one batch)."""
    import open_clip

    model = sed_model.build_sed(sed_model.SEDConfig(clip_model=reference["clip_cfg"])).eval()
    prompts = ["a photo of a sky.", "a " + "very " * 40 + "long prompt about a road.", "tree"]
    tokens = open_clip.tokenize(prompts, context_length=model.backbone.context_length)
    assert int((tokens != 0).sum(dim=1).max()) < tokens.shape[1]  # not vacuous: there is padding to cut,
    assert model.backbone.clip.attn_mask is not None and model.backbone.clip.text_pool_type == "argmax"  # and the cut runs
    with torch.no_grad():
        full = model.backbone.clip.encode_text(tokens, normalize=True)
        cut = model.backbone.encode_text(tokens)
    torch.testing.assert_close(cut, full, atol=1e-6, rtol=0)

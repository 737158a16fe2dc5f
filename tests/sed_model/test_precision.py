"""The bfloat16 inference mode: opt-in, float32 outputs, labels close to float32's."""

from __future__ import annotations

import pytest
import torch

import sed_model
from sed_model.cpu import kernels as cpu_kernels
from tests.helpers import require_cpu_kernels


def test_bfloat16_labels_mostly_agree_with_float32(tiny_pooling1, reference):
    image, text = reference["images"][0], reference["text_features"]
    exact = tiny_pooling1.predict_batch([image], text)[0]
    fast = tiny_pooling1.predict_batch([image], text, precision="bfloat16")[0]
    assert fast.probs.dtype == torch.float32 and fast.probs.shape == exact.probs.shape
    assert not torch.equal(fast.probs, exact.probs)  # it really ran in another precision
    # The tiny model's random decoder has tiny margins between classes (98% agree here, 88% with the
    # decoder in bfloat16 too, where the kernels are not built; chance is 17%): this checks bfloat16
    # computes the same function, not how close a trained model gets.
    backbone_only = tiny_pooling1.decoder_precision("bfloat16") == "float32"
    assert (fast.probs - exact.probs).abs().max() < (0.01 if backbone_only else 0.05)
    assert (fast.labels == exact.labels).float().mean() > (0.95 if backbone_only else 0.8)


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


def test_bfloat16_on_a_cpu_runs_only_the_backbone_in_bfloat16(tiny_pooling1, reference, monkeypatch):
    """The fused kernels are float32 only (and faster there than bfloat16 operators): the decoder
    takes the bfloat16 backbone's features in float32, through the kernels."""
    require_cpu_kernels()
    model = tiny_pooling1
    assert model.decoder_precision("bfloat16") == "float32"
    with cpu_kernels.disabled():
        assert model.decoder_precision("bfloat16") == "bfloat16"
    assert model.decoder_precision("float32") == "float32"
    image, text = reference["images"][0], reference["text_features"]
    with torch.no_grad():
        with model.autocast("bfloat16"):
            features = model.dense_features([image])
        cost = sed_model.cost_volume(features["clip_vis_dense"].float(), text)
        appearance = tuple(features[name].float() for name in ("res4", "res3", "res2"))
        expected = torch.sigmoid(model.decoder(cost, appearance, model.pooling, None)[0].logits)
    calls = []
    kernel = cpu_kernels.pointwise_mlp
    monkeypatch.setattr(cpu_kernels, "pointwise_mlp", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    low = model.predict_low_res([image], text, precision="bfloat16")[0]
    assert calls, "the decoder did not run the kernels"
    torch.testing.assert_close(low.probs, expected, rtol=0, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a caller's autocast does not reach the decoder
        inside = model.predict_low_res([image], text, precision="bfloat16")[0]
    torch.testing.assert_close(inside.probs, expected, rtol=0, atol=1e-6)


def test_auto_precision_is_bfloat16_only_where_native(monkeypatch):
    from sed_model.cpu import layout

    cpu = torch.device("cpu")
    assert sed_model.inference_precision("float32", cpu) == ("float32", "as asked")
    assert sed_model.inference_precision("bfloat16", cpu)[0] == "bfloat16"
    monkeypatch.setattr(layout, "onednn_bfloat16_native", lambda: True)
    assert sed_model.inference_precision("auto", cpu)[0] == "bfloat16"
    monkeypatch.setattr(layout, "onednn_bfloat16_native", lambda: False)
    precision, why = sed_model.inference_precision("auto", cpu)
    assert precision == "float32" and "AVX512-BF16" in why
    with pytest.raises(ValueError, match="precision"):
        sed_model.inference_precision("float16", cpu)


def test_auto_precision_follows_this_cpus_flags(tiny_pooling1):
    from sed_model.cpu import layout

    predictor = sed_model.SEDPredictor(tiny_pooling1, precision="auto")
    native = bool({"avx512_bf16", "amx_bf16"} & layout.cpu_flags())
    assert predictor.precision == ("bfloat16" if native else "float32")

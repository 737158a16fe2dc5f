"""Parity with what the paper's own code computed from the tiny checkpoint (../shared/reference)."""

from __future__ import annotations

import pytest
import torch

import sed_model
from tests.helpers import tiny_model

ATOL = 1e-4


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = ATOL) -> None:
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


def test_text_features(tiny_pooling2, reference):
    assert list(sed_model.IMAGENET_TEMPLATES) == reference["templates"]
    text = tiny_pooling2.encode_classes(reference["classes"])
    assert_close(text, reference["text_features"])


def test_text_features_of_ade150(tiny_pooling2, cer_cases):
    assert_close(tiny_pooling2.encode_classes(cer_cases["classes"]), cer_cases["text_features"])


@pytest.mark.parametrize("index", [0, 1])
def test_dense_features(tiny_pooling2, reference, index):
    with torch.no_grad():
        features = tiny_pooling2.dense_features(reference["images"][index])
    for name in ("res2", "res3", "res4", "res5", "clip_vis_dense"):
        assert_close(features[name], reference["dense_features"][index][name])


@pytest.mark.parametrize("index", [0, 1])
def test_eval_logits_and_probs(tiny_pooling2, reference, index, cpu_kernel_route):
    image, text = reference["images"][index], reference["text_features"]
    with torch.no_grad():
        logits = tiny_pooling2.forward_logits(image[None], text)
    for actual, expected in zip(logits, reference["eval_logits"][index]):
        assert_close(actual[0], expected)
    assert_close(tiny_pooling2.predict(image, text), reference["eval_probs"][index])


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("index", [0, 1])
def test_early_rejection_probs(tiny_pooling2, reference, index, top_k, cpu_kernel_route):
    probs = tiny_pooling2.predict(reference["images"][index], reference["text_features"], top_k=top_k)
    assert_close(probs, reference[f"cer_top{top_k}_probs"][index])


def check_cer_case(model, images, text, case):
    prediction = model.predict_batch([images[case["image_index"]]], text, top_k=case["top_k"])[0]
    for stage in ("head0", "head1", "head2"):
        assert prediction.kept_after[stage].tolist() == case[f"kept_after_{stage}"], stage
    kept = case["kept_after_head2"]
    assert_close(prediction.probs[kept], case["probs_of_kept"])
    rejected = torch.ones(len(text), dtype=torch.bool)
    rejected[kept] = False
    assert torch.count_nonzero(prediction.probs[rejected]) == 0


def test_cer_cases_reject_after_every_head(tiny_pooling2, reference, cer_cases, cpu_kernel_route):
    stages_that_drop = set()
    for case in cer_cases["cases"]:
        check_cer_case(tiny_pooling2, reference["images"], cer_cases["text_features"], case)
        sizes = [150, len(case["kept_after_head0"]), len(case["kept_after_head1"]), len(case["kept_after_head2"])]
        stages_that_drop |= {i for i in range(3) if sizes[i + 1] < sizes[i]}
    assert stages_that_drop == {0, 1, 2}


def test_training_forward_loss_and_gradients(reference):
    model = tiny_model(reference["clip_cfg"], eval_pooling=1).train()
    logits = model.forward_logits(torch.stack(reference["train_images"]), reference["text_features"])
    for actual, expected in zip(logits, reference["train_logits"]):
        assert_close(actual, expected)
    losses = sed_model.sed_loss(logits, reference["train_target"])
    assert set(losses) == set(reference["train_losses"])
    for name, value in reference["train_losses"].items():
        assert abs(losses[name].item() - value) < ATOL, name
    sum(losses.values()).backward()
    assert len(reference["train_grad_norms"]) > 100
    for name, expected in reference["train_grad_norms"].items():
        grad = model.decoder.get_parameter(name).grad
        assert grad is not None, name
        torch.testing.assert_close(grad.norm().item(), expected, rtol=2e-4, atol=1e-9, msg=name)


class TestEvaluationProtocol:
    def test_pooling_is_1x1(self, eval_protocol):
        assert eval_protocol["pooling"] == [1, 1]
        assert sed_model.SEDConfig().eval_pooling == 1 and sed_model.SEDConfig().train_pooling == 2

    @pytest.mark.parametrize("index", [0, 1])
    def test_eval_and_early_rejection_probs(self, tiny_pooling1, reference, eval_protocol, index, cpu_kernel_route):
        image, text = reference["images"][index], reference["text_features"]
        assert_close(tiny_pooling1.predict(image, text), eval_protocol["eval_probs"][index])
        assert_close(tiny_pooling1.predict(image, text, top_k=1), eval_protocol["cer_top1_probs"][index])

    @pytest.mark.parametrize("index", [0, 1])
    def test_protocol_resize(self, tiny_pooling1, reference, eval_protocol, index):
        image = reference["images"][index]
        resized = sed_model.resize_shortest_edge(image)
        assert list(resized.shape[1:]) == list(eval_protocol["protocol_sizes"][index])
        probs = tiny_pooling1.predict(resized, reference["text_features"], output_size=tuple(image.shape[1:]))
        assert_close(probs, eval_protocol["protocol_probs"][index])

    @pytest.mark.parametrize("index", [0, 1])
    def test_predictor_follows_the_protocol_by_default(self, tiny_pooling1, reference, eval_protocol, index):
        predictor = sed_model.SEDPredictor(tiny_pooling1)
        predictor.set_taxonomy(reference["classes"], text_features=reference["text_features"])
        prediction = predictor.predict(reference["images"][index])
        assert_close(prediction.probs, eval_protocol["protocol_probs"][index])

    def test_wide_cases(self, tiny_pooling1, reference, cer_cases, eval_protocol, cpu_kernel_route):
        for case in eval_protocol["wide_cases"]:
            check_cer_case(tiny_pooling1, reference["images"], cer_cases["text_features"], case)

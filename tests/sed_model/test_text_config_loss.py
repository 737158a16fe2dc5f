"""Text encoding, configuration and loss: behaviour beyond the parity fixtures."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sed_model
from sed_model.config import resolve_clip_config
from sed_model.transforms import shortest_edge_size


class TestText:
    def test_synonyms_are_averaged_per_template_then_normalised(self, tiny_pooling1):
        templates = sed_model.IMAGENET_TEMPLATES
        both = tiny_pooling1.encode_classes(["person, human"], templates)[0]
        person = tiny_pooling1.encode_classes(["person"], templates)[0]
        human = tiny_pooling1.encode_classes(["human"], templates)[0]
        torch.testing.assert_close(both, F.normalize(person + human, dim=-1), atol=1e-6, rtol=0)
        torch.testing.assert_close(both.norm(dim=-1), torch.ones(80))

    def test_custom_templates_must_match_the_model(self, tiny_pooling1):
        with pytest.raises(sed_model.TaxonomyError, match="exactly 80 prompt templates"):
            tiny_pooling1.encode_classes(["sky"], ["a photo of a {}."])

    @pytest.mark.parametrize(
        ("classes", "templates", "message"),
        [
            ([], sed_model.IMAGENET_TEMPLATES, "non-empty"),
            (["sky", " "], sed_model.IMAGENET_TEMPLATES, "class 1 is empty"),
            (["sky", "road", "sky"], sed_model.IMAGENET_TEMPLATES, "class 2 'sky' duplicates class 0"),
            (["sky"], ["a photo"] * 80, "template 0 must be a string containing"),
        ],
    )
    def test_bad_taxonomy_is_named(self, tiny_pooling1, classes, templates, message):
        with pytest.raises(sed_model.TaxonomyError, match=message):
            tiny_pooling1.encode_classes(classes, templates)

    def test_a_class_embeds_the_same_whatever_else_is_encoded_with_it(self, tiny_pooling1):
        """Each class is its own batch, so slices of a taxonomy encoded apart (the job's text tasks)
        give the whole taxonomy's embeddings bit for bit (a long and a short prompt set the length
        a shared batch would be cut to)."""
        classes = ["sky", "a very long name of a rather unusual class of things", "person, human", "road"]
        whole = tiny_pooling1.encode_classes(classes)
        apart = torch.cat([tiny_pooling1.encode_classes(classes[:1]), tiny_pooling1.encode_classes(classes[1:3]), tiny_pooling1.encode_classes(classes[3:])])
        assert torch.equal(whole, apart)

    def test_taxonomy_hash(self):
        base = sed_model.taxonomy_hash(["sky", "road"], sed_model.IMAGENET_TEMPLATES)
        assert base == sed_model.taxonomy_hash(("sky", "road"), list(sed_model.IMAGENET_TEMPLATES))
        assert base != sed_model.taxonomy_hash(["road", "sky"], sed_model.IMAGENET_TEMPLATES)
        assert base != sed_model.taxonomy_hash(["sky", "road"], sed_model.IMAGENET_TEMPLATES[:79])


class TestConfig:
    def test_presets_name_the_papers_backbones(self):
        assert resolve_clip_config("convnext_b")[1:] == ("convnext_base_w_320", "laion_aesthetic_s13b_b82k")
        assert resolve_clip_config("convnext_l")[1:] == ("convnext_large_d_320", "laion2b_s29b_b131k_ft_soup")

    def test_unknown_preset_lists_known_ones(self):
        with pytest.raises(sed_model.UnknownModelError, match=r"'convnext_xxl'.*\['convnext_b', 'convnext_l'\]"):
            sed_model.build_sed(sed_model.SEDConfig(clip_model="convnext_xxl"))

    def test_non_convolutional_open_clip_model_is_refused(self):
        with pytest.raises(sed_model.UnknownModelError, match="not a timm ConvNeXt"):
            resolve_clip_config("ViT-B-32")

    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [({"image_size": 700}, "multiple of 32"), ({"eval_pooling": 0}, "eval_pooling"), ({"guidance_dims": (128, 16, 8)}, "guidance width")],
    )
    def test_invalid_values(self, kwargs, message):
        with pytest.raises(ValueError, match=message):
            sed_model.SEDConfig(**kwargs)

    def test_description_round_trip(self, reference):
        config = sed_model.SEDConfig(clip_model=reference["clip_cfg"], eval_pooling=2)
        assert sed_model.SEDConfig.from_description(config.describe()) == config


class TestLoss:
    def test_ignored_pixels_are_negatives_by_default_and_excludable(self):
        torch.manual_seed(0)
        logits = [torch.randn(1, 3, 4, 4) for _ in range(4)]
        targets = torch.tensor([[[0, 1], [2, 255]]])
        size = targets.shape[-2:]
        default = sed_model.sed_loss(logits, targets)
        excluded = sed_model.sed_loss(logits, targets, exclude_ignored=True)
        for i, output in enumerate(logits):
            up = F.interpolate(output, size=size, mode="bilinear", align_corners=False)
            one_hot = torch.zeros(1, 3, 2, 2)
            one_hot[0, 0, 0, 0] = one_hot[0, 1, 0, 1] = one_hot[0, 2, 1, 0] = 1
            per_pixel = F.binary_cross_entropy_with_logits(up, one_hot, reduction="none")
            torch.testing.assert_close(default[f"loss_sem_seg_{i}"], per_pixel.mean())
            torch.testing.assert_close(excluded[f"loss_sem_seg_{i}"], per_pixel[..., [0, 0, 1], [0, 1, 0]].mean())

    def test_out_of_range_labels_are_named(self):
        with pytest.raises(ValueError, match=r"outside 0\.\.2.*\[3\]"):
            sed_model.sed_loss([torch.zeros(1, 3, 2, 2)] * 4, torch.tensor([[[0, 3], [1, 255]]]))


class TestPredictor:
    def test_predict_before_taxonomy_is_an_error(self, tiny_pooling1, reference):
        with pytest.raises(RuntimeError, match="set_taxonomy"):
            sed_model.SEDPredictor(tiny_pooling1).predict(reference["images"][0])

    def test_batch_of_sizes_and_kept_classes(self, tiny_pooling1, reference):
        predictor = sed_model.SEDPredictor(tiny_pooling1, top_k=1, short_edge=None)
        predictor.set_taxonomy(reference["classes"])
        torch.testing.assert_close(predictor.text_features, reference["text_features"], atol=1e-4, rtol=0)
        predictions = predictor.predict_batch(reference["images"])
        for image, prediction in zip(reference["images"], predictions):
            assert prediction.probs.shape == (6, *image.shape[1:])
            assert prediction.labels.shape == image.shape[1:]
            assert set(prediction.labels.unique().tolist()) <= set(prediction.kept.tolist())

    @pytest.mark.parametrize("top_k", [None, 2])
    def test_label_batch_equals_argmax_of_probabilities(self, tiny_pooling1, reference, cer_cases, top_k):
        predictor = sed_model.SEDPredictor(tiny_pooling1, top_k=top_k)
        predictor.set_taxonomy(cer_cases["classes"][:30], text_features=cer_cases["text_features"][:30])
        for prediction, labeling in zip(predictor.predict_batch(reference["images"]), predictor.label_batch(reference["images"])):
            probs = prediction.probs
            assert torch.equal(labeling.labels, probs.argmax(dim=0))
            torch.testing.assert_close(labeling.confidence, probs.max(dim=0).values)
            assert torch.equal(labeling.kept, prediction.kept)

    @pytest.mark.parametrize("top_k", [None, 2])
    def test_large_images_are_labelled_in_bands_of_rows_with_the_same_labels(self, tiny_pooling1, reference, cer_cases, top_k, monkeypatch):
        predictor = sed_model.SEDPredictor(tiny_pooling1, top_k=top_k)
        predictor.set_taxonomy(cer_cases["classes"][:30], text_features=cer_cases["text_features"][:30])
        image = reference["images"][0]
        whole = predictor.label_batch([image], runner_up=True, margins=True)[0]
        resized = []
        original = sed_model.model.RowResize.rows
        monkeypatch.setattr(sed_model.model.RowResize, "rows", lambda self, maps, out, width, offset=0: resized.append(out) or original(self, maps, out, width, offset))
        monkeypatch.setattr(sed_model.model, "RESIZED_BYTES", 16 * 4 * image.shape[2] * 7)  # 7 rows of 16 classes
        banded = predictor.label_batch([image], runner_up=True, margins=True)[0]
        assert len({(out.start, out.stop) for out in resized}) == -(-image.shape[1] // 7)  # every band, once per chunk
        assert (banded.labels == whole.labels).float().mean() > 0.9999 and (banded.runner_up == whole.runner_up).float().mean() > 0.999
        torch.testing.assert_close(banded.confidence, whole.confidence, atol=1e-5, rtol=0)  # float32 rounding
        assert torch.equal(banded.margin, whole.margin)  # one map: resized in one step either way

    @pytest.mark.parametrize("top_k", [None, 2])
    @pytest.mark.parametrize("class_chunk", [16, 3, 1])
    def test_runner_up_is_the_second_of_the_probabilities_and_leaves_the_labels_alone(self, tiny_pooling1, reference, cer_cases, top_k, class_chunk):
        predictor = sed_model.SEDPredictor(tiny_pooling1, top_k=top_k)
        predictor.set_taxonomy(cer_cases["classes"][:30], text_features=cer_cases["text_features"][:30])
        plain = predictor.label_batch(reference["images"])
        prepared, sizes = predictor._inputs(reference["images"])
        both = predictor.model.label_batch(prepared, predictor.text_features, top_k, output_sizes=sizes, class_chunk=class_chunk, runner_up=True)
        for prediction, alone, labeling in zip(predictor.predict_batch(reference["images"]), plain, both):
            assert torch.equal(labeling.labels, alone.labels) and torch.equal(labeling.confidence, alone.confidence)
            kept = prediction.probs[prediction.kept]  # rejected classes are exactly 0: never second among kept ones
            masked = kept.scatter(0, kept.argmax(dim=0, keepdim=True), -1.0)
            assert torch.equal(labeling.runner_up, prediction.kept[masked.argmax(dim=0)])
        assert plain[0].runner_up is None

    @pytest.mark.parametrize("top_k", [None, 4])
    @pytest.mark.parametrize("class_chunk", [16, 3, 1])
    def test_grouped_runner_up_is_the_best_class_of_another_group(self, tiny_pooling1, reference, cer_cases, top_k, class_chunk):
        predictor = sed_model.SEDPredictor(tiny_pooling1, top_k=top_k)
        predictor.set_taxonomy(cer_cases["classes"][:12], text_features=cer_cases["text_features"][:12])
        groups = torch.tensor([0, 1, 0, 2, 2, 3, 1, 4, 0, 5, 5, 6])  # classes 0, 2 and 8 are one concept, ...
        prepared, sizes = predictor._inputs(reference["images"])
        both = predictor.model.label_batch(
            prepared, predictor.text_features, top_k, output_sizes=sizes, class_chunk=class_chunk, runner_up=True, class_groups=groups
        )
        for prediction, labeling in zip(predictor.predict_batch(reference["images"]), both):
            kept = prediction.probs[prediction.kept]
            assert torch.equal(labeling.labels, prediction.kept[kept.argmax(dim=0)])
            kept_groups = groups[prediction.kept]
            rivals = kept.masked_fill(kept_groups[:, None, None] == groups[labeling.labels][None], -1.0)
            has_rival = rivals.max(dim=0).values >= 0
            expected = torch.where(has_rival, prediction.kept[rivals.argmax(dim=0)], torch.full_like(labeling.labels, -1))
            assert torch.equal(labeling.runner_up, expected)
            assert (groups[labeling.runner_up[has_rival]] != groups[labeling.labels[has_rival]]).all()


def test_shortest_edge_size_follows_detectron2():
    assert shortest_edge_size(240, 320) == (640, 853)
    assert shortest_edge_size(100, 1000) == (256, 2560)  # long side capped at 2560
    assert shortest_edge_size(640, 640) == (640, 640)

"""Taxonomies with prompt groups and distractors: their structure, and labels in output classes that
equal the public predictor's on the flat prompt list, mapped (a group's probability is the maximum
over its prompts'; a pixel won by a distractor is unlabeled)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import sed_model
from pipeline.infer import UNLABELED, SEDInference
from pipeline.model_loading import load_model
from pipeline.taxonomy import DISTRACTOR, Taxonomy, load_taxonomy
from schemas import LOW_MARGIN, ModelSpec, TaxonomySpec
from tests.helpers import TINY_CHECKPOINT


def grouped(reference: dict) -> tuple[Taxonomy, list[int]]:
    """The reference prompts as two groups, a plain class and two distractors; and, per prompt of
    the taxonomy, its index among the reference's classes (to reorder their text features)."""
    wall, sky, bed, person, drawers, light = reference["classes"]
    taxonomy = Taxonomy.build(
        [{"name": "room", "prompts": [wall, bed, drawers]}, sky, {"name": "people", "prompts": [person]}],
        [light],
        tuple(reference["templates"]),
    )
    order = [list(reference["classes"]).index(p) for p in taxonomy.prompts]
    return taxonomy, order


def test_structure_and_hash(reference):
    taxonomy, _ = grouped(reference)
    assert taxonomy.classes == ("room", "sky", "people")
    assert taxonomy.prompts == ("wall", "bed ", "chest of drawers", "sky", "person, human", "traffic light")
    assert taxonomy.prompt_class == (0, 0, 0, 1, 2, DISTRACTOR) and taxonomy.distractors == ("traffic light",)
    assert taxonomy.structure()["classes"][0] == {"name": "room", "prompts": ["wall", "bed ", "chest of drawers"]}
    flat = Taxonomy.build(list(reference["classes"]), [], tuple(reference["templates"]))
    # A flat taxonomy keeps the hash it always had; any change of structure changes it.
    assert flat.is_flat and flat.hash == sed_model.taxonomy_hash(reference["classes"], reference["templates"])
    moved = Taxonomy.build([{"name": "room", "prompts": ["wall", "bed "]}, "sky", "chest of drawers"], [], taxonomy.templates)
    as_distractor = Taxonomy.build([{"name": "room", "prompts": ["wall", "bed "]}, "sky"], ["chest of drawers"], taxonomy.templates)
    assert len({taxonomy.hash, flat.hash, moved.hash, as_distractor.hash}) == 4


@pytest.mark.parametrize(
    "classes, distractors, message",
    [
        (["road", {"name": "street", "prompts": ["road"]}], [], "prompt 'road' appears twice: in class 'road' and in class 'street'"),
        (["road"], ["road"], "prompt 'road' appears twice: in class 'road' and in the distractors"),
        (["road", {"name": "road", "prompts": ["street"]}], [], "duplicate class name 'road'"),
        ([{"name": "vegetation", "prompts": []}], [], "group 'vegetation' has no prompts"),
        ([], [], "at least one class"),
    ],
)
def test_bad_structures_are_refused_naming_the_entry(classes, distractors, message):
    with pytest.raises(ValueError, match=message):
        TaxonomySpec(classes=classes, distractors=distractors)


def test_a_json_file_may_hold_groups_and_its_problems_are_named(tmp_path):
    (tmp_path / "classes.json").write_text('["road", {"name": "green", "prompts": ["tree", "grass"]}]')
    taxonomy = load_taxonomy(TaxonomySpec(classes=str(tmp_path / "classes.json"), distractors=["sky"]))
    assert taxonomy.classes == ("road", "green") and taxonomy.prompts == ("road", "tree", "grass", "sky")
    (tmp_path / "twice.json").write_text('["tree", {"name": "green", "prompts": ["tree"]}]')
    with pytest.raises(sed_model.TaxonomyError, match="prompt 'tree' appears twice"):
        load_taxonomy(TaxonomySpec(classes=str(tmp_path / "twice.json")))


def images() -> list[torch.Tensor]:
    rng = np.random.default_rng(3)
    return [torch.from_numpy(rng.integers(0, 255, (3, h, w), dtype=np.uint8)) for h, w in ((48, 64), (64, 40))]


@pytest.mark.parametrize("top_k", [None, 2])
@pytest.mark.parametrize("min_confidence", [0.0, 0.5])
def test_labels_equal_the_predictor_on_the_flat_prompts_mapped(reference, top_k, min_confidence):
    taxonomy, order = grouped(reference)
    text = reference["text_features"][order]
    model = {"clip_model": reference["clip_cfg"], "weights": str(TINY_CHECKPOINT), "image_size": 64}
    loaded, checkpoint_hash = load_model(ModelSpec(**model))
    inference = SEDInference(model, {"top_k": top_k, "min_confidence": min_confidence, "short_edge": None}, taxonomy, text.numpy(), checkpoint_hash)
    predictor = sed_model.SEDPredictor(loaded, top_k=top_k, short_edge=None)
    predictor.set_taxonomy(list(taxonomy.prompts), text_features=text)

    pictures = images()
    pixels = np.empty(len(pictures), dtype=object)
    pixels[:] = [p.permute(1, 2, 0).numpy() for p in pictures]
    ok = np.array(["ok"] * len(pictures), dtype=object)
    batch = {"image_index": np.arange(len(pictures)), "status": ok, "error": np.array([""] * len(pictures), dtype=object), "image": pixels}
    out = inference(batch)
    for i, picture in enumerate(pictures):
        flat = predictor.label_batch([picture])[0]
        prompt_labels, confidence = flat.labels.numpy(), flat.confidence.numpy()
        classes = np.array([c if c != DISTRACTOR else -1 for c in taxonomy.prompt_class])[prompt_labels]
        distractor = classes == -1
        kept = (confidence >= min_confidence) & ~distractor
        expected = np.where(kept, classes, int(UNLABELED))
        np.testing.assert_array_equal(out["label_map"][i], expected)
        assert out["distractor_area"][i] == distractor.sum() and out["unlabeled_area"][i] == (~kept & ~distractor).sum()
        present = sorted(set(classes[kept].tolist()))
        assert out["class_ids"][i].tolist() == present
        for k, c in enumerate(present):
            np.testing.assert_allclose(out["mean_probs"][i][k], confidence[kept & (classes == c)].mean(), rtol=1e-5)
            np.testing.assert_allclose(out["max_probs"][i][k], confidence[kept & (classes == c)].max(), rtol=1e-6)
        # The group "room" names its prompt that won most of its pixels; one-prompt classes name none.
        top = dict(zip(present, json.loads(out["top_prompts"][i])))
        if 0 in top:
            winners = prompt_labels[kept & (classes == 0)]
            assert top[0] == taxonomy.prompts[int(np.bincount(winners, minlength=3)[:3].argmax())]
        assert all(top[c] is None for c in present if c != 0)
        # Not vacuous: the distractor and several prompts of "room" win pixels.
        assert distractor.any() and len(set(prompt_labels[classes == 0].tolist())) > 1
        assert out["unlabeled_area"][i] > 0 if min_confidence else out["unlabeled_area"][i] == 0


@pytest.mark.parametrize("top_k", [None, 2])
def test_margins_are_between_the_best_two_output_classes(reference, top_k):
    """A pixel's margin: its class's probability (a group's = its best prompt's) minus the best other
    class's (each distractor a class of its own; 0 if no other was kept)."""
    taxonomy, order = grouped(reference)
    text = reference["text_features"][order]
    model = {"clip_model": reference["clip_cfg"], "weights": str(TINY_CHECKPOINT), "image_size": 64}
    loaded, checkpoint_hash = load_model(ModelSpec(**model))
    settings = {"top_k": top_k, "short_edge": None}
    inference = SEDInference(model, settings, taxonomy, text.numpy(), checkpoint_hash, margin_maps=True)
    predictor = sed_model.SEDPredictor(loaded, top_k=top_k, short_edge=None)
    predictor.set_taxonomy(list(taxonomy.prompts), text_features=text)
    pictures = images()
    pixels = np.empty(len(pictures), dtype=object)
    pixels[:] = [p.permute(1, 2, 0).numpy() for p in pictures]
    n = len(pictures)
    out = inference({"image_index": np.arange(n), "status": np.array(["ok"] * n, dtype=object), "error": np.array([""] * n, dtype=object), "image": pixels})
    concept = taxonomy.prompt_groups()
    prepared, sizes = predictor._inputs(pictures)
    for i, low in enumerate(predictor.model.predict_low_res(prepared, text, top_k)):
        # At the model's output resolution, over the kept prompts, then resized as the probabilities are.
        kept_concepts = concept[low.kept]
        per_concept = torch.stack([low.probs[kept_concepts == c].max(dim=0).values for c in kept_concepts.unique()])
        per_concept = torch.cat([per_concept, torch.zeros_like(per_concept[:1])])  # no rival kept: the margin is the best's
        top_two = per_concept.topk(2, dim=0).values
        low_margin = top_two[0] - top_two[1]
        margin = torch.nn.functional.interpolate(low_margin[None, None], size=sizes[i], mode="bilinear", align_corners=False)[0, 0].numpy()
        assert out["mean_margin"][i] == pytest.approx(margin.mean(), rel=1e-5)
        assert out["low_margin_share"][i] == pytest.approx((margin < LOW_MARGIN).mean())
        np.testing.assert_array_equal(out["margin_map"][i], np.round(np.clip(margin, 0, 1) * 255).astype(np.uint8))
        # Not vacuous: margins vary, and the groups matter (a prompt's synonym is not its rival).
        prompt_top_two = torch.cat([low.probs, torch.zeros_like(low.probs[:1])]).topk(2, dim=0).values
        assert margin.std() > 0 and not torch.allclose(low_margin, prompt_top_two[0] - prompt_top_two[1])

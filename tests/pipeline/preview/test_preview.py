"""The preview's measures: its sample, confusable prompts (text and runner-up), time and cost estimates."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.preview.run import duration, estimates, runner_up_pairs, sample_indices, similar_prompts
from pipeline.taxonomy import Taxonomy
from schemas import JobSpec

TEMPLATES = ("a photo of a {}.",)


def taxonomy() -> Taxonomy:
    # prompts: 0 tree, 1 bush (group green), 2 road, 3 street (two plain classes), 4 wall (distractor)
    return Taxonomy.build([{"name": "green", "prompts": ["tree", "bush"]}, "road", "street"], ["wall"], TEMPLATES)


def test_the_sample_is_spread_over_the_listing_and_deterministic():
    assert sample_indices(10, 64) == list(range(10))
    chosen = sample_indices(1000, 8)
    assert chosen == [0, 125, 250, 375, 500, 625, 750, 875] == sample_indices(1000, 8)
    assert len(set(sample_indices(65, 64))) == 64


def test_similar_prompts_of_different_classes_most_similar_first():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(5, 8))
    base[1] = base[0] + 0.01  # tree ~ bush: one class, never flagged
    base[3] = base[2] + 0.01  # road ~ street: two classes, flagged
    base[4] = base[0] + 0.05  # wall ~ tree: a distractor near a class, flagged
    features = np.repeat(base[:, None, :], 3, axis=1) + rng.normal(scale=1e-3, size=(5, 3, 8))
    pairs = similar_prompts(taxonomy(), features.astype(np.float32), threshold=0.99)
    named = [(p["prompt_a"], p["prompt_b"]) for p in pairs]
    assert named[0] == ("road", "street") and ("tree", "wall") in named and ("bush", "wall") in named
    assert ("tree", "bush") not in named
    assert [p["cosine"] for p in pairs] == sorted((p["cosine"] for p in pairs), reverse=True)
    assert pairs[0]["class_a"] == "road" and next(p for p in pairs if p["prompt_b"] == "wall")["class_b"] == "(distractor)"


def test_runner_up_pairs_count_pixels_across_classes_only():
    counts = np.zeros((5, 5), np.int64)
    counts[0, 1] = 500  # bush second to tree: the same class, not a confusion
    counts[2, 3] = 300  # street second to road
    counts[2, 0] = 100
    counts[4, 2] = 50  # road second to the distractor wall
    pairs = runner_up_pairs(taxonomy(), counts)
    assert [(p["prompt_a"], p["prompt_b"], p["pixels"]) for p in pairs] == [("road", "street", 300), ("road", "tree", 100), ("wall", "road", 50)]
    assert pairs[0]["share"] == 0.75 and pairs[2]["share"] == 1.0


def job(actors: int, gpus: float) -> JobSpec:
    return JobSpec.model_validate(
        {"input": {"url": "x"}, "taxonomy": {"classes": ["a"]}, "model": {"weights": None}, "output": {"url": "y"},
         "ray": {"num_actors": actors, "gpus_per_actor": gpus}}
    )


def test_estimates_scale_with_actors_and_price_gpu_hours():
    rows = {r["actors"]: r for r in estimates(36_000, 10.0, job(3, 0.5), gpu_hour_cost=2.0)}
    assert rows[1]["hours"] == pytest.approx(1.0) and rows[8]["hours"] == pytest.approx(1 / 8)
    assert rows[3]["configured"] and not rows[1]["configured"]
    # GPU hours do not depend on the actor count (if the model scales): 1 h x 0.5 GPU, at 2.0 each.
    assert rows[8]["gpu_hours"] == pytest.approx(0.5) and rows[8]["cost"] == pytest.approx(1.0)
    assert estimates(36_000, 10.0, job(1, 0), None)[0]["cost"] is None
    assert estimates(36_000, 0.0, job(1, 0), 1.0)[0]["hours"] is None  # nothing measured: no estimate


def test_durations_read_as_a_person_would():
    assert [duration(h) for h in (None, 10 / 3600, 0.5, 5.0, 72.0)] == ["n/a", "10 s", "30.0 min", "5.0 h", "3.0 days"]

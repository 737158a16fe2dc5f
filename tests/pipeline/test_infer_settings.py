"""The job spec's model and inference settings reach the model actor's predictor."""

from __future__ import annotations

import pytest

from pipeline.infer import SEDInference
from pipeline.model_loading import load_model
from pipeline.taxonomy import Taxonomy
from schemas import ModelSpec
from tests.helpers import TINY_CHECKPOINT


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_precision_and_early_rejection_reach_the_predictor(reference, precision):
    model = {"clip_model": reference["clip_cfg"], "weights": str(TINY_CHECKPOINT), "image_size": 256}
    _, checkpoint_hash = load_model(ModelSpec(**model))
    inference = SEDInference(
        model,
        {"top_k": 3, "precision": precision, "short_edge": None},
        Taxonomy(tuple(reference["classes"]), tuple(reference["templates"])),
        reference["text_features"].numpy(),
        checkpoint_hash,
    )
    assert inference.predictor.precision == precision
    assert inference.predictor.top_k == 3 and inference.predictor.short_edge is None
    assert inference.predictor.model.config.image_size == 256
    assert not inference.predictor.model.backbone.has_text_tower  # actors get the embeddings computed once


def test_image_size_is_part_of_the_job_fingerprint():
    from pipeline.label.commit import job_fingerprint
    from schemas import JobSpec

    def spec(image_size: int) -> JobSpec:
        return JobSpec.model_validate(
            {
                "input": {"url": "/in"},
                "taxonomy": {"classes": ["sky"]},
                "model": {"weights": None, "image_size": image_size},
                "output": {"url": "/out"},
            }
        )

    assert job_fingerprint(spec(768), "t", "c") != job_fingerprint(spec(384), "t", "c")
    with pytest.raises(ValueError, match="multiple of 32"):
        spec(100)

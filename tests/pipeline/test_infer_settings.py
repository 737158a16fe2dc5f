"""The job spec's inference settings reach the model actor's predictor."""

from __future__ import annotations

import pytest

from pipeline.infer import SEDInference
from pipeline.model_loading import load_model
from schemas import ModelSpec
from tests.conftest import TINY_CHECKPOINT


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_precision_and_early_rejection_reach_the_predictor(reference, precision):
    model = {"clip_model": reference["clip_cfg"], "weights": str(TINY_CHECKPOINT)}
    _, checkpoint_hash = load_model(ModelSpec(**model))
    inference = SEDInference(
        model,
        {"top_k": 3, "precision": precision, "short_edge": None},
        list(reference["classes"]),
        list(reference["templates"]),
        reference["text_features"].numpy(),
        checkpoint_hash,
    )
    assert inference.predictor.precision == precision
    assert inference.predictor.top_k == 3 and inference.predictor.short_edge is None

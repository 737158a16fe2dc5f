"""Shared test fixtures: the reference material in ../shared/reference and tiny SED models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import sed_model

REFERENCE_DIR = Path(__file__).resolve().parents[2] / "shared" / "reference"
TINY_CHECKPOINT = REFERENCE_DIR / "sed_tiny_official_format.pth"


def load_reference(name: str) -> dict:
    path = REFERENCE_DIR / name
    if not path.exists():
        raise FileNotFoundError(f"reference fixture {path} is missing: tests need ../shared/reference beside the repo")
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="session")
def reference() -> dict:
    return load_reference("sed_tiny_reference_outputs.pt")


@pytest.fixture(scope="session")
def cer_cases() -> dict:
    return load_reference("sed_tiny_cer_cases.pt")


@pytest.fixture(scope="session")
def eval_protocol() -> dict:
    return load_reference("sed_tiny_eval_protocol.pt")


def tiny_model(clip_cfg: dict, eval_pooling: int) -> sed_model.SED:
    model = sed_model.build_sed(sed_model.SEDConfig(clip_model=clip_cfg, eval_pooling=eval_pooling))
    sed_model.load_checkpoint(model, str(TINY_CHECKPOINT))
    return model.eval()


@pytest.fixture(scope="session")
def tiny_pooling2(reference) -> sed_model.SED:
    """The fixture checkpoint with class-attention pooling 2x2, as the `eval_*`/`cer_*` tensors were made."""
    return tiny_model(reference["clip_cfg"], eval_pooling=2)


@pytest.fixture(scope="session")
def tiny_pooling1(reference) -> sed_model.SED:
    """The fixture checkpoint with the paper's evaluation pooling (1x1), the product's default."""
    return tiny_model(reference["clip_cfg"], eval_pooling=1)

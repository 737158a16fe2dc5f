"""Test helpers: the reference material in ../shared/reference and tiny SED models."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import sed_model
from sed_model.cpu import kernels as cpu_kernels

REPO = Path(__file__).resolve().parents[1]
REFERENCE_DIR = REPO.parent / "shared" / "reference"
TINY_CHECKPOINT = REFERENCE_DIR / "sed_tiny_official_format.pth"


def load_reference(name: str) -> dict:
    path = REFERENCE_DIR / name
    if not path.exists():
        raise FileNotFoundError(f"reference fixture {path} is missing: tests need ../shared/reference beside the repo")
    return torch.load(path, weights_only=True)


def tiny_model(clip_cfg: dict, eval_pooling: int) -> sed_model.SED:
    model = sed_model.build_sed(sed_model.SEDConfig(clip_model=clip_cfg, eval_pooling=eval_pooling))
    sed_model.load_checkpoint(model, str(TINY_CHECKPOINT))
    return model.eval()


def two_images_40_classes(model, reference, cer_cases) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """The decoder's inputs (cost volume, appearance features) for two fixture images and 40 classes."""
    with torch.no_grad():
        features = model.dense_features([reference["images"][0], reference["images"][1]])
        cost = sed_model.cost_volume(features["clip_vis_dense"], cer_cases["text_features"][:40])
    return cost, (features["res4"], features["res3"], features["res2"])


def require_cpu_kernels() -> None:
    """Skip where no C++ compiler is (the kernels cannot be built); elsewhere their build must succeed."""
    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler: SED's fused CPU kernels cannot be built here")
    assert cpu_kernels.available(), "SED's fused CPU kernels failed to build (see the warning)"

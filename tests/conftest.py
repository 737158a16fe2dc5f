"""Shared test fixtures: the reference material in ../shared/reference and tiny SED models
(plain helpers live in `tests/helpers.py`)."""

from __future__ import annotations

import pytest

import sed_model
from sed_model.cpu import kernels as cpu_kernels
from tests.helpers import load_reference, require_cpu_kernels, tiny_model


@pytest.fixture(scope="session")
def reference() -> dict:
    return load_reference("sed_tiny_reference_outputs.pt")


@pytest.fixture(scope="session")
def cer_cases() -> dict:
    return load_reference("sed_tiny_cer_cases.pt")


@pytest.fixture(scope="session")
def eval_protocol() -> dict:
    return load_reference("sed_tiny_eval_protocol.pt")


@pytest.fixture(scope="session")
def tiny_pooling2(reference) -> sed_model.SED:
    """The fixture checkpoint with class-attention pooling 2x2, as the `eval_*`/`cer_*` tensors were made."""
    return tiny_model(reference["clip_cfg"], eval_pooling=2)


@pytest.fixture(scope="session")
def tiny_pooling1(reference) -> sed_model.SED:
    """The fixture checkpoint with the paper's evaluation pooling (1x1), the product's default."""
    return tiny_model(reference["clip_cfg"], eval_pooling=1)


@pytest.fixture(params=["fused_kernels", "torch_operators"])
def cpu_kernel_route(request):
    """Each of CPU float32 inference's two routes: the fused kernels and PyTorch's operators."""
    if request.param == "torch_operators":
        with cpu_kernels.disabled():
            yield request.param
    else:
        require_cpu_kernels()
        yield request.param

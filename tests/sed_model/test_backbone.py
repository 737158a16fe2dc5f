"""The backbone's ConvNeXt blocks in evaluation: timm's function, by whichever route takes them."""

from __future__ import annotations

import pytest
import torch
from timm.models.convnext import ConvNeXtBlock

from sed_model.cpu import kernels as cpu_kernels
from sed_model.backbone import _convnext_block_eval
from sed_model.cpu.layout import channels_last


@pytest.mark.parametrize("channels, fused", [(32, True), (128, True), (144, False), (40, False)])
def test_convnext_block_in_evaluation_is_timms_block(channels, fused, monkeypatch):
    """128 channels and fewer (multiples of 16) take the fused MLP kernel, wider ones oneDNN's
    products; both give timm's block, layer scale and residual included."""
    torch.manual_seed(channels)
    block = ConvNeXtBlock(channels, ls_init_value=1.0).eval()
    with torch.no_grad():
        block.gamma.uniform_(0.5, 1.5)  # not timm's 1e-6 init, which would hide the MLP's branch
        block.norm.weight.uniform_(0.5, 1.5)
        block.norm.bias.normal_()
    x = channels_last(torch.randn(2, channels, 9, 7))
    calls = []
    kernel = cpu_kernels.pointwise_mlp
    monkeypatch.setattr(cpu_kernels, "pointwise_mlp", lambda *args, **kwargs: calls.append(args) or kernel(*args, **kwargs))
    with torch.no_grad():
        expected = block(x)
        got = _convnext_block_eval(block, x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert bool(calls) == (fused and cpu_kernels.prepare())
    with torch.no_grad(), cpu_kernels.disabled():
        torch.testing.assert_close(_convnext_block_eval(block, x), expected, atol=1e-5, rtol=1e-5)

"""The channels-last helpers compute what the layers define, fused or not; the allocator setting."""

import pytest
import timm
import torch
from torch import nn

from timm.layers.activations import GELU as TimmGELU
from timm.layers.activations import GELUTanh
from timm.models.convnext import ConvNeXtBlock

from sed_model.cpu import layout
from sed_model.cpu.allocator import keep_freed_memory


@pytest.fixture
def linear() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(16, 64)


@pytest.mark.parametrize("activation, module", [(None, nn.Identity()), ("gelu", nn.GELU()), ("relu", nn.ReLU())])
def test_pointwise_equals_the_linear_layer_then_activation(linear, activation, module):
    x = layout.channels_last(torch.randn(2, 16, 12, 10))
    expected = module(linear(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
    with torch.inference_mode():  # the fused oneDNN path on CPU
        fused = layout.pointwise(x, linear, activation)
    unfused = layout.pointwise(x, linear, activation)  # grad enabled: the plain path
    torch.testing.assert_close(fused, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(unfused, expected.detach(), atol=1e-5, rtol=1e-5)


def test_pointwise_without_activation_takes_any_layout(linear):
    x = torch.randn(2, 16, 5, 7)  # NCHW: the matrix-product route copies it to positions first
    with torch.inference_mode():
        y = layout.pointwise(x, linear)
    assert y.shape == (2, 64, 5, 7) and y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, linear(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("activation, module", [("gelu", nn.GELU()), ("relu", nn.ReLU())])
def test_pointwise_mlp_in_position_groups_equals_the_layers(linear, activation, module, monkeypatch):
    fc2 = nn.Linear(64, 16)
    x = layout.channels_last(torch.randn(3, 16, 7, 5))
    expected = fc2(module(linear(x.permute(0, 2, 3, 1)))).permute(0, 3, 1, 2).detach()
    monkeypatch.setattr(layout, "HIDDEN_BYTES", 64 * 4 * 10)  # groups of 10 of the 105 positions
    with torch.inference_mode():
        grouped = layout.pointwise_mlp(x, linear, activation, fc2)
        nchw = layout.pointwise_mlp(x.contiguous(), linear, activation, fc2)  # not channels-last: one piece
    assert grouped.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(grouped, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(nchw, expected, atol=1e-5, rtol=1e-5)


def test_pointwise_keeps_gradients_outside_inference(linear):
    x = torch.randn(1, 16, 4, 4, requires_grad=True)
    layout.pointwise(x, linear, "gelu").sum().backward()
    assert x.grad is not None and linear.weight.grad is not None


def test_fused_path_only_where_it_is_exact(linear):
    x = torch.randn(1, 16, 4, 4)
    with torch.inference_mode():
        assert layout.cpu_float32_inference(x, linear.weight)
        assert not layout.cpu_float32_inference(x.double(), linear.weight)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not layout.cpu_float32_inference(x, linear.weight)
    assert not layout.cpu_float32_inference(x, linear.weight)  # autograd needs the plain path


def test_activation_name_recognises_only_fusable_modules():
    assert layout.activation_name(nn.GELU()) == "gelu"
    assert layout.activation_name(nn.GELU(approximate="tanh")) is None
    assert layout.activation_name(TimmGELU()) == "gelu"  # OpenCLIP's ConvNeXt towers use timm's
    assert layout.activation_name(GELUTanh()) is None
    assert layout.activation_name(nn.ReLU()) == "relu"
    assert layout.activation_name(nn.SiLU()) is None


def test_timm_convnext_blocks_take_the_fused_route():
    """timm builds ConvNeXt (OpenCLIP's ConvNeXt-B/L towers included) with its own exact GELU."""
    blocks = [m for m in timm.create_model("convnext_atto").modules() if isinstance(m, ConvNeXtBlock)]
    assert blocks
    assert all(layout.activation_name(block.mlp.act) == "gelu" for block in blocks)


def test_channel_norm_is_layer_norm_over_channels():
    norm = nn.LayerNorm(8)
    x = layout.channels_last(torch.randn(2, 8, 5, 6))
    expected = norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    torch.testing.assert_close(layout.channel_norm(x, norm), expected)


def test_keep_freed_memory_applies_on_glibc():
    import platform

    applied = keep_freed_memory()
    assert applied == (platform.libc_ver()[0] == "glibc")


def test_small_linear_weights_are_packed_once_per_version_and_large_ones_never(linear, monkeypatch):
    x = layout.channels_last(torch.randn(2, 16, 6, 5))
    with torch.inference_mode():
        first = layout.pointwise(x, linear)
        packed = layout._packed_weights[linear][1]
        assert layout.pointwise(x, linear) is not None and layout._packed_weights[linear][1] is packed  # reused
    with torch.no_grad():
        linear.weight.mul_(2)  # an in-place update (an optimizer step, load_state_dict) makes a new pack
    with torch.inference_mode():
        doubled = layout.pointwise(x, linear)
        assert layout._packed_weights[linear][1] is not packed
    torch.testing.assert_close(doubled - linear.bias[:, None, None], 2 * (first - linear.bias[:, None, None]), atol=1e-5, rtol=1e-5)
    large = nn.Linear(16, 64)
    monkeypatch.setattr(layout, "PACKED_WEIGHT_BYTES", 64 * 16 * 4 - 1)
    with torch.inference_mode():
        y = layout.pointwise(x, large)
    assert large not in layout._packed_weights
    torch.testing.assert_close(y, large(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).detach(), atol=1e-5, rtol=1e-5)


def test_up_relu_is_the_transposed_convolution_then_relu():
    torch.manual_seed(0)
    up = nn.ConvTranspose2d(12, 8, 2, stride=2)
    x = layout.channels_last(torch.randn(3, 12, 5, 7))
    expected = torch.relu(up(x)).detach()
    with torch.inference_mode():  # oneDNN with the ReLU fused
        fused = layout.up_relu(x, up)
    torch.testing.assert_close(fused, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layout.up_relu(x, up).detach(), expected)  # grad enabled: the module then ReLU


def test_a_model_built_under_inference_mode_runs_uncached():
    """Inference tensors have no version counter: nothing made from them is cached (and nothing fails)."""
    torch.manual_seed(0)
    with torch.inference_mode():
        linear = nn.Linear(16, 64)
        x = layout.channels_last(torch.randn(2, 16, 6, 5))
        y = layout.pointwise(x, linear)
        assert layout.weight_key(linear.weight) is None and linear not in layout._packed_weights
        torch.testing.assert_close(y, linear(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), atol=1e-5, rtol=1e-5)

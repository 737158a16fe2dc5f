"""The fused CPU kernels (`sed_model/cpu/kernels.py`) against the PyTorch operators they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sed_model.cpu import kernels as cpu_kernels
from sed_model.ops import group_norm_relu
from sed_model.cpu.layout import channels_last
from tests.helpers import require_cpu_kernels, two_images_40_classes


@pytest.fixture(autouse=True)
def kernels_built():
    require_cpu_kernels()


def _phi(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x.double()) + 1


@pytest.mark.parametrize("d", [8, 16, 32, 12])  # 8/16/32: the vector kernels SED's stages use; 12: the generic one
@pytest.mark.parametrize("rows", [1, 7])
def test_class_sums_accumulate_phi_k_v_per_head(d, rows):
    torch.manual_seed(d)
    heads = 101  # positions x heads, not a multiple of the kernels' blocks
    k, v = torch.randn(rows, heads, d) * 3, torch.randn(rows, heads, d)
    kv, k_sum = torch.randn(heads, d, d), torch.randn(heads, d)  # earlier chunks' sums
    expected_kv = kv.double() + torch.einsum("nld,nle->lde", _phi(k), v.double())
    expected_k_sum = k_sum.double() + _phi(k).sum(0)
    cpu_kernels.linear_attention_sums_(k, v, kv, k_sum)
    torch.testing.assert_close(kv.double(), expected_kv, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(k_sum.double(), expected_k_sum, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("d", [8, 16, 32, 12])
def test_attention_applies_the_sums_and_adds_the_residual(d):
    torch.manual_seed(d)
    rows, heads = 5, 77
    q, residual = torch.randn(rows, heads, d) * 3, torch.randn(rows, heads, d)
    kv, k_sum = torch.rand(heads, d, d) * 4, torch.rand(heads, d) * 4
    phi = _phi(q)
    expected = residual.double() + torch.einsum("nld,lde->nle", phi, kv.double()) / (
        torch.einsum("nld,ld->nl", phi, k_sum.double())[..., None] + 1e-6
    )
    out = cpu_kernels.linear_attention(q, kv, k_sum, residual, 1e-6)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_feature_map_over_the_whole_float_range():
    """elu + 1 through the kernels' own exp: exact above 0, about 1 ulp below, and 0 (not NaN or
    garbage) far below, where float32's exp underflows."""
    x = torch.cat([torch.linspace(-120, 30, 7992), torch.tensor([-1e30, -88.7, -87.5, -1e-30, 0.0, 1e-30, 1e30, 3e38])])
    k = x.view(1, -1, 8)
    kv, k_sum = torch.zeros(k.shape[1], 8, 8), torch.zeros(k.shape[1], 8)
    cpu_kernels.linear_attention_sums_(k, torch.ones_like(k), kv, k_sum)
    x = x.double()
    # elu(x) + 1 is exp(x) below 0; computed as expm1(x) + 1 it cancels to 0 (float32 below -17).
    phi, expected = k_sum.flatten().double(), torch.where(x > 0, x + 1, torch.exp(x))
    assert torch.isfinite(phi).all()
    torch.testing.assert_close(phi, expected, rtol=3e-7, atol=2e-38)


@pytest.mark.parametrize("channels, groups", [(16, 1), (64, 4), (48, 3)])
@pytest.mark.parametrize("with_add", [True, False])
def test_group_norm_relu(channels, groups, with_add):
    torch.manual_seed(channels)
    norm = torch.nn.GroupNorm(groups, channels)
    with torch.no_grad():
        norm.weight.uniform_(-1.5, 1.5)
        norm.bias.normal_()
    x = channels_last(torch.randn(3, channels, 13, 11) * 4 + 2)
    add = channels_last(torch.randn(1, channels, 13, 11)) if with_add else None
    with torch.no_grad():
        expected = F.relu(norm(x if add is None else x + add))
        out = cpu_kernels.group_norm_relu(x, norm, add, torch.empty_like(x))
        torch.testing.assert_close(out, expected, atol=2e-6, rtol=1e-5)
        assert cpu_kernels.group_norm_relu(x, norm, add, x) is x  # in place
        torch.testing.assert_close(x, expected, atol=2e-6, rtol=1e-5)


def test_group_norm_relu_takes_the_kernel_only_for_channels_last_maps():
    norm = torch.nn.GroupNorm(2, 32)
    x = torch.randn(2, 32, 8, 8)
    with torch.no_grad():
        expected = F.relu(norm(x))
        torch.testing.assert_close(group_norm_relu(x.clone(), norm), expected)  # NCHW: PyTorch's operators
        torch.testing.assert_close(group_norm_relu(channels_last(x), norm), expected, atol=2e-6, rtol=1e-5)
        with pytest.raises(RuntimeError):  # the kernel itself never writes into a copy of an NCHW map
            cpu_kernels.group_norm_relu(x, norm, None, x)


@pytest.mark.parametrize("activation", ["gelu", "relu"])
@pytest.mark.parametrize("channels, positions", [(32, (7, 9)), (64, (5, 5)), (16, (1, 1))])  # 63, 25, 1 rows: partial tiles
def test_mlp_with_residual_and_scale(activation, channels, positions):
    torch.manual_seed(channels)
    fc1, fc2 = torch.nn.Linear(channels, 4 * channels), torch.nn.Linear(4 * channels, channels)
    x = channels_last(torch.randn(3, channels, *positions) * 2)
    residual, scale = channels_last(torch.randn_like(x)), torch.randn(channels)
    act = F.gelu if activation == "gelu" else F.relu
    with torch.no_grad():
        mlp = fc2(act(fc1(x.permute(0, 2, 3, 1)))).permute(0, 3, 1, 2)
        assert cpu_kernels.mlp_usable(x, fc1, fc2)
        torch.testing.assert_close(cpu_kernels.pointwise_mlp(x, fc1, activation, fc2), mlp, atol=3e-6, rtol=1e-5)
        out = cpu_kernels.pointwise_mlp(x, fc1, activation, fc2, residual=residual, scale=scale)
        torch.testing.assert_close(out, residual + scale[:, None, None] * mlp, atol=3e-6, rtol=1e-5)
        assert out.is_contiguous(memory_format=torch.channels_last)
        expected = residual + mlp
        assert cpu_kernels.pointwise_mlp(x, fc1, activation, fc2, residual=residual, out=residual) is residual  # in place
        torch.testing.assert_close(residual, expected, atol=3e-6, rtol=1e-5)


def test_mlp_from_an_odd_number_of_channels():
    """17 -> 48 -> 16: products over an odd number of inputs into 16- and 48-column panels."""
    torch.manual_seed(17)
    fc1, fc2 = torch.nn.Linear(17, 48), torch.nn.Linear(48, 16)
    x = channels_last(torch.randn(2, 17, 5, 3))
    with torch.no_grad():
        expected = fc2(F.gelu(fc1(x.permute(0, 2, 3, 1)))).permute(0, 3, 1, 2)
        assert cpu_kernels.mlp_usable(x, fc1, fc2)
        torch.testing.assert_close(cpu_kernels.pointwise_mlp(x, fc1, "gelu", fc2), expected, atol=3e-6, rtol=1e-5)


@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_mlp_with_its_layer_norm_in_place(activation):
    """The LayerNorm before the MLP inside the kernel, written over its own input (`ClassAttention`)."""
    torch.manual_seed(1)
    fc1, fc2, norm = torch.nn.Linear(32, 128), torch.nn.Linear(128, 32), torch.nn.LayerNorm(32, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5), norm.bias.normal_()
        y = channels_last(torch.randn(2, 32, 11, 7) * 3 + 1)
        act = F.gelu if activation == "gelu" else F.relu
        expected = y + fc2(act(fc1(norm(y.permute(0, 2, 3, 1))))).permute(0, 3, 1, 2)
        assert cpu_kernels.pointwise_mlp(y, fc1, activation, fc2, residual=y, out=y, norm=norm) is y
    torch.testing.assert_close(y, expected, atol=5e-6, rtol=1e-5)


@pytest.mark.parametrize("channels, size", [(16, (9, 7)), (16, (5, 21)), (32, (4, 10)), (64, (1, 2)), (128, (2, 5))])
def test_single_channel_head(channels, size):
    torch.manual_seed(channels)
    head = torch.nn.Conv2d(channels, 1, 3, padding=1)
    x = channels_last(torch.randn(3, channels, *size))
    with torch.no_grad():
        assert cpu_kernels.head_usable(x, head)
        torch.testing.assert_close(cpu_kernels.single_channel_conv3x3(x, head), head(x), atol=2e-6, rtol=1e-5)
        assert not cpu_kernels.head_usable(x.contiguous(), head)  # NCHW
        assert not cpu_kernels.head_usable(x, torch.nn.Conv2d(channels, 2, 3, padding=1))
        assert not cpu_kernels.head_usable(x, torch.nn.Conv2d(channels, 1, 3, padding=0))


# 15 -> 4: 16 columns of products over an odd number of input channels (the one-vector panel's tail)
@pytest.mark.parametrize("in_channels, out_channels, relu", [(32, 24, False), (16, 8, True), (64, 4, False), (15, 4, True)])
def test_transposed_conv_into_a_given_map(in_channels, out_channels, relu):
    torch.manual_seed(out_channels)
    up = torch.nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2)
    x = channels_last(torch.randn(3, in_channels, 5, 7))
    out = channels_last(torch.randn(3, out_channels, 10, 14))
    with torch.no_grad():
        expected = up(x).relu() if relu else up(x)
        assert cpu_kernels.transposed_conv2x2_usable(x, up)
        cpu_kernels.transposed_conv2x2_into(x, up, out, relu)
    torch.testing.assert_close(out, expected, atol=2e-6, rtol=1e-5)


def test_transposed_conv_kernel_takes_only_what_it_computes():
    x = channels_last(torch.randn(1, 16, 4, 4))
    with torch.no_grad():
        assert not cpu_kernels.transposed_conv2x2_usable(x, torch.nn.ConvTranspose2d(16, 6, 2, stride=2))  # 6: not a multiple of 4
        assert not cpu_kernels.transposed_conv2x2_usable(x, torch.nn.ConvTranspose2d(16, 8, 3, stride=2))
        assert not cpu_kernels.transposed_conv2x2_usable(x.contiguous(), torch.nn.ConvTranspose2d(16, 8, 2, stride=2))
        with pytest.raises(RuntimeError, match="out: expected"):
            cpu_kernels.transposed_conv2x2_into(x, torch.nn.ConvTranspose2d(16, 8, 2, stride=2), channels_last(torch.empty(1, 10, 8, 8)), False)


@pytest.mark.parametrize(
    "in_channels, out_channels, size", [(16, 16, (8, 12)), (32, 16, (12, 8)), (64, 32, (4, 4)), (128, 64, (20, 8))]
)
def test_winograd_conv_is_the_3x3_convolution(in_channels, out_channels, size):
    """Against float64, zero padding at every border: Winograd F(4x4, 3x3) rounds within 16x of the
    direct kernel (its transforms scale by up to 8 and 1/24; measured 8-10x on SED's shapes)."""
    torch.manual_seed(in_channels)
    x = channels_last(torch.randn(3, in_channels, *size))
    conv = torch.nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
    with torch.no_grad():
        exact = F.conv2d(x.double(), conv.weight.double(), padding=1)
        assert cpu_kernels.winograd_usable(x, conv.weight)
        y = cpu_kernels.winograd_conv3x3(x, conv.weight, conv)
        direct_error = (conv(x).double() - exact).abs().max()
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert (y.double() - exact).abs().max() <= 16 * direct_error


@pytest.mark.parametrize("first_channels, second_channels", [(24, 8), (48, 16), (8, 8)])
def test_winograd_conv_reads_two_maps_as_their_concatenation(first_channels, second_channels):
    """The fusion conv's input in two maps (up-sampled, correlation): the same as one concatenated map."""
    torch.manual_seed(first_channels)
    x, second = channels_last(torch.randn(3, first_channels, 8, 12)), channels_last(torch.randn(3, second_channels, 8, 12))
    conv = torch.nn.Conv2d(first_channels + second_channels, 16, 3, padding=1, bias=False)
    with torch.no_grad():
        concatenated = channels_last(torch.cat([x, second], dim=1))
        assert cpu_kernels.winograd_usable(x, conv.weight, second)
        y = cpu_kernels.winograd_conv3x3(x, conv.weight, conv, second)
        assert torch.equal(y, cpu_kernels.winograd_conv3x3(concatenated, conv.weight, conv))
        assert not cpu_kernels.winograd_usable(x, conv.weight)  # the channels do not add up
        assert not cpu_kernels.winograd_usable(x, conv.weight, second[:2])  # other rows
        assert not cpu_kernels.winograd_usable(x, conv.weight, second.contiguous())  # NCHW
    assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("in_channels, out_channels", [(32, 16), (24, 64)])
def test_winograd_adds_a_map_and_takes_its_output_moments(in_channels, out_channels):
    """The appearance term added to every row, and the per row and channel sums and sums of
    squares of the output (float64) that GroupNorm then needs no pass of its own for."""
    torch.manual_seed(out_channels)
    x = channels_last(torch.randn(3, in_channels, 8, 12))
    add = channels_last(torch.randn(1, out_channels, 8, 12))
    conv = torch.nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
    norm = torch.nn.GroupNorm(out_channels // 16, out_channels)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5), norm.bias.normal_()
        expected = conv(x) + add
        moments = torch.empty(3, 2, out_channels, dtype=torch.float64)
        y = cpu_kernels.winograd_conv3x3(x, conv.weight, conv, add=add, moments=moments)
        torch.testing.assert_close(y, expected, atol=5e-5, rtol=1e-5)
        rows = y.double().permute(0, 2, 3, 1).reshape(3, -1, out_channels)
        # Each tile's 16 outputs are summed in float32 before the float64 sums: float32 rounding.
        torch.testing.assert_close(moments, torch.stack([rows.sum(1), rows.square().sum(1)], dim=1), atol=1e-5, rtol=1e-6)
        again = torch.empty_like(moments)
        cpu_kernels.winograd_conv3x3(x, conv.weight, conv, add=add, moments=again)
        assert torch.equal(again, moments)  # the same sums whatever the threads' order
        normed = cpu_kernels.group_norm_relu(y, norm, None, torch.empty_like(y), moments)
        torch.testing.assert_close(normed, F.relu(norm(expected)), atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(normed, cpu_kernels.group_norm_relu(y, norm, None, torch.empty_like(y)), atol=1e-6, rtol=1e-6)


def test_winograd_weights_follow_in_place_updates_and_the_weight_used():
    conv = torch.nn.Conv2d(32, 32, 3, padding=1, bias=False)
    x = channels_last(torch.randn(1, 32, 4, 4))
    with torch.no_grad():
        cpu_kernels.winograd_conv3x3(x, conv.weight, conv)
        conv.weight.mul_(-1)
        torch.testing.assert_close(cpu_kernels.winograd_conv3x3(x, conv.weight, conv), conv(x), atol=1e-5, rtol=1e-5)
        part = conv.weight[:16]  # a weight made from the owner's, of another shape
        torch.testing.assert_close(cpu_kernels.winograd_conv3x3(x, part, conv), F.conv2d(x, part, padding=1), atol=1e-5, rtol=1e-5)


def test_winograd_takes_only_what_it_computes_and_pays_for():
    x = channels_last(torch.randn(1, 32, 4, 4))
    with torch.no_grad():
        assert cpu_kernels.winograd_usable(x, torch.randn(16, 32, 3, 3))
        assert not cpu_kernels.winograd_usable(channels_last(torch.randn(1, 8, 4, 4)), torch.randn(16, 8, 3, 3))  # few channels
        assert not cpu_kernels.winograd_usable(channels_last(torch.randn(1, 32, 6, 4)), torch.randn(16, 32, 3, 3))  # no whole tiles
        assert not cpu_kernels.winograd_usable(x, torch.randn(8, 32, 3, 3))  # 8 outputs
        assert not cpu_kernels.winograd_usable(x.contiguous(), torch.randn(16, 32, 3, 3))  # NCHW


def test_gelu_is_exact_gelu_over_the_float_range():
    fc1, fc2 = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)
    with torch.no_grad():  # identities, so the kernel's output is gelu(x) itself
        fc1.weight.copy_(torch.eye(16)), fc1.bias.zero_(), fc2.weight.copy_(torch.eye(16)), fc2.bias.zero_()
        x = torch.cat([torch.linspace(-12, 12, 16 * 999), torch.tensor([-1e30, -3e38, 1e30, 3e38] * 4)])
        maps = channels_last(x.view(-1, 1, 1, 16).permute(0, 3, 1, 2))
        out = cpu_kernels.pointwise_mlp(maps, fc1, "gelu", fc2).permute(0, 2, 3, 1).flatten().double()
    exact = F.gelu(x.double())
    torch.testing.assert_close(out, exact, atol=2e-6, rtol=1e-6)


def test_mlp_kernel_follows_in_place_weight_updates():
    fc1, fc2 = torch.nn.Linear(16, 64), torch.nn.Linear(64, 16)
    x = channels_last(torch.randn(2, 16, 3, 3))
    with torch.no_grad():
        before = cpu_kernels.pointwise_mlp(x, fc1, "relu", fc2)
        fc1.weight.mul_(2)  # an optimiser step or a loaded checkpoint
        after = cpu_kernels.pointwise_mlp(x, fc1, "relu", fc2)
        expected = fc2(F.relu(fc1(x.permute(0, 2, 3, 1)))).permute(0, 3, 1, 2)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, expected, atol=3e-6, rtol=1e-5)


def test_mlp_kernel_takes_only_the_narrow_channels_last_layers():
    narrow = torch.nn.Linear(64, 256), torch.nn.Linear(256, 64)
    wide = torch.nn.Linear(256, 1024), torch.nn.Linear(1024, 256)  # the backbone's
    odd = torch.nn.Linear(24, 72), torch.nn.Linear(72, 24)
    x = channels_last(torch.randn(1, 64, 4, 4))
    with torch.no_grad():
        assert cpu_kernels.mlp_usable(x, *narrow)
        assert not cpu_kernels.mlp_usable(x.contiguous(), *narrow)  # NCHW
        assert not cpu_kernels.mlp_usable(channels_last(torch.randn(1, 256, 4, 4)), *wide)
        assert not cpu_kernels.mlp_usable(channels_last(torch.randn(1, 24, 4, 4)), *odd)
        with cpu_kernels.disabled():
            assert not cpu_kernels.mlp_usable(x, *narrow)
    assert not cpu_kernels.mlp_usable(x, *narrow)  # grad mode: training keeps PyTorch's operators


def test_bad_shapes_are_refused_with_the_input_named():
    with pytest.raises(RuntimeError, match="kv: expected"):
        cpu_kernels.linear_attention_sums_(torch.randn(2, 5, 8), torch.randn(2, 5, 8), torch.zeros(5, 8, 4), torch.zeros(5, 8))
    with pytest.raises(RuntimeError, match="residual: expected"):
        cpu_kernels.linear_attention(torch.randn(2, 5, 8), torch.zeros(5, 8, 8), torch.zeros(5, 8), torch.randn(2, 4, 8), 1e-6)
    x, b1, b2, out = torch.randn(4, 16), torch.randn(64), torch.randn(16), torch.empty(4, 16)
    with pytest.raises(RuntimeError, match="w2t: expected"):
        torch.ops.sed_cpu.pointwise_mlp(x, None, None, 1e-5, torch.randn(16, 64), b1, torch.randn(32, 16), b2, "relu", None, None, out)
    with pytest.raises(RuntimeError, match="activation must be gelu or relu"):
        torch.ops.sed_cpu.pointwise_mlp(x, None, None, 1e-5, torch.randn(16, 64), b1, torch.randn(64, 16), b2, "tanh", None, None, out)
    with pytest.raises(RuntimeError, match="norm: expected"):
        torch.ops.sed_cpu.pointwise_mlp(x, torch.ones(8), torch.ones(8), 1e-5, torch.randn(16, 64), b1, torch.randn(64, 16), b2, "relu", None, None, out)
    with pytest.raises(RuntimeError, match="weight: expected"):
        torch.ops.sed_cpu.single_channel_conv3x3(torch.randn(1, 4, 4, 16), torch.randn(3, 3, 8), torch.randn(1))


@pytest.mark.parametrize("model_name", ["tiny_pooling1", "tiny_pooling2"])
def test_decoder_with_kernels_gives_the_operators_outputs(model_name, request, reference, cer_cases, monkeypatch):
    """Two images, 40 classes, chunks of 7 rows, early rejection: both routes agree, and the kernels ran."""
    model = request.getfixturevalue(model_name)
    cost, appearance = two_images_40_classes(model, reference, cer_cases)
    calls = []
    kernels = {
        "linear_attention_sums_",
        "linear_attention",
        "group_norm_relu",
        "pointwise_mlp",
        "single_channel_conv3x3",
        "transposed_conv2x2_into",
        "winograd_conv3x3",
    }
    for name in kernels:
        kernel = getattr(cpu_kernels, name)
        monkeypatch.setattr(cpu_kernels, name, lambda *a, _kernel=kernel, _name=name, **k: calls.append(_name) or _kernel(*a, **k))
    with torch.no_grad():
        fused = model.decoder(cost, appearance, model.pooling, 1, chunk_rows=7)
        assert set(calls) == kernels
        calls.clear()
        with cpu_kernels.disabled():
            operators = model.decoder(cost, appearance, model.pooling, 1, chunk_rows=7)
        assert calls == []
    for a, b in zip(fused, operators):
        assert a.rows.class_index.tolist() == b.rows.class_index.tolist()
        torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=0)


def test_preparing_cpu_inference_loads_the_kernels_unless_they_are_off_and_a_predictor_does_not(tiny_pooling1, monkeypatch):
    import sed_model
    from sed_model.cpu import allocator

    loads, allocator_calls = [], []
    monkeypatch.setattr(cpu_kernels, "available", lambda: loads.append(1) or True)
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: allocator_calls.append(1) or True)
    monkeypatch.setattr(sed_model.predictor, "keep_freed_memory", allocator.keep_freed_memory)
    sed_model.SEDPredictor(tiny_pooling1)
    sed_model.SEDPredictor(tiny_pooling1, precision="bfloat16")
    assert loads == [] and allocator_calls == []  # building a predictor changes nothing process-wide
    assert sed_model.prepare_cpu_inference()
    assert loads == [1] and allocator_calls == [1]
    with cpu_kernels.disabled():
        assert not sed_model.prepare_cpu_inference()
    assert loads == [1]

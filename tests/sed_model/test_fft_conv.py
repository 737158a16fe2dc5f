"""The FFT route of the decoder's conv1: the same convolution, a cache that follows the weight."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sed_model import ops
from sed_model.decoder import SEDDecoder, _image_groups
from sed_model.cpu.fft_conv import SpectrumCache, fft_conv2d, fft_pays


@pytest.mark.parametrize(("rows", "height", "width", "kernel"), [(3, 24, 24, 7), (2, 9, 13, 7), (1, 5, 4, 5), (4, 12, 12, 3)])
def test_equals_direct_convolution(rows: int, height: int, width: int, kernel: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(rows, 6, height, width, dtype=torch.float64)
    weight = torch.randn(5, 6, kernel, kernel, dtype=torch.float64)
    bias = torch.randn(5, dtype=torch.float64)
    expected = F.conv2d(x, weight, bias, padding=kernel // 2)
    got = fft_conv2d(x, weight, bias, kernel // 2, SpectrumCache())
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


def test_float32_error_no_larger_than_direct() -> None:
    torch.manual_seed(0)
    x = torch.rand(4, 80, 24, 24) * 2 - 1
    weight = torch.randn(128, 80, 7, 7) * 0.02
    exact = F.conv2d(x.double(), weight.double(), padding=3)
    fft_error = (fft_conv2d(x, weight, None, 3, SpectrumCache()).double() - exact).abs().max()
    direct_error = (F.conv2d(x, weight, padding=3).double() - exact).abs().max()
    assert fft_error <= max(direct_error, 1e-6)


def test_cache_follows_weight_updates_and_sizes() -> None:
    cache = SpectrumCache()
    weight = torch.randn(2, 3, 5, 5)
    x = torch.randn(1, 3, 8, 8)
    fft_conv2d(x, weight, None, 2, cache)
    first = cache.get(weight, (12, 12))
    assert cache.get(weight, (12, 12)) is first  # reused while nothing changed
    with torch.no_grad():
        weight.mul_(2)  # in place, as loading a checkpoint does
    torch.testing.assert_close(fft_conv2d(x, weight, None, 2, cache), F.conv2d(x, weight, padding=2), atol=1e-4, rtol=1e-5)
    y = torch.randn(1, 3, 6, 10)  # another map size
    torch.testing.assert_close(fft_conv2d(y, weight, None, 2, cache), F.conv2d(y, weight, padding=2), atol=1e-4, rtol=1e-5)


def test_inference_tensor_weights_are_never_cached() -> None:
    """Weights made under inference mode have no version counter: an in-place update must still count."""
    cache = SpectrumCache()
    x = torch.randn(1, 3, 8, 8)
    with torch.inference_mode():
        weight = torch.randn(2, 3, 5, 5)
        fft_conv2d(x, weight, None, 2, cache)
        weight.mul_(2)
        torch.testing.assert_close(fft_conv2d(x, weight, None, 2, cache), F.conv2d(x, weight, padding=2), atol=1e-4, rtol=1e-5)


def test_rejects_what_it_does_not_compute() -> None:
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match="odd square kernels"):
        fft_conv2d(x, torch.randn(2, 3, 4, 4), None, 2, SpectrumCache())
    with pytest.raises(ValueError, match="'same' padding"):
        fft_conv2d(x, torch.randn(2, 3, 5, 5), None, 0, SpectrumCache())


def test_used_only_for_float32_cpu_inference_with_large_kernels() -> None:
    x, weight = torch.randn(1, 3, 8, 8), torch.randn(2, 3, 7, 7)
    with torch.no_grad():
        assert fft_pays(x, weight)
        assert not fft_pays(x, torch.randn(2, 3, 3, 3))
        assert not fft_pays(x.double(), weight.double())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not fft_pays(x, weight)
    assert not fft_pays(x, weight)  # training: gradients through the direct convolution


def test_image_groups_never_span_images() -> None:
    spans = [(0, 0, 8), (0, 8, 16), (0, 16, 24), (0, 24, 32), (0, 32, 40), (0, 40, 41), (1, 41, 49), (2, 49, 50)]
    assert _image_groups(spans, 32) == [spans[:4], spans[4:6], spans[6:7], spans[7:]]
    assert _image_groups(spans, 1) == [[span] for span in spans]


def test_decoder_logits_equal_with_and_without_fft(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    decoder = SEDDecoder(appearance_channels=(32, 16, 8), hidden_dim=32, decoder_dims=(16, 16, 16), guidance_dims=(16, 8, 8), num_templates=4).eval()
    cost = torch.randn(2, 37, 4, 6, 6)  # 37 classes: chunk groups of 32 + 5 rows per image
    appearance = [torch.randn(2, 32, 12, 12), torch.randn(2, 16, 24, 24), torch.randn(2, 8, 48, 48)]
    with torch.no_grad():
        fast = decoder(cost, appearance, pooling=1, top_k=3)
        assert decoder._conv1_spectrum._spectrum is not None  # the FFT route ran
        monkeypatch.setattr(ops, "fft_pays", lambda x, weight: False)
        direct = decoder(cost, appearance, pooling=1, top_k=3)
    for a, b in zip(fast, direct):
        assert torch.equal(a.rows.class_index, b.rows.class_index)
        torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)

"""Class attention's linear attention: the paper's formula, in any chunking, layout and mode."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sed_model.decoder import ClassSums, LinearAttention
from sed_model.cpu.layout import channels_last


def _paper_formula(attention: LinearAttention, x: torch.Tensor) -> torch.Tensor:
    """`phi(q) (sum_s phi(k_s) v_s^T / S) / (phi(q) . sum_s phi(k_s) + eps) * S` per position and head."""
    n, c, h, w = x.shape
    heads, d = attention.num_heads, c // attention.num_heads
    tokens = x.permute(0, 2, 3, 1).reshape(n, h * w, c)

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(n, h * w, heads, d)

    q, k, v = (F.elu(split(attention.q(tokens))) + 1, F.elu(split(attention.k(tokens))) + 1, split(attention.v(tokens)))
    kv = torch.einsum("slhd,slhv->lhdv", k, v) / n
    out = torch.einsum("slhd,lhdv->slhv", q, kv) / (torch.einsum("slhd,lhd->slh", q, k.sum(0))[..., None] + attention.eps) * n
    return out.reshape(n, h, w, c).permute(0, 3, 1, 2)


@pytest.fixture
def attention() -> LinearAttention:
    torch.manual_seed(0)
    return LinearAttention(32, 4)


@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
def test_attention_with_chunked_sums_is_the_paper_formula_plus_the_residual(attention, layout, cpu_kernel_route):
    x = torch.randn(11, 32, 6, 5)  # 11 classes of one image
    residual = torch.randn_like(x)
    if layout == "channels_last":
        x, residual = channels_last(x), channels_last(residual)
    expected = residual + _paper_formula(attention, x)
    with torch.inference_mode():
        sums = ClassSums(1)
        for chunk in x.split(4):  # sums accumulated chunk by chunk, as the decoder's first pass does
            sums.set(0, attention.class_sums(chunk, sums.running(0)))
        rows = [attention(chunk, *sums.get(0), residual=r) for chunk, r in zip(x.split(4), residual.split(4))]
    out = torch.cat(rows)
    torch.testing.assert_close(out, expected.detach(), atol=1e-5, rtol=1e-5)
    if layout == "channels_last":  # the attention output keeps the layout the next layers run fastest on
        assert all(r.is_contiguous(memory_format=torch.channels_last) for r in rows)


def test_attention_trains_through_both_passes(attention):
    x = torch.randn(5, 32, 4, 4, requires_grad=True)
    kv, k_sum = attention.class_sums(x[:2], attention.class_sums(x[2:]))
    attention(x, kv, k_sum, residual=x).square().sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in attention.parameters())
    expected_grad = torch.autograd.grad((x + _paper_formula(attention, x)).square().sum(), x)[0]
    torch.testing.assert_close(x.grad, expected_grad, atol=1e-4, rtol=1e-4)

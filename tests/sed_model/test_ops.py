"""Every op's kernels against its reference (`sed_model.ops`), over the shapes SED's decoder uses.

The layers are a ConvNeXt-B decoder's (128 -> 64 -> 32 -> 16 channels, guidance 32/16/8, 4 heads,
80 templates) with random weights; the maps are smaller than at 768x768 (8x8 where the model has
24x24), which changes nothing in what the kernels compute per position. Each case checks that the
kernel named runs for it (the test is not vacuous), that it gives the reference's result, and that
outside float32 CPU inference (autograd, bfloat16) the reference runs instead.

The backbone's bfloat16 kernel runs under bfloat16 autocast and is compared with the reference
under the same autocast, by relative RMS error (the two round at different steps).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from sed_model import ops
from sed_model.cpu import layout
from sed_model.cpu.fft_conv import SpectrumCache
from sed_model.decoder import SEDDecoder
from tests.helpers import require_cpu_kernels

SIZE = 8  # the coarsest maps; each up-stage doubles it
ROWS = 3


def cl(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


@dataclass
class Case:
    op: ops.Op
    kernel: str
    make: Callable[[], tuple[tuple, dict[str, Any]]]
    tolerance: float = 2e-5
    id: str = ""
    mode: str = "float32"  # or "autocast" (bfloat16): the context the kernel runs in
    relative_rms: float = 0.0  # autocast: the largest RMS error relative to the reference's RMS

    def context(self) -> contextlib.AbstractContextManager:
        return torch.autocast("cpu", dtype=torch.bfloat16) if self.mode == "autocast" else contextlib.nullcontext()


def _decoder() -> SEDDecoder:
    torch.manual_seed(0)
    decoder = SEDDecoder(appearance_channels=(512, 256, 128), hidden_dim=128, decoder_dims=(64, 32, 16), guidance_dims=(32, 16, 8), num_templates=80)
    for parameter in decoder.parameters():  # away from init values (GroupNorm's 1 and 0, layer scale's 1)
        parameter.data.add_(0.1 * torch.randn_like(parameter))
    return decoder.eval()


def _convnext_block(width: int) -> torch.nn.Module:
    torch.manual_seed(width)
    block = torch.nn.Module()
    block.norm, block.fc1, block.fc2 = torch.nn.LayerNorm(width, eps=1e-6), torch.nn.Linear(width, 4 * width), torch.nn.Linear(4 * width, width)
    block.gamma = torch.nn.Parameter(0.1 * torch.rand(width))
    for parameter in block.parameters():
        parameter.data.add_(0.05 * torch.randn_like(parameter))
    return block.eval()


def cases() -> list[Case]:
    decoder = _decoder()
    stages = (decoder.decoder1, decoder.decoder2, decoder.decoder3)
    found: list[Case] = []
    for level, stage in enumerate(stages):
        channels = stage.cnext.dwconv.in_channels
        size = SIZE * 2**level
        attention = stage.attention.attention
        heads, d = attention.num_heads, channels // attention.num_heads
        conv, norm1, _, conv2, norm2, _ = stage.conv.double_conv
        c_up = stage.up.out_channels
        per_class = torch.cat([conv.weight[:, :c_up], conv.weight[:, c_up + stage.guidance_channels :]], dim=1).detach()
        out_channels = conv.out_channels
        x = lambda c=channels, s=size: cl(torch.randn(ROWS, c, s, s))  # noqa: E731
        positions = size * size * heads
        found += [
            Case(ops.pointwise, "onednn_linear", lambda x=x, layer=attention.k: ((x(), layer), {})),
            Case(ops.mlp, "onednn_linear", lambda x=x, s=stage: ((x(), s.attention.MLP[0], "relu", s.attention.MLP[2]), {})),
            Case(
                ops.residual_mlp, "fused_cpu",
                lambda x=x, s=stage: ((x(), s.cnext.norm, s.cnext.pwconv1, "gelu", s.cnext.pwconv2), {"residual": x(), "scale": s.cnext.gamma}),
                id=f"convnext{level}",
            ),
            Case(
                ops.residual_mlp, "fused_cpu",
                lambda x=x, s=stage: (lambda y: ((y, s.attention.norm2, s.attention.MLP[0], "relu", s.attention.MLP[2]), {"residual": y}))(x()),
                id=f"attention_mlp{level}",
            ),
            Case(
                ops.attention_sums, "fused_cpu",
                lambda p=positions, d=d: ((torch.randn(5, p, d), torch.randn(5, p, d), (torch.randn(p, d, d), torch.rand(p, d))), {}),
            ),
            Case(
                ops.attention_apply, "fused_cpu",
                lambda p=positions, d=d: ((torch.randn(5, p, d), torch.randn(p, d, d), 3 + torch.rand(p, d), torch.randn(5, p, d), 1e-6), {}),
            ),
            Case(
                ops.group_norm_relu, "fused_cpu",
                lambda c=out_channels, s=size, n=norm2: ((cl(torch.randn(ROWS, c, 2 * s, 2 * s)), n), {"add": cl(torch.randn(1, c, 2 * s, 2 * s))}),
            ),
            Case(
                ops.conv3x3, "winograd_cpu",
                lambda s=size, st=stage, w=per_class, conv=conv: (
                    (cl(torch.randn(ROWS, st.up.out_channels, 2 * s, 2 * s)), w, conv), {"second": cl(torch.randn(ROWS, st.guidance_channels, 2 * s, 2 * s))}
                ),
                tolerance=2e-4,
            ),
            Case(
                ops.conv3x3_norm_relu, "winograd_moments_cpu",
                lambda c=out_channels, s=size, conv2=conv2, n=norm2: ((cl(torch.randn(ROWS, c, 2 * s, 2 * s)), conv2.weight, conv2, n), {}),
                tolerance=2e-4,
            ),
            Case(
                ops.fusion_conv, "fused_cpu",
                lambda x=x, s=size, st=stage, w=per_class, conv=conv, n=norm1: (
                    (x(), st.up, cl(torch.randn(ROWS, st.guidance_channels, 2 * s, 2 * s)), w, conv, n, cl(torch.randn(1, conv.out_channels, 2 * s, 2 * s))),
                    {"buffer": cl(torch.empty(ROWS + 2, w.shape[1], 2 * s, 2 * s))},
                ),
                tolerance=2e-4,
            ),
            Case(ops.head, "fused_cpu", lambda x=x, h=(decoder.head0, decoder.head1, decoder.head2)[level]: ((h, x()), {}), id=f"head{level}"),
        ]
    last = stages[-1].conv.double_conv[3].out_channels
    found.append(Case(ops.head, "fused_cpu", lambda: ((decoder.head, cl(torch.randn(ROWS, last, 8 * SIZE, 8 * SIZE))), {}), id="head"))
    inputs = (80, 32, 16)
    for level, projection in enumerate(decoder.decoder_corr_guidance_projection):
        found.append(
            Case(
                ops.transposed_conv2x2_relu, "fused_cpu",
                lambda c=inputs[level], s=SIZE * 2**level, up=projection[0]: ((cl(torch.randn(ROWS, c, s, s)), up), {}),
                id=f"correlation{level}",
            )
        )
    for width in (128, 256):  # the backbone's blocks in bfloat16 autocast (ConvNeXt-B's first two stages' widths)
        block = _convnext_block(width)
        found.append(
            Case(
                ops.residual_mlp, "onednn_bf16",
                lambda b=block, w=width: (
                    lambda x: ((x, b.norm, b.fc1, "gelu", b.fc2), {"residual": cl(torch.randn(ROWS, w, SIZE, SIZE)).bfloat16(), "scale": b.gamma})
                )(cl(torch.randn(ROWS, w, SIZE, SIZE)).bfloat16()),
                id=f"backbone{width}-bf16", mode="autocast", relative_rms=0.01,
            )
        )
    found.append(Case(ops.embed, "fft_cpu", lambda: ((torch.randn(5, 80, SIZE, SIZE), decoder.conv1, SpectrumCache()), {}), tolerance=1e-4))
    return found


CASES = cases()


def _ids(case: Case) -> str:
    return f"{case.op.name}-{case.id or case.kernel}"


def _copy(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone(memory_format=torch.preserve_format)
    if isinstance(value, tuple):
        return tuple(_copy(v) for v in value)
    return value


def _call(case: Case, args: tuple, kwargs: dict) -> Any:
    return case.op(*_copy(args), **{k: _copy(v) for k, v in kwargs.items()})


def test_every_op_has_a_case_for_each_of_its_cpu_kernels():
    covered = {(case.op.name, case.kernel) for case in CASES}
    fused = {(op.name, kernel.name) for op in ops.OPS for kernel in op.kernels}
    # oneDNN's ReLU-fused transposed conv runs where the fused kernel does not (channels not a multiple of 4).
    assert fused - covered == {("transposed_conv2x2_relu", "onednn_fused_relu")}


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_kernel_gives_the_reference_result(case):
    require_cpu_kernels()
    if case.mode == "autocast" and not layout.onednn_bfloat16_native():
        pytest.skip("this CPU has neither AVX512-BF16 nor AMX: oneDNN's bfloat16 is emulated here")
    torch.manual_seed(1)
    args, kwargs = case.make()
    with torch.no_grad(), case.context():
        assert case.op.implementation(*args, **kwargs).name == case.kernel
        fast = _call(case, args, kwargs)
        with ops.references():
            assert case.op.implementation(*args, **kwargs).name == "reference"
            expected = _call(case, args, kwargs)
    for actual, wanted in zip(*(v if isinstance(v, tuple) else (v,) for v in (fast, expected))):
        if case.mode != "float32":
            error = (actual.float() - wanted.float()).pow(2).mean().sqrt() / wanted.float().pow(2).mean().sqrt()
            assert actual.dtype == wanted.dtype and float(error) <= case.relative_rms, f"relative RMS error {float(error):.4f}"
            continue
        scale = max(1.0, float(wanted.abs().max()))
        torch.testing.assert_close(actual, wanted, atol=case.tolerance * scale, rtol=case.tolerance)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_outside_its_inference_mode_the_reference_runs(case):
    args, kwargs = case.make()
    with torch.enable_grad(), case.context():  # training: autograd needs PyTorch's operators
        assert case.op.implementation(*args, **kwargs).name == "reference"
    if case.mode != "autocast":  # the float32 kernels take no autocast (a bfloat16 one may apply there)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            assert case.op.implementation(*args, **kwargs).name in ("reference", "onednn_bf16")


def test_the_transposed_conv_falls_back_to_onednn_for_other_widths():
    up = torch.nn.ConvTranspose2d(16, 6, 2, stride=2).eval()  # 6 output channels: not the kernel's
    x = cl(torch.randn(2, 16, 5, 5))
    with torch.no_grad():
        assert ops.transposed_conv2x2_relu.implementation(x, up).name == "onednn_fused_relu"
        fast = ops.transposed_conv2x2_relu(x, up)
        with ops.references():
            torch.testing.assert_close(fast, ops.transposed_conv2x2_relu(x, up), atol=1e-5, rtol=1e-5)

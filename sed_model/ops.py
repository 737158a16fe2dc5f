"""SED's fusable steps as named ops, and the one place that decides which implementation runs.

Each op has a reference implementation in PyTorch's operators (autograd, GPUs, autocast, any
dtype), written where it helps in terms of other ops, and kernels, each with the condition under
which it computes the same thing faster (`Kernel.applies`). A call runs the first kernel that
applies, else the reference. Today's kernels are for float32 inference on CPUs (`sed_model/cpu`):
fused C++ kernels, oneDNN's routes for channels-last maps, conv1 through the FFT. The model's code
(`decoder.py`, `backbone.py`) calls the ops and holds no kernel condition.

`references()` makes every op run its reference inside the block (parity tests, benchmarks);
`tests/sed_model/test_ops.py` runs each op's kernels against its reference over the model's shapes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .cpu import kernels as cpu
from .cpu import layout
from .cpu.fft_conv import SpectrumCache, fft_conv2d, fft_pays
from .cpu.layout import channel_norm

Tensor = torch.Tensor
_references_only = False


@dataclass(frozen=True)
class Kernel:
    name: str
    applies: Callable[..., bool]  # same arguments as the op
    run: Callable[..., Any]


@dataclass(frozen=True)
class Op:
    name: str
    reference: Callable[..., Any]
    kernels: tuple[Kernel, ...] = ()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.implementation(*args, **kwargs).run(*args, **kwargs)

    def implementation(self, *args: Any, **kwargs: Any) -> Kernel:
        """The kernel a call with these arguments runs (the reference, as a `Kernel`, if none applies)."""
        if not _references_only:
            for kernel in self.kernels:
                if kernel.applies(*args, **kwargs):
                    return kernel
        return Kernel("reference", lambda *a, **k: True, self.reference)


@contextlib.contextmanager
def references() -> Iterator[None]:
    """Every op runs its reference inside the block."""
    global _references_only
    previous, _references_only = _references_only, True
    try:
        yield
    finally:
        _references_only = previous


def _channels_last(*maps: Tensor | None) -> bool:
    return all(t is None or t.is_contiguous(memory_format=torch.channels_last) for t in maps)


def _float32_cpu_inference(x: Tensor, weight: Tensor) -> bool:
    return layout.cpu_float32_inference(x, weight)


def decoder_precision(device: torch.device, precision: str) -> str:
    """The decoder's precision in inference at `precision`: bfloat16 decodes in float32 on a CPU
    with the fused kernels (float32 only, and there faster than PyTorch's bfloat16 operators: 1.5x
    on an AVX-512 EPYC that runs bfloat16 natively; bfloat16 products inside the kernels were
    tried: docs/performance.md). The first call on a CPU builds or loads them."""
    if precision == "bfloat16" and device.type == "cpu" and not _references_only and cpu.prepare():
        return "float32"
    return precision


def native_bfloat16(device: torch.device) -> bool:
    """Whether bfloat16 runs at its native rate on `device`: GPUs of compute capability 8.0 on
    (emulated bfloat16 on older ones is slow), CPUs whose oneDNN has AVX512-BF16 or AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu" and layout.onednn_bfloat16_native()


# Pointwise layers (a Linear over the channel axis of an NCHW map) ------------------------------------


def _pointwise_reference(x: Tensor, layer: nn.Linear, activation: str | None = None) -> Tensor:
    y = F.conv2d(x, layer.weight[:, :, None, None], layer.bias)
    if activation == "gelu":
        return F.gelu(y)
    return F.relu(y, inplace=True) if activation == "relu" else y


pointwise = Op(
    "pointwise",
    _pointwise_reference,
    (Kernel("onednn_linear", lambda x, layer, activation=None: _float32_cpu_inference(x, layer.weight), lambda *a, **k: layout.pointwise(*a, **k)),),
)


def _mlp_reference(x: Tensor, fc1: nn.Linear, activation: str, fc2: nn.Linear) -> Tensor:
    return pointwise(pointwise(x, fc1, activation), fc2)


mlp = Op(
    "mlp",
    _mlp_reference,
    (Kernel("onednn_linear", lambda x, fc1, activation, fc2: _float32_cpu_inference(x, fc1.weight), lambda *a: layout.pointwise_mlp(*a)),),
)


def _residual_mlp_reference(
    x: Tensor, norm: nn.LayerNorm, fc1: nn.Linear, activation: str, fc2: nn.Linear, residual: Tensor, scale: Tensor | None = None, out: Tensor | None = None
) -> Tensor:
    y = mlp(channel_norm(x, norm), fc1, activation, fc2)
    if scale is not None:
        return torch.addcmul(residual, scale[:, None, None], y, out=out)
    return torch.add(residual, y, out=out) if out is not None else residual + y


def _residual_mlp_fused_applies(x: Tensor, norm: nn.LayerNorm, fc1: nn.Linear, activation: str, fc2: nn.Linear, residual: Tensor, scale: Tensor | None = None, out: Tensor | None = None) -> bool:
    return cpu.mlp_usable(x, fc1, fc2) and _channels_last(residual, out)


def _residual_mlp_fused(x: Tensor, norm: nn.LayerNorm, fc1: nn.Linear, activation: str, fc2: nn.Linear, residual: Tensor, scale: Tensor | None = None, out: Tensor | None = None) -> Tensor:
    return cpu.pointwise_mlp(x, fc1, activation, fc2, residual=residual, scale=scale, out=out, norm=norm)


def _residual_mlp_onednn_bf16_applies(x: Tensor, norm: nn.LayerNorm, fc1: nn.Linear, activation: str, fc2: nn.Linear, residual: Tensor, scale: Tensor | None = None, out: Tensor | None = None) -> bool:
    return activation == "gelu" and fc1.bias is not None and fc2.bias is not None and _channels_last(x) and layout.bfloat16_cpu_inference(x)


def _residual_mlp_onednn_bf16(x: Tensor, norm: nn.LayerNorm, fc1: nn.Linear, activation: str, fc2: nn.Linear, residual: Tensor, scale: Tensor | None = None, out: Tensor | None = None) -> Tensor:
    return layout.residual_mlp_bfloat16(x, norm, fc1, fc2, residual, scale, out)


# `residual + scale * fc2(activation(fc1(norm(x))))` over the channel axis (ConvNeXt blocks, class
# attention's MLP); `out` (inference only) receives it and may be `residual` or `x`.
residual_mlp = Op(
    "residual_mlp",
    _residual_mlp_reference,
    (
        Kernel("fused_cpu", _residual_mlp_fused_applies, _residual_mlp_fused),
        Kernel("onednn_bf16", _residual_mlp_onednn_bf16_applies, _residual_mlp_onednn_bf16),
    ),
)


# Class attention's linear attention (elu + 1 feature map), per image over its classes -------------------


def _attention_sums_reference(k: Tensor, v: Tensor, running: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
    k = F.elu(k.float()).add_(1)
    with torch.autocast(k.device.type, enabled=False):  # sums over hundreds of classes: float32
        sums = torch.bmm(k.permute(1, 2, 0), v.float().transpose(0, 1)), k.sum(dim=0)
    return sums if running is None else (running[0] + sums[0], running[1] + sums[1])


def _attention_sums_fused(k: Tensor, v: Tensor, running: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
    if running is None:
        running = (k.new_zeros(k.shape[1], k.shape[2], k.shape[2]), k.new_zeros(k.shape[1:]))
    cpu.linear_attention_sums_(k, v, *running)  # accumulates into `running`, in place
    return running


# `sum phi(k) v^T` `(positions*heads, d, d)` and `sum phi(k)` over rows `(rows, positions*heads, d)`, added to `running`.
attention_sums = Op(
    "attention_sums", _attention_sums_reference, (Kernel("fused_cpu", lambda k, v, running: cpu.usable(k, v), _attention_sums_fused),)
)


def _attention_apply_reference(q: Tensor, kv: Tensor, k_sum: Tensor, residual: Tensor, eps: float) -> Tensor:
    q = F.elu(q.float()).add_(1).transpose(0, 1)  # (positions*heads, rows, d)
    with torch.autocast(q.device.type, enabled=False):
        numerator = torch.bmm(q, kv)
        denominator = torch.bmm(q, k_sum.unsqueeze(-1)).add_(eps)
        return torch.addcdiv(residual, numerator.transpose(0, 1), denominator.transpose(0, 1))


# `residual + phi(q) kv / (phi(q) . k_sum + eps)` per row, position and head: `(rows, positions*heads, d)`.
attention_apply = Op(
    "attention_apply",
    _attention_apply_reference,
    (Kernel("fused_cpu", lambda q, kv, k_sum, residual, eps: cpu.usable(q, kv), lambda *a: cpu.linear_attention(*a)),),
)


# Normalisation and convolutions of the up-stages --------------------------------------------------------


def _group_norm_relu_reference(x: Tensor, norm: nn.GroupNorm, add: Tensor | None = None, out: Tensor | None = None) -> Tensor:
    y = norm(x if add is None else x + add)
    return F.relu(y, inplace=True) if out is None else torch.clamp_min(y, 0, out=out)


# `relu(norm(x + add))` (`add`: `(1, C, H, W)`, broadcast over the rows) into `out` if given
# (inference only), else possibly over `x`, which the caller gives up.
group_norm_relu = Op(
    "group_norm_relu",
    _group_norm_relu_reference,
    (
        Kernel(
            "fused_cpu",
            lambda x, norm, add=None, out=None: cpu.usable(x, norm.weight) and _channels_last(x, add),
            lambda x, norm, add=None, out=None: cpu.group_norm_relu(x, norm, add, x if out is None else out),
        ),
    ),
)


def _winograd_applies(x: Tensor, weight: Tensor, owner: nn.Conv2d, second: Tensor | None = None) -> bool:
    """Whether the Winograd kernel computes `owner`'s conv (padding 1, stride 1, no dilation or
    bias) with `weight` over `x` (and `second`)."""
    plain = owner.padding == (1, 1) and owner.stride == (1, 1) and owner.dilation == (1, 1) and owner.bias is None
    return plain and cpu.winograd_usable(x, weight, second)


def _conv3x3_reference(x: Tensor, weight: Tensor, owner: nn.Conv2d, second: Tensor | None = None) -> Tensor:
    if second is not None:
        x = torch.cat([x, second], dim=1)
    return F.conv2d(x, weight, padding=owner.padding)


# The fusion convs (3x3, padding 1, no bias) with `weight` (`owner`'s, or made from it) over `x`, or
# over `x` and `second` concatenated; on CPUs Winograd's F(4x4, 3x3) reads both maps where they are.
conv3x3 = Op(
    "conv3x3",
    _conv3x3_reference,
    (Kernel("winograd_cpu", _winograd_applies, lambda x, weight, owner, second=None: cpu.winograd_conv3x3(x, weight, owner, second)),),
)


def _conv3x3_norm_relu_reference(
    x: Tensor, weight: Tensor, owner: nn.Conv2d, norm: nn.GroupNorm, second: Tensor | None = None, add: Tensor | None = None, out: Tensor | None = None
) -> Tensor:
    return group_norm_relu(conv3x3(x, weight, owner, second), norm, add=add, out=out)


def _conv3x3_norm_relu_fused_applies(
    x: Tensor, weight: Tensor, owner: nn.Conv2d, norm: nn.GroupNorm, second: Tensor | None = None, add: Tensor | None = None, out: Tensor | None = None
) -> bool:
    return _channels_last(add) and _winograd_applies(x, weight, owner, second) and cpu.usable(x, norm.weight)


def _conv3x3_norm_relu_fused(
    x: Tensor, weight: Tensor, owner: nn.Conv2d, norm: nn.GroupNorm, second: Tensor | None = None, add: Tensor | None = None, out: Tensor | None = None
) -> Tensor:
    # The Winograd kernel adds `add` and sums what it writes per row and channel, so GroupNorm reads
    # its input once instead of twice (measured on a 2-core AMD EPYC with AVX-512: the decoder
    # 1-13% faster at T=150, about 4% taking out the advantage of running first; equal at T=32).
    moments = torch.empty((x.shape[0], 2, weight.shape[0]), dtype=torch.float64, device=x.device)
    y = cpu.winograd_conv3x3(x, weight, owner, second, add=add, moments=moments)
    return cpu.group_norm_relu(y, norm, None, y if out is None else out, moments)


# One of the double conv's steps: `relu(norm(conv3x3 + add))`.
conv3x3_norm_relu = Op(
    "conv3x3_norm_relu", _conv3x3_norm_relu_reference, (Kernel("winograd_moments_cpu", _conv3x3_norm_relu_fused_applies, _conv3x3_norm_relu_fused),)
)


def _transposed_relu_reference(x: Tensor, up: nn.ConvTranspose2d) -> Tensor:
    return F.relu(up(x), inplace=True)


def _transposed_relu_cpu(x: Tensor, up: nn.ConvTranspose2d) -> Tensor:
    out = torch.empty((x.shape[0], up.out_channels, 2 * x.shape[-2], 2 * x.shape[-1]), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    cpu.transposed_conv2x2_into(x, up, out, relu=True)
    return out


# `relu(up(x))` for the correlation guidance's 2x2 transposed convs with stride 2. On CPUs the kernel
# (measured on a 2-core AMD EPYC with AVX-512: the 80 -> 32, 32 -> 16 and 16 -> 8 projections 10-20%
# faster than oneDNN's alone), else oneDNN with the ReLU fused.
transposed_conv2x2_relu = Op(
    "transposed_conv2x2_relu",
    _transposed_relu_reference,
    (
        Kernel("fused_cpu", lambda x, up: cpu.transposed_conv2x2_usable(x, up), _transposed_relu_cpu),
        Kernel("onednn_fused_relu", lambda x, up: _float32_cpu_inference(x, up.weight), lambda x, up: layout.up_relu(x, up)),
    ),
)


def _fusion_conv_reference(
    x: Tensor, up: nn.ConvTranspose2d, correlation: Tensor, weight: Tensor, owner: nn.Conv2d, norm: nn.GroupNorm, add: Tensor, buffer: Tensor | None = None
) -> Tensor:
    parts = [up(x), correlation]
    concatenated = torch.cat(parts, dim=1) if buffer is None else torch.cat(parts, dim=1, out=buffer[: x.shape[0]])
    return conv3x3_norm_relu(concatenated, weight, owner, norm, add=add)


def _fusion_conv_cpu(
    x: Tensor, up: nn.ConvTranspose2d, correlation: Tensor, weight: Tensor, owner: nn.Conv2d, norm: nn.GroupNorm, add: Tensor, buffer: Tensor | None = None
) -> Tensor:
    upsampled = _channels_last_map(buffer, (x.shape[0], up.out_channels, *correlation.shape[-2:]))
    cpu.transposed_conv2x2_into(x, up, upsampled, relu=False)
    return conv3x3_norm_relu(upsampled, weight, owner, norm, second=correlation, add=add)


# An up-stage's first fusion conv: `relu(norm(conv3x3([up(x), correlation]) + add))`. `buffer`
# (inference only; channels-last, rows enough) is memory for the conv's input; on CPUs only the
# up-sampled map goes there, and the conv reads it and the correlation guidance where they are.
fusion_conv = Op(
    "fusion_conv",
    _fusion_conv_reference,
    (
        Kernel(
            "fused_cpu",
            lambda x, up, correlation, weight, owner, norm, add, buffer=None: buffer is not None and cpu.transposed_conv2x2_usable(x, up),
            _fusion_conv_cpu,
        ),
    ),
)


def _channels_last_map(buffer: Tensor, shape: tuple[int, int, int, int]) -> Tensor:
    """A channels-last map of `shape` (N, C, H, W) over the start of the channels-last `buffer`'s
    memory (which must hold at least as many elements)."""
    n, channels, height, width = shape
    memory = buffer.permute(0, 2, 3, 1).view(-1)
    return memory[: n * channels * height * width].view(n, height, width, channels).permute(0, 3, 1, 2)


# The heads: 3x3 conv to one channel, `(n, 1, h, w)` logits.
head = Op(
    "head",
    lambda layer, x: layer(x),
    (Kernel("fused_cpu", lambda layer, x: cpu.head_usable(x, layer), lambda layer, x: cpu.single_channel_conv3x3(x, layer)),),
)


def _embed_reference(x: Tensor, conv: nn.Conv2d, cache: SpectrumCache) -> Tensor:
    return conv(layout.channels_last(x))


# conv1 over rows of the cost volume (`(n, P, h, w)` in; out in whichever memory format the route
# makes); on CPUs through the FFT (a 7x7 kernel: about 15x fewer multiplications), with the
# weight's spectrum kept in `cache`.
embed = Op(
    "embed",
    _embed_reference,
    (
        Kernel(
            "fft_cpu",
            lambda x, conv, cache: fft_pays(x, conv.weight),
            lambda x, conv, cache: fft_conv2d(x, conv.weight, conv.bias, conv.padding[0], cache),
        ),
    ),
)

OPS = (pointwise, mlp, residual_mlp, attention_sums, attention_apply, group_norm_relu, conv3x3, conv3x3_norm_relu, transposed_conv2x2_relu, fusion_conv, head, embed)

"""Fused CPU kernels for the decoder's float32 inference, compiled on first use (`csrc/cpu_kernels.cpp`).

Class attention, GroupNorm + ReLU and the narrow MLPs run on maps of 10-40 MB per chunk of rows,
where PyTorch's operators make one pass over memory each: elu, its +1, two batched products of 8x8
matrices per position, the division and the residual add; the appearance term's add, GroupNorm,
ReLU; an MLP's hidden activation (4x its input) written, activated and read back, then the layer
scale and residual. The kernels here do each group in one or two passes, with the layers' own
arithmetic (float32; GroupNorm's moments in double; erf within 5e-7 of the exact value). Three
more replace oneDNN where it is slow for SED's shapes: the heads (3x3 to one channel), the 2x2
transposed convs (into memory kept for all chunks) and the 3x3 convs (Winograd F(4x4, 3x3): 4x
fewer multiplications; it rounds about 10x more than the direct kernel per conv, which leaves the
fixture model's outputs within 2.5e-6 of the paper's, 40x inside the tolerance).

They are C++ built with `torch.utils.cpp_extension` into torch's extension cache
(`TORCH_EXTENSIONS_DIR`, by default `~/.cache/torch_extensions`): about 20 s the first time on a
machine (and after the source changes), loaded from there by every later process. Without a C++
compiler, or if the build fails, a warning says why once and the decoder runs PyTorch's operators,
which give the same results within float32 rounding. `SED_CPU_KERNELS=0` turns the kernels off.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import warnings
import weakref
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from .layout import cpu_float32_inference, weight_key

_SOURCE = Path(__file__).resolve().parent / "csrc" / "cpu_kernels.cpp"
# Compiler flags per instruction set torch's own kernels were dispatched to on this CPU. The
# library's name carries it, so a cache shared by different machines keeps one build per set.
_ISA_FLAGS = {
    "AVX2": ["-mavx2", "-mfma"],
    "AVX512": ["-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"],
}
# The MLP kernel runs MLPs up to this width (C -> 4C -> C; SED's decoder has 32, 64 and 128):
# measured side by side on a 2-core AMD EPYC with AVX2, at C = 32 and 64 it is 1.2-1.9x faster than
# oneDNN's products with the hidden activation in memory, at 128 equal alone and ~3% faster in the
# decoder (its LayerNorm inside); on an AVX-512 EPYC with 16-float vectors ConvNeXt-B's first backbone stage
# (128) 1.26x faster, from 256 on equal or slower, so wider layers stay with oneDNN.
MLP_KERNEL_MAX_CHANNELS = 128
_enabled = os.environ.get("SED_CPU_KERNELS", "1") != "0"
_transposed_weights: weakref.WeakKeyDictionary[nn.Linear, tuple[tuple, torch.Tensor]] = weakref.WeakKeyDictionary()
logger = logging.getLogger(__name__)


@functools.cache
def available() -> bool:
    """Build (once per machine and source version) and load the kernels; False if that fails."""
    isa = torch.backends.cpu.get_cpu_capability()
    try:
        # Importing it warns that there is no CUDA, which is beside the point for CPU kernels.
        extension_logger = logging.getLogger("torch.utils.cpp_extension")
        level = extension_logger.level
        extension_logger.setLevel(logging.ERROR)
        try:
            from torch.utils import cpp_extension
        finally:
            extension_logger.setLevel(level)

        logger.info("loading SED's CPU kernels (built once per machine, about 20 s)")
        cpp_extension.load(
            name=f"sed_cpu_kernels_{isa.lower()}",
            sources=[str(_SOURCE)],
            # OpenMP: `at::parallel_for` is inline, so its threads are compiled into the kernels; the
            # runtime is the one torch has loaded already (the same soname).
            extra_cflags=["-O3", "-fopenmp", *_ISA_FLAGS.get(isa, [])],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
    except Exception as error:  # a missing compiler, a failed build: fall back, say so once
        warnings.warn(f"SED's fused CPU kernels are unavailable, using PyTorch's operators instead: {error}", stacklevel=2)
        return False
    return True


def usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the kernels apply to `x` with a layer of `weight`: float32 CPU inference, kernels on and built."""
    return _enabled and cpu_float32_inference(x, weight) and available()


def prepare() -> bool:
    """Build or load the kernels now if they are on (not turned off); whether they are usable."""
    return _enabled and available()


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Run PyTorch's operators instead of the kernels inside the block (tests, benchmarks)."""
    global _enabled
    previous, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = previous


def linear_attention_sums_(k: torch.Tensor, v: torch.Tensor, kv: torch.Tensor, k_sum: torch.Tensor) -> None:
    """`kv += sum_n phi(k_n) v_n^T`, `k_sum += sum_n phi(k_n)` with `phi = elu + 1`, per head.

    `k`, `v`: `(rows, heads, d)`; `kv`: `(heads, d, d)`; `k_sum`: `(heads, d)`; all contiguous.
    """
    torch.ops.sed_cpu.linear_attention_sums_(k.contiguous(), v.contiguous(), kv, k_sum)


def linear_attention(q: torch.Tensor, kv: torch.Tensor, k_sum: torch.Tensor, residual: torch.Tensor, eps: float) -> torch.Tensor:
    """`residual + phi(q) kv / (phi(q) . k_sum + eps)` per row and head; `q`, `residual`: `(rows, heads, d)`."""
    return torch.ops.sed_cpu.linear_attention(q.contiguous(), kv, k_sum, residual.contiguous(), eps)


def group_norm_relu(
    x: torch.Tensor, norm: nn.GroupNorm, add: torch.Tensor | None, out: torch.Tensor, moments: torch.Tensor | None = None
) -> torch.Tensor:
    """`relu(norm(x + add))` into `out` (which may be `x`) for channels-last `(N, C, H, W)` maps;
    `add` is `(1, C, H, W)`, the same for every row, or None. `moments`: `x + add`'s per row and
    channel sums and sums of squares `(N, 2, C)` in float64 if known (`winograd_conv3x3` makes
    them), which saves a pass over `x`."""
    n, channels, height, width = x.shape

    def rows(t: torch.Tensor) -> torch.Tensor:  # a view for a channels-last map
        return t.permute(0, 2, 3, 1).view(t.shape[0], height * width, channels)

    torch.ops.sed_cpu.group_norm_relu(
        rows(x), None if add is None else rows(add), norm.num_groups, norm.weight, norm.bias, norm.eps, rows(out), moments
    )
    return out


def mlp_usable(x: torch.Tensor, fc1: nn.Linear, fc2: nn.Linear) -> bool:
    """Whether `pointwise_mlp` applies: `usable`, a channels-last map, widths that are multiples of
    16 up to `MLP_KERNEL_MAX_CHANNELS`, and biases."""
    return (
        fc1.in_features <= MLP_KERNEL_MAX_CHANNELS
        and fc1.out_features % 16 == 0
        and fc2.out_features % 16 == 0
        and fc1.bias is not None
        and fc2.bias is not None
        and x.is_contiguous(memory_format=torch.channels_last)
        and usable(x, fc1.weight)
    )


def pointwise_mlp(
    x: torch.Tensor,
    fc1: nn.Linear,
    activation: str,
    fc2: nn.Linear,
    residual: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    norm: nn.LayerNorm | None = None,
) -> torch.Tensor:
    """`residual + scale * fc2(activation(fc1(norm(x))))` over the channel axis of channels-last
    `(N, C, H, W)` maps (`scale` per channel; `activation` `"gelu"` (exact) or `"relu"`; `norm` a
    LayerNorm over the channels, or None), into `out` (which may be `residual`, which may be `x`)
    or a new map. Check `mlp_usable` first.
    """
    n, channels, height, width = x.shape
    if out is None:
        out = torch.empty((n, fc2.out_features, height, width), dtype=x.dtype, memory_format=torch.channels_last)

    def rows(t: torch.Tensor) -> torch.Tensor:  # a view for a channels-last map
        return t.permute(0, 2, 3, 1).view(n * height * width, t.shape[1])

    torch.ops.sed_cpu.pointwise_mlp(
        rows(x),
        None if norm is None else norm.weight,
        None if norm is None else norm.bias,
        1e-5 if norm is None else norm.eps,
        _transposed(fc1),
        fc1.bias,
        _transposed(fc2),
        fc2.bias,
        activation,
        None if residual is None else rows(residual),
        scale,
        rows(out),
    )
    return out


def _transposed(layer: nn.Linear) -> torch.Tensor:
    """`layer.weight.T`, contiguous (the kernel's layout), made once per weight version."""
    key = weight_key(layer.weight)
    cached = _transposed_weights.get(layer)
    if key is None or cached is None or cached[0] != key:
        cached = (key, layer.weight.detach().t().contiguous())
        if key is not None:
            _transposed_weights[layer] = cached
    return cached[1]


def _plain_conv(conv: nn.Module, kernel: int, stride: int, padding: int) -> bool:
    """A (transposed) convolution with this square kernel, stride and padding, no dilation or
    groups, and a bias."""
    return (
        conv.kernel_size == (kernel, kernel)
        and conv.stride == (stride, stride)
        and conv.padding == (padding, padding)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.bias is not None
    )


def head_usable(x: torch.Tensor, head: nn.Conv2d) -> bool:
    """Whether `single_channel_conv3x3` applies: `usable`, a channels-last map, a 3x3 convolution
    to one channel with padding 1 (stride 1, a bias), and a multiple of 8 input channels."""
    return (
        head.out_channels == 1
        and _plain_conv(head, kernel=3, stride=1, padding=1)
        and head.in_channels % 8 == 0
        and x.is_contiguous(memory_format=torch.channels_last)
        and usable(x, head.weight)
    )


def single_channel_conv3x3(x: torch.Tensor, head: nn.Conv2d) -> torch.Tensor:
    """`head(x)` for a head `head_usable` accepts: `(N, 1, H, W)`."""
    weight = head.weight[0].permute(1, 2, 0).contiguous()  # (3, 3, C)
    return torch.ops.sed_cpu.single_channel_conv3x3(x.permute(0, 2, 3, 1), weight, head.bias)


def transposed_conv2x2_usable(x: torch.Tensor, up: nn.ConvTranspose2d) -> bool:
    """Whether `transposed_conv2x2_into` applies: `usable`, a channels-last map, a 2x2 transposed
    convolution with stride 2 (no padding, groups or dilation; a bias) to a multiple of 4 channels."""
    return (
        _plain_conv(up, kernel=2, stride=2, padding=0)
        and up.output_padding == (0, 0)
        and up.out_channels % 4 == 0
        and x.is_contiguous(memory_format=torch.channels_last)
        and usable(x, up.weight)
    )


def transposed_conv2x2_into(x: torch.Tensor, up: nn.ConvTranspose2d, out: torch.Tensor, relu: bool) -> None:
    """`up(x)` (then ReLU if `relu`) written into the channels-last map `out`
    `(N, up.out_channels, 2H, 2W)`."""
    weight, bias = _transposed_conv_weight(up)
    torch.ops.sed_cpu.transposed_conv2x2_into(x.permute(0, 2, 3, 1), weight, bias, relu, out.permute(0, 2, 3, 1))


def _transposed_conv_weight(up: nn.ConvTranspose2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's `(C_in, 2 x 2 x C_out)` weight (columns ordered by output offset, then channel)
    and the bias repeated to match, made once per weight version."""
    key = weight_key(up.weight)
    cached = _transposed_weights.get(up)
    if key is None or cached is None or cached[0] != key:
        weight = up.weight.detach().permute(0, 2, 3, 1).reshape(up.in_channels, -1).contiguous()
        cached = (key, (weight, up.bias.detach().repeat(4)))
        if key is not None:
            _transposed_weights[up] = cached
    return cached[1]


# Winograd F(4x4, 3x3)'s weight transform G (6 x 3), at the usual points 0, +-1, +-2 and infinity,
# as the (36 x 9) map of G g G^T's entries (made in float64, so the transformed weights are rounded
# once). The points 0, 1, -1, 2, -1/2 round 3x less but cost 8-21% more time in the transforms.
_WINOGRAD_G = torch.tensor(
    [
        [1 / 4, 0.0, 0.0],
        [-1 / 6, -1 / 6, -1 / 6],
        [-1 / 6, 1 / 6, -1 / 6],
        [1 / 24, 1 / 12, 1 / 6],
        [1 / 24, -1 / 12, 1 / 6],
        [0.0, 0.0, 1.0],
    ],
    dtype=torch.float64,
)
_WINOGRAD_WEIGHT_MAP = torch.kron(_WINOGRAD_G, _WINOGRAD_G)
# The Winograd kernel takes the 3x3 convolutions from this many input channels on: measured on a
# 2-core AMD EPYC with AVX2 against oneDNN's direct kernel, 1.4x faster at 16 -> 16 channels (the
# last stage's second conv) and 1.6-2.2x from 32 on (the fusion convs, the other second convs).
WINOGRAD_MIN_CHANNELS = 16
_winograd_weights: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, torch.Tensor]] = weakref.WeakKeyDictionary()


def winograd_usable(x: torch.Tensor, weight: torch.Tensor, second: torch.Tensor | None = None) -> bool:
    """Whether `winograd_conv3x3` applies to `x` (and `second`, whose channels follow `x`'s):
    `usable`, channels-last maps whose height and width are multiples of 4 (whole output tiles), a
    3x3 weight with at least `WINOGRAD_MIN_CHANNELS` input channels (a multiple of 8 in each map)
    and a multiple of 16 output channels."""
    out_channels, in_channels, kh, kw = weight.shape
    maps = (x,) if second is None else (x, second)
    return (
        (kh, kw) == (3, 3)
        and in_channels >= WINOGRAD_MIN_CHANNELS
        and out_channels % 16 == 0
        and sum(t.shape[1] for t in maps) == in_channels
        and all(t.shape[1] % 8 == 0 and t.shape[0] == x.shape[0] and t.shape[-2:] == x.shape[-2:] for t in maps)
        and x.shape[-2] % 4 == 0
        and x.shape[-1] % 4 == 0
        and all(t.is_contiguous(memory_format=torch.channels_last) for t in maps)
        and usable(x, weight)
    )


def winograd_conv3x3(
    x: torch.Tensor,
    weight: torch.Tensor,
    owner: nn.Module | None = None,
    second: torch.Tensor | None = None,
    add: torch.Tensor | None = None,
    moments: torch.Tensor | None = None,
) -> torch.Tensor:
    """`F.conv2d(x, weight, padding=1)` (no bias) by Winograd's F(4x4, 3x3); channels-last out.
    With `second`, the input is `torch.cat([x, second], dim=1)`, read from the two maps (no copy).
    With `add` (a channels-last `(1, C_out, H, W)` map), that map is added to every row's output.
    With `moments` (`(N, 2, C_out)` float64), the output's per row and channel sums and sums of
    squares are written there, for `group_norm_relu`.

    With `owner` (the module whose weight `weight` is, or is made from), the transformed weight
    is kept per weight version instead of being made on each call.
    """
    key = None if owner is None else weight_key(owner.weight)
    cached = None if key is None else _winograd_weights.get(owner)
    if cached is None or cached[0] != (key, weight.shape):
        out_channels, in_channels = weight.shape[:2]
        u = weight.detach().reshape(-1, 9).double() @ _WINOGRAD_WEIGHT_MAP.to(weight.device).T
        cached = ((key, weight.shape), u.float().view(out_channels, in_channels, 36).permute(2, 1, 0).contiguous())
        if key is not None:
            _winograd_weights[owner] = cached
    second_nhwc = None if second is None else second.permute(0, 2, 3, 1)
    add_nhwc = None if add is None else add.permute(0, 2, 3, 1)
    y = torch.ops.sed_cpu.winograd_conv3x3(x.permute(0, 2, 3, 1), second_nhwc, cached[1], add_nhwc, moments)
    return y.permute(0, 3, 1, 2)

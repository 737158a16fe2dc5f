"""Channels-last helpers: how SED's layers reach oneDNN's fast CPU kernels.

On CPUs, oneDNN runs convolutions on channels-last (NHWC) maps several times faster than on NCHW
ones, and a pointwise `Linear` as oneDNN's matrix product on the positions of a channels-last map
faster than MKL's (MKL is slow on AMD CPUs). In inference on CPU, a ReLU is fused into that
product; an exact GELU runs in place after it, which is faster than oneDNN's fused erf GELU
(measured on a 2-core AMD EPYC: ConvNeXt-B's 512 -> 2048 MLP 8% faster, its 128 -> 512 at 192x192
11%). These helpers compute exactly what the layers they take define, in that layout. In bfloat16
autocast on a CPU whose oneDNN runs bfloat16 natively (AVX512-BF16 or AMX, `onednn_bfloat16_native`),
a ConvNeXt block's MLP runs as two fused bfloat16 products (`residual_mlp_bfloat16`).
"""

from __future__ import annotations

import functools
import weakref

import torch
import torch.nn.functional as F
from timm.layers.activations import GELU as TimmGELU
from torch import nn

# oneDNN post-ops fused into the product (GELU is applied after it, see the module docstring).
_FUSED_ACTIVATIONS = {"relu": ("relu", "")}
# The largest hidden activation `pointwise_mlp` makes at once in CPU inference: below glibc's mmap
# threshold (32 MiB, `allocator.py`), so it comes from the heap that keeps freed memory instead of a
# fresh mapping whose pages fault in on every call. Measured on a 2-core AMD EPYC: the decoder's
# last ConvNeXt MLP (8 rows, 32 -> 128 -> 32 channels at 96x96, a 38 MB hidden) 32 against 53 ms.
HIDDEN_BYTES = 24 * 2**20
# Linear weights up to this size are kept packed in oneDNN's layout (`_packed_weight`); larger ones
# are reordered by oneDNN on each call, which costs ~3% of such a call but saves a second copy of
# the weights (324 MB for ConvNeXt-B's trunk).
PACKED_WEIGHT_BYTES = 2**20
# Rows per product that packed weights are laid out for; any count works.
_PACKING_ROWS = 1024
_packed_weights: weakref.WeakKeyDictionary[nn.Linear, tuple[tuple, torch.Tensor]] = weakref.WeakKeyDictionary()


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (`/proc/cpuinfo`; empty where there is none to read)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return frozenset(next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), []))
    except OSError:
        return frozenset()


def onednn_bfloat16_native() -> bool:
    """Whether oneDNN runs bfloat16 products natively here: AVX512-BF16 or AMX (else it emulates
    them, several times slower than float32)."""
    return torch.backends.mkldnn.is_available() and bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def bfloat16_cpu_inference(x: torch.Tensor) -> bool:
    """bfloat16 autocast inference on a CPU whose oneDNN runs bfloat16 natively."""
    return (
        x.device.type == "cpu"
        and not torch.is_grad_enabled()
        and torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
        and onednn_bfloat16_native()
    )


def channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


def activation_name(module: nn.Module) -> str | None:
    """`"gelu"` (exact) or `"relu"` if `module` is that activation, else None.

    timm's own `GELU` (exact, what OpenCLIP's ConvNeXt towers are built with) counts as GELU.
    """
    if (type(module) is nn.GELU and module.approximate == "none") or type(module) is TimmGELU:
        return "gelu"
    if type(module) is nn.ReLU:
        return "relu"
    return None


def cpu_float32_inference(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Float32 inference on CPU without autocast: where this package's CPU-only routes apply.

    oneDNN's fused operators have no autograd and no autocast rule, and the routes are chosen for
    CPU kernels (on GPUs cuDNN's own are faster).
    """
    return (
        x.device.type == "cpu"
        and not torch.is_grad_enabled()
        and not torch.is_autocast_enabled("cpu")
        and x.dtype == weight.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
    )


def pointwise(x: torch.Tensor, layer: nn.Linear, activation: str | None = None) -> torch.Tensor:
    """`layer` over the channel axis of an NCHW map, as a 1x1 convolution, then `activation`.

    `activation` is None, `"gelu"` (exact) or `"relu"`. In CPU inference it is oneDNN's matrix
    product on the positions (ReLU fused, GELU in place after it): as fast as a 1x1 convolution for
    most shapes and 3x faster for wide inputs on few positions (measured on a 2-core AMD EPYC:
    ConvNeXt-B's last-stage 4096 -> 1024 at 24x24, 41 against 137 ms as a convolution).
    """
    if cpu_float32_inference(x, layer.weight):
        n, channels, height, width = x.shape
        rows = x.permute(0, 2, 3, 1).reshape(-1, channels)  # a view when `x` is channels-last
        return _linear_rows(rows, layer, activation).view(n, height, width, -1).permute(0, 3, 1, 2)
    y = F.conv2d(x, layer.weight[:, :, None, None], layer.bias)
    if activation == "gelu":
        return F.gelu(y)
    if activation == "relu":
        return F.relu(y, inplace=True)
    return y


def pointwise_mlp(x: torch.Tensor, fc1: nn.Linear, activation: str, fc2: nn.Linear) -> torch.Tensor:
    """`fc2(activation(fc1(x)))` over the channel axis of an NCHW map (`pointwise` twice);
    `activation` is `"gelu"` (exact) or `"relu"`.

    In CPU inference on a channels-last map, it runs over groups of positions whose hidden
    activation fits in `HIDDEN_BYTES`.
    """
    n, channels, height, width = x.shape
    group = max(1, HIDDEN_BYTES // (fc1.out_features * x.element_size()))
    if not (cpu_float32_inference(x, fc1.weight) and x.is_contiguous(memory_format=torch.channels_last)) or n * height * width <= group:
        return pointwise(pointwise(x, fc1, activation), fc2)
    rows = x.permute(0, 2, 3, 1).reshape(-1, channels)
    out = torch.empty(rows.shape[0], fc2.out_features, dtype=x.dtype)
    for first in range(0, rows.shape[0], group):
        hidden = _linear_rows(rows[first : first + group], fc1, activation)
        out[first : first + group] = _linear_rows(hidden, fc2, None)
    return out.view(n, height, width, -1).permute(0, 3, 1, 2)


def _linear_rows(rows: torch.Tensor, layer: nn.Linear, activation: str | None) -> torch.Tensor:
    """oneDNN's matrix product `(positions, channels) -> (positions, out)`, then `activation`."""
    attr, algorithm = _FUSED_ACTIVATIONS.get(activation, ("none", ""))
    small = layer.weight.numel() * layer.weight.element_size() <= PACKED_WEIGHT_BYTES
    weight = _packed_weight(layer) if small else layer.weight
    y = torch.ops.mkldnn._linear_pointwise(rows, weight, layer.bias, attr, [], algorithm)
    return torch.ops.aten.gelu_(y) if activation == "gelu" else y


def up_relu(x: torch.Tensor, up: nn.ConvTranspose2d) -> torch.Tensor:
    """`relu(up(x))`; in CPU inference one oneDNN call with the ReLU fused (measured on a 2-core
    AMD EPYC: the decoder's correlation projections 30-40% faster)."""
    if not cpu_float32_inference(x, up.weight):
        return F.relu(up(x), inplace=True)
    return torch.ops.mkldnn._convolution_transpose_pointwise(
        x, up.weight, up.bias, list(up.padding), list(up.output_padding), list(up.stride), list(up.dilation), up.groups, "relu", [], ""
    )


def residual_mlp_bfloat16(
    x: torch.Tensor,
    norm: nn.LayerNorm,
    fc1: nn.Linear,
    fc2: nn.Linear,
    residual: torch.Tensor,
    scale: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """`residual + scale * fc2(gelu(fc1(norm(x))))` over the channel axis of a channels-last map
    in bfloat16 autocast inference (`bfloat16_cpu_inference`), as oneDNN's bfloat16 products with
    the exact GELU fused into the first and the layer scale folded into the second's weights
    (autocast's route runs each as a 1x1 convolution with GELU, the layer scale and the casts as
    passes of their own: measured on a 2-core AMD EPYC with AVX512-BF16, ConvNeXt-B's blocks
    13-27% faster). LayerNorm's statistics and the residual sum are float32; the result has the
    reference's dtype: `out`'s if given, else float32 (the layer scale or the residual is)."""
    n, channels, height, width = x.shape
    w1, b1, w2, b2 = _bfloat16_mlp_weights(fc1, fc2, scale)
    with torch.autocast("cpu", enabled=False):
        rows = x.permute(0, 2, 3, 1).reshape(-1, channels).to(torch.bfloat16)
        normed = F.layer_norm(rows, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        hidden = torch.ops.mkldnn._linear_pointwise(normed, w1, b1, "gelu", [], "none")
        if residual.dtype == torch.bfloat16 and residual.is_contiguous(memory_format=torch.channels_last):
            # the residual added by the product itself (oneDNN's binary post-op), summed in float32
            y = torch.ops.mkldnn._linear_pointwise.binary(hidden, residual.permute(0, 2, 3, 1).reshape(-1, channels), w2, b2, "add")
            y = y.view(n, height, width, -1).permute(0, 3, 1, 2)
            # the reference's dtype: its float32 layer scale promotes the sum to float32
            return out.copy_(y) if out is not None else y.float() if scale is not None else y
        y = torch.ops.mkldnn._linear_pointwise(hidden, w2, b2, "none", [], "")
        y = y.view(n, height, width, -1).permute(0, 3, 1, 2)
        return torch.add(residual, y, out=out) if out is not None else residual + y


_bfloat16_mlps: weakref.WeakKeyDictionary[nn.Linear, tuple[tuple, tuple[torch.Tensor, ...]]] = weakref.WeakKeyDictionary()


def _bfloat16_mlp_weights(fc1: nn.Linear, fc2: nn.Linear, scale: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """fc1's and fc2's weights and biases in bfloat16, `scale` folded into fc2's, the weights in
    oneDNN's packed layout; made once per weight version (never kept for inference tensors)."""
    keys = (weight_key(fc1.weight), weight_key(fc2.weight), None if scale is None else weight_key(scale))
    cached = _bfloat16_mlps.get(fc1)
    if cached is not None and cached[0] == keys:
        return cached[1]
    gain = torch.ones(fc2.out_features) if scale is None else scale.detach().float()
    w2 = fc2.weight.detach().float() * gain[:, None]
    b2 = fc2.bias.detach().float() * gain
    made = (
        torch.ops.mkldnn._reorder_linear_weight(fc1.weight.detach().to(torch.bfloat16), _PACKING_ROWS),
        fc1.bias.detach().to(torch.bfloat16),
        torch.ops.mkldnn._reorder_linear_weight(w2.to(torch.bfloat16), _PACKING_ROWS),
        b2.to(torch.bfloat16),
    )
    if keys[0] is not None and keys[1] is not None and (scale is None or keys[2] is not None):
        _bfloat16_mlps[fc1] = (keys, made)
    return made


def channel_norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """`norm` over the channel axis of an NCHW map; no copy when `x` is channels-last."""
    y = F.layer_norm(x.permute(0, 2, 3, 1), norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    return y.permute(0, 3, 1, 2)


def weight_key(weight: torch.Tensor) -> tuple | None:
    """What identifies `weight`'s current values for a cache of things made from it: its storage,
    version counter (bumped by every in-place update: a loaded checkpoint, an optimiser step),
    device and dtype. None for inference tensors (made under `torch.inference_mode`), which have no
    version counter: nothing made from them may be cached.
    """
    if weight.is_inference():
        return None
    return (weight.data_ptr(), weight._version, weight.device, weight.dtype)


def _packed_weight(layer: nn.Linear) -> torch.Tensor:
    """`layer.weight` in oneDNN's own blocked layout, made once per weight version.

    Given a plain weight, oneDNN reorders it on every call: 0.1-0.5 ms for the decoder's small
    layers, which it calls hundreds of times per image (measured on a 2-core AMD EPYC: its
    128 -> 512 product on 12,288 rows 16% faster packed). Kept per layer while it lives, and made
    again after any in-place change of the weight (never kept for inference tensors).
    """
    weight = layer.weight
    key = weight_key(weight)
    if key is None:
        return weight
    cached = _packed_weights.get(layer)
    if cached is None or cached[0] != key:
        cached = (key, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _PACKING_ROWS))
        _packed_weights[layer] = cached
    return cached[1]

"""Channels-last helpers: how SED's layers reach oneDNN's fast CPU kernels.

On CPUs, oneDNN runs convolutions on channels-last (NHWC) maps several times faster than on NCHW
ones, and a pointwise `Linear` as a 1x1 convolution faster than MKL's matrix product (MKL is slow
on AMD CPUs). These helpers compute exactly what the layers they take define, in that layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


def pointwise(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """`layer` over the channel axis of an NCHW map, as a 1x1 convolution."""
    return F.conv2d(x, layer.weight[:, :, None, None], layer.bias)


def channel_norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """`norm` over the channel axis of an NCHW map; no copy when `x` is channels-last."""
    y = F.layer_norm(x.permute(0, 2, 3, 1), norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    return y.permute(0, 3, 1, 2)

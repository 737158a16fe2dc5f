"""Fused CPU kernels for the decoder's float32 inference, compiled on first use (`csrc/cpu_kernels.cpp`).

Class attention and GroupNorm + ReLU run on maps of 10-40 MB per chunk of rows, where PyTorch's
operators make one pass over memory each: elu, its +1, two batched products of 8x8 matrices per
position, the division and the residual add; the appearance term's add, GroupNorm, ReLU. The
kernels here do each group in one or two passes, with the layers' own arithmetic (float32;
GroupNorm's moments in double).

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
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from .layout import cpu_float32_inference

_SOURCE = Path(__file__).resolve().parent / "csrc" / "cpu_kernels.cpp"
# Compiler flags per instruction set torch's own kernels were dispatched to on this CPU. The
# library's name carries it, so a cache shared by different machines keeps one build per set.
_ISA_FLAGS = {
    "AVX2": ["-mavx2", "-mfma"],
    "AVX512": ["-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"],
}
_enabled = os.environ.get("SED_CPU_KERNELS", "1") != "0"
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
            extra_cflags=["-O3", *_ISA_FLAGS.get(isa, [])],
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


def group_norm_relu(x: torch.Tensor, norm: nn.GroupNorm, add: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """`relu(norm(x + add))` into `out` (which may be `x`) for channels-last `(N, C, H, W)` maps;
    `add` is `(1, C, H, W)`, the same for every row, or None."""
    n, channels, height, width = x.shape

    def rows(t: torch.Tensor) -> torch.Tensor:  # a view for a channels-last map
        return t.permute(0, 2, 3, 1).view(t.shape[0], height * width, channels)

    torch.ops.sed_cpu.group_norm_relu(
        rows(x), None if add is None else rows(add), norm.num_groups, norm.weight, norm.bias, norm.eps, rows(out)
    )
    return out

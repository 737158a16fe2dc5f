"""A convolution through the FFT, for the decoder's first layer in CPU inference.

The decoder's `conv1` maps each class's cost volume (80 template channels on the stride-32 grid,
24x24 at 768 pixels) to 128 channels with a 7x7 kernel: 578 MFLOP per class, the largest single
layer per class. Through the FFT it is one product of a (rows x 80) by an (80 x 128) complex
matrix per frequency, about 15x fewer multiplications, and its float32 error is smaller than the
direct convolution's (measured against float64: about 1e-6 against 9e-6 for oneDNN's direct
kernel). Measured on a 2-core AMD EPYC with AVX2: 2.0-2.7 ms per class against 4.7-7.2 ms; since
with the smallest exact transform size and a contiguous product, 0.5 ms per class on an AVX-512 EPYC.

The weight's spectrum (39 MB for SED's conv1) is computed once and kept while the weight is
unchanged (`SpectrumCache`).
"""

from __future__ import annotations

import torch

from .layout import cpu_float32_inference, weight_key


def _transform_size(height: int, width: int, kernel: tuple[int, int]) -> tuple[int, int]:
    """The smallest FFT size whose circular convolution is exact on the "same" output positions.

    The full linear convolution has `n + k - 1` positions, of which the "same" ones are
    `p .. p + n - 1` (`p = k // 2`). A circular one of size `s` adds position `j + s` onto `j`, so
    with `s = n + p` only the last `p` positions (beyond `p + n - 1`) wrap around, onto the first
    `p`, which are discarded: 27 instead of 30 at SED's 24x24, 378 frequencies instead of 480
    (measured on a 2-core AMD EPYC: 1.5x faster, the same error against float64).
    """
    return height + kernel[0] // 2, width + kernel[1] // 2


class SpectrumCache:
    """The spectrum of one convolution weight for one map size, recomputed when either changes.

    Keyed on `layout.weight_key` and the size, so an in-place update (loading a checkpoint, an
    optimiser step) or a move to another device invalidates it.
    """

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._spectrum: torch.Tensor | None = None

    def get(self, weight: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """`(frequencies, in_channels, out_channels)` complex spectrum of the flipped kernel."""
        weight_id = weight_key(weight)
        key = None if weight_id is None else (*weight_id, size)
        if key is None or key != self._key or self._spectrum is None:
            out_channels, in_channels = weight.shape[:2]
            # Flipped, because conv2d is a cross-correlation and the FFT multiplies into a convolution.
            spectrum = torch.fft.rfft2(weight.flip(-2, -1), s=size)  # (out, in, S0, S1 // 2 + 1)
            self._spectrum = spectrum.permute(2, 3, 1, 0).reshape(-1, in_channels, out_channels).contiguous()
            self._key = key
        return self._spectrum


def fft_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int, cache: SpectrumCache) -> torch.Tensor:
    """`F.conv2d(x, weight, bias, padding=padding)` (stride 1, no groups) through the FFT.

    For odd square kernels with "same" padding (`padding == k // 2`), SED's conv1. Returns NCHW.
    """
    kernel = tuple(weight.shape[-2:])
    if kernel[0] != kernel[1] or kernel[0] % 2 == 0 or padding != kernel[0] // 2:
        raise ValueError(f"fft_conv2d takes odd square kernels with 'same' padding, got {kernel} with padding {padding}")
    rows, in_channels, height, width = x.shape
    size = _transform_size(height, width, kernel)
    spectrum = cache.get(weight, size)
    x_spectrum = torch.fft.rfft2(x, s=size)  # (rows, in, S0, S1 // 2 + 1)
    frequencies = x_spectrum.shape[-2:]
    # Contiguous per frequency: on a strided view torch.bmm copies each (rows, in) matrix on its
    # own (measured on a 2-core AMD EPYC: 17.7 against 8.2 ms with this one copy, 32 rows).
    x_spectrum = x_spectrum.permute(2, 3, 0, 1).reshape(-1, rows, in_channels).contiguous()
    y_spectrum = torch.bmm(x_spectrum, spectrum)  # (frequencies, rows, out)
    y_spectrum = y_spectrum.reshape(*frequencies, rows, -1).permute(2, 3, 0, 1).contiguous()
    y = torch.fft.irfft2(y_spectrum, s=size)
    # Index `padding + i` of the full convolution is output position `i` of the "same" one.
    y = y[:, :, padding : padding + height, padding : padding + width]
    return y if bias is None else y + bias[:, None, None]


def fft_pays(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `fft_conv2d` is the faster route here: float32 inference on CPU, kernels of 5 and more.

    On GPUs cuDNN's direct kernels win; in training the direct convolution keeps the paper's
    gradients to the last bit.
    """
    return cpu_float32_inference(x, weight) and weight.shape[-1] >= 5


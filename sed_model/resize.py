"""Probability maps resized to an image's size (bilinear, `align_corners=False`), whole or by rows.

The protocol resizes the decoder's 192 x 192 output in one step to the image's size. For a large
image that is large per class (96 MB for 6,000 x 4,000), so labels are made a band of output rows
at a time: `RowResize` resizes the rows that band reads, exactly as the one-step resize would
(bilinear is separable: rows by hand, then columns by `F.interpolate`), within float32 rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def resize_probabilities(probs: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """`(K, h, w)` -> `(K, H, W)`, bilinear with `align_corners=False`, in one step."""
    return F.interpolate(probs[None], size=size, mode="bilinear", align_corners=False)[0]


class RowResize:
    """Resizing `in_height` rows to `out_height` (bilinear, `align_corners=False`, as
    `F.interpolate`): for each output row, the two input rows it reads and the second's weight."""

    def __init__(self, out_height: int, in_height: int, device: torch.device | str = "cpu") -> None:
        source = ((torch.arange(out_height, dtype=torch.float64) + 0.5) * (in_height / out_height) - 0.5).clamp(min=0)
        self.first = source.floor().long().clamp(max=in_height - 1).to(device)
        self.second = (self.first + 1).clamp(max=in_height - 1)
        self.fraction = (source - source.floor()).float().to(device)

    def rows(self, maps: torch.Tensor, out: slice, width: int, offset: int = 0) -> torch.Tensor:
        """Output rows `out` of `maps` `(K, rows, w)` (whose row 0 is input row `offset`), resized to
        `width` columns: `(K, len(out), width)`."""
        upper, lower = maps[:, self.first[out] - offset], maps[:, self.second[out] - offset]
        lerped = torch.lerp(upper, lower, self.fraction[out][None, :, None])
        return F.interpolate(lerped[None], size=(lerped.shape[1], width), mode="bilinear", align_corners=False)[0]

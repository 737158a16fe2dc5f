"""Large images by overlapping windows, blended before the argmax (sliding-window segmentation).

The paper's protocol shrinks an image to short side 640, so a 6,000 x 4,000 scan loses its thin and
small things. An image whose short side exceeds `Tiling.min_side` is instead cut, at `Tiling.scale`
of its native resolution (1.0: native pixels), into `window`-pixel squares that overlap by
`overlap` of a window; each window is labelled by the model as an image of its own (early
rejection per window: a class rejected in a window is 0 there). The windows' probabilities at the
decoder's resolution (a quarter of the window's) are blended on a canvas at a quarter of the tiled
scale, each weighted by a tent that falls linearly from the window's centre to its edges, so a
pixel's class comes mostly from the windows that see it with context on all sides; the blend is
then resized bilinearly to the image's size, as the protocol resizes its 192 x 192 output.

Memory is bounded by one row of windows, whatever the image's size: the canvas is kept as a band of
rows (`window / 4 + 1` rows, every class a window kept), and its rows are resized to full
resolution and merged into the label map as soon as no later window covers them, `class_chunk`
classes at a time with a running argmax, as `SED.label_batch` does. A 6,000 x 4,000 image at T=150
holds about 190 MB of band; the label map, confidence and margin at full size are what any
labelling of that image returns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .model import SED, Labeling, LowResolution
from .ranking import RunningTop, margin
from .resize import RowResize
from .transforms import resize_image

STRIDE = 4  # the decoder's output is a quarter of its input's size
BLOCK_BYTES = 32 * 2**20  # full-resolution rows of a chunk of classes resized at once


@dataclass(frozen=True)
class Tiling:
    """Which images are tiled and how: windows of `window` pixels (a multiple of 4) overlapping by
    `overlap` of a window, at `scale` of the native resolution, for images whose short side
    exceeds `min_side` (at least `window`)."""

    window: int = 768
    overlap: float = 0.25
    min_side: int = 1536
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.window < 32 or self.window % STRIDE:
            raise ValueError(f"tiling.window must be a multiple of {STRIDE} of at least 32, got {self.window}")
        if not 0.0 <= self.overlap <= 0.75:
            raise ValueError(f"tiling.overlap must be between 0 and 0.75, got {self.overlap}")
        if not 0.0 < self.scale <= 1.0:
            raise ValueError(f"tiling.scale must be in (0, 1], got {self.scale}")
        if self.min_side * self.scale < self.window:
            raise ValueError(f"tiling.min_side x scale ({self.min_side} x {self.scale}) must be at least the window ({self.window})")

    def applies(self, height: int, width: int) -> bool:
        return min(height, width) > self.min_side

    def tiled_size(self, height: int, width: int) -> tuple[int, int]:
        """The image's size at the tiling's scale, rounded to multiples of 4 (whole canvas cells)."""
        return tuple(max(self.window, STRIDE * round(side * self.scale / STRIDE)) for side in (height, width))

    def starts(self, length: int) -> list[int]:
        """Window starts along an axis of `length` (tiled) pixels: as few windows as overlap asks
        for, spread evenly from 0 to `length - window`, on the canvas grid."""
        span = length - self.window
        count = math.ceil(span / (self.window * (1 - self.overlap))) + 1 if span > 0 else 1
        if count == 1:
            return [0]
        return [STRIDE * round(i * span / (count - 1) / STRIDE) for i in range(count)]

    def windows(self, height: int, width: int) -> int:
        tiled_height, tiled_width = self.tiled_size(height, width)
        return len(self.starts(tiled_height)) * len(self.starts(tiled_width))


def tent(cells: int) -> torch.Tensor:
    """A window's blending weights `(cells, cells)`: highest at the centre, falling linearly to
    half a cell's weight at the edges (never 0, so a pixel seen only by a window's edge keeps it)."""
    ramp = torch.minimum(torch.arange(cells) + 0.5, cells - torch.arange(cells) - 0.5)
    return ramp[:, None] * ramp[None, :]


class _Band:
    """The blended canvas rows `[base, base + rows)` of the classes seen so far: weighted sums per
    class slot and the weights' sum."""

    def __init__(self, rows: int, width: int, device: torch.device) -> None:
        self.base = 0
        self.sums = torch.zeros((0, rows, width), device=device)
        self.weights = torch.zeros((rows, width), device=device)
        self.classes = torch.zeros(0, dtype=torch.long, device=device)  # class index per slot
        self.slot_of: dict[int, int] = {}

    def add(self, low: torch.Tensor, kept: torch.Tensor, top: int, left: int, weight: torch.Tensor) -> None:
        """One window's probabilities `low` `(k, cells, cells)` of classes `kept`, its top-left canvas cell at (top, left)."""
        new = [c for c in kept.tolist() if c not in self.slot_of]
        if new:
            for c in new:
                self.slot_of[c] = len(self.slot_of)
            self.sums = torch.cat([self.sums, self.sums.new_zeros((len(new), *self.sums.shape[1:]))])
            self.classes = torch.cat([self.classes, torch.tensor(new, dtype=torch.long, device=self.classes.device)])
        slots = torch.tensor([self.slot_of[c] for c in kept.tolist()], device=self.sums.device)
        rows = slice(top - self.base, top - self.base + low.shape[-2])
        columns = slice(left, left + low.shape[-1])
        self.sums[slots, rows, columns] += low * weight
        self.weights[rows, columns] += weight

    def probabilities(self, slots: torch.Tensor | slice, first: int, end: int) -> torch.Tensor:
        """The blended probabilities `(slots, end - first, width)` of canvas rows `[first, end)`."""
        rows = slice(first - self.base, end - self.base)
        return self.sums[slots, rows] / self.weights[rows]

    def shift(self, base: int) -> None:
        """Drop the rows before canvas row `base`; the freed rows at the end start empty."""
        drop = base - self.base
        if drop <= 0:
            return
        self.sums = torch.cat([self.sums[:, drop:], self.sums.new_zeros((self.sums.shape[0], drop, self.sums.shape[2]))], dim=1)
        self.weights = torch.cat([self.weights[drop:], self.weights.new_zeros((drop, self.weights.shape[1]))])
        self.base = base


def label_tiled(
    model: SED,
    image: torch.Tensor,
    text: torch.Tensor,
    tiling: Tiling,
    top_k: int | None = None,
    precision: str = "float32",
    windows_per_call: int = 4,
    class_chunk: int = 16,
    runner_up: bool = False,
    class_groups: torch.Tensor | None = None,
    margins: bool = False,
) -> Labeling:
    """One uint8 `(3, H, W)` image labelled by `tiling`'s windows (see the module's docstring),
    `windows_per_call` windows per model call; the same `Labeling` as `SED.label_batch` gives, at
    `(H, W)`, with `kept` the classes any window kept and `windows` the number of windows."""
    height, width = image.shape[-2:]
    tiled_height, tiled_width = tiling.tiled_size(height, width)
    tiled = image if (tiled_height, tiled_width) == (height, width) else resize_image(image, tiled_height, tiled_width)
    cells = tiling.window // STRIDE
    canvas_height, canvas_width = tiled_height // STRIDE, tiled_width // STRIDE
    window_rows, window_columns = tiling.starts(tiled_height), tiling.starts(tiled_width)
    device = model.device
    weight = tent(cells).to(device)
    band = _Band(cells + 1, canvas_width, device)
    rows = RowResize(height, canvas_height, device)
    labels = torch.empty((height, width), dtype=torch.long, device=device)
    confidence = torch.empty((height, width), device=device)
    second_labels = torch.empty((height, width), dtype=torch.long, device=device) if runner_up else None
    margin_map = torch.empty((height, width), device=device) if margins else None
    kept_after: dict[str, set[int]] = {}
    emitted = 0  # output rows done
    for index, top in enumerate(window_rows):
        for chunk_start in range(0, len(window_columns), windows_per_call):
            lefts = window_columns[chunk_start : chunk_start + windows_per_call]
            crops = [tiled[:, top : top + tiling.window, left : left + tiling.window] for left in lefts]
            for left, low in zip(lefts, model.predict_low_res(crops, text, top_k, precision)):
                band.add(_at_cells(low, cells), low.kept, top // STRIDE, left // STRIDE, weight)
                for name, classes in low.kept_after.items():
                    kept_after.setdefault(name, set()).update(classes.tolist())
        final = window_rows[index + 1] // STRIDE if index + 1 < len(window_rows) else canvas_height
        done = emitted + int((rows.second[emitted:] < final).sum()) if final < canvas_height else height
        # Output rows a block at a time: a chunk of classes at full width stays under BLOCK_BYTES.
        block = max(1, BLOCK_BYTES // (4 * class_chunk * width))
        for block_start in range(emitted, done, block):
            out = slice(block_start, min(done, block_start + block))
            first, end = int(rows.first[out.start]), int(rows.second[out.stop - 1]) + 1  # the canvas rows they read
            top_of = RunningTop(runner_up, class_groups)
            by_class = band.classes.argsort()  # in class order, so that ties go to the lower class as argmax's do
            for start in range(0, by_class.numel(), class_chunk):
                slots = by_class[start : start + class_chunk]
                top_of.add(rows.rows(band.probabilities(slots, first, end), out, width, offset=first), band.classes[slots])
            labels[out], confidence[out] = top_of.best[1], top_of.best[0]
            if runner_up:
                second_labels[out] = top_of.runner_up()
            if margins:  # at the canvas's resolution, then resized, as the untiled path does
                at_canvas = margin(band.probabilities(slice(None), first, end), band.classes, class_groups)
                margin_map[out] = rows.rows(at_canvas[None], out, width, offset=first)[0]
        emitted = done
        if emitted < height:
            band.shift(int(rows.first[emitted]))
    kept = band.classes.sort().values
    after = {name: torch.tensor(sorted(classes), dtype=torch.long, device=device) for name, classes in kept_after.items()}
    windows = len(window_rows) * len(window_columns)
    return Labeling(labels, confidence, kept, after, second_labels, margin_map, windows=windows)


def _at_cells(low: LowResolution, cells: int) -> torch.Tensor:
    """A window's probabilities at the canvas's cells (the model's output is `image_size / 4` a
    side, which is the window's quarter when the window is the model's input size)."""
    if low.probs.shape[-1] == cells:
        return low.probs
    return F.interpolate(low.probs[None], size=(cells, cells), mode="bilinear", align_corners=False)[0]

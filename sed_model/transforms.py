"""Image transforms of the paper's evaluation protocol (detectron2's `ResizeShortestEdge`)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

EVAL_SHORT_EDGE = 640
EVAL_MAX_SIZE = 2560


def shortest_edge_size(height: int, width: int, short_edge: int = EVAL_SHORT_EDGE, max_size: int = EVAL_MAX_SIZE) -> tuple[int, int]:
    """New (height, width): short side `short_edge` unless the long side would pass `max_size`."""
    scale = short_edge / min(height, width)
    if max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def resize_shortest_edge(
    image: torch.Tensor, short_edge: int = EVAL_SHORT_EDGE, max_size: int = EVAL_MAX_SIZE
) -> torch.Tensor:
    """uint8 `(3, H, W)` -> uint8 `(3, H', W')`, PIL bilinear on uint8, as the paper evaluates."""
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a uint8 (3, H, W) image, got {image.dtype} {tuple(image.shape)}")
    height, width = image.shape[1:]
    new_height, new_width = shortest_edge_size(height, width, short_edge, max_size)
    if (new_height, new_width) == (height, width):
        return image
    return resize_image(image, new_height, new_width)


def resize_image(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 `(3, H, W)` -> uint8 `(3, height, width)`, PIL bilinear on uint8 (the protocol's resize)."""
    pil = Image.fromarray(image.permute(1, 2, 0).cpu().numpy())
    resized = np.array(pil.resize((width, height), Image.BILINEAR))
    return torch.from_numpy(resized).permute(2, 0, 1).contiguous()

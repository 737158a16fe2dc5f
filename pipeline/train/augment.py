"""The paper's training augmentation for (image, label map) pairs, as SED's data mapper does it.

    resize the short side to 768 (long side at most 2666; image bilinear, label nearest)
    -> random 768x768 crop -> SSD-style colour augmentation -> random horizontal flip
    -> pad to a multiple of the crop (image 128, label the ignore id, 255 unless the dataset says)

The colour augmentation is detectron2's `ColorAugSSDTransform`: brightness +-32, then either
contrast, saturation, hue or saturation, hue, contrast, each applied with probability 1/2
(contrast and saturation x0.5-1.5, hue +-18 in OpenCV's 180-step hue, done here with PIL's HSV
whose hue has 256 steps). All randomness comes from the `numpy` generator passed in, so a run
given the same seed sees the same crops.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

IGNORE_LABEL = 255
PAD_IMAGE_VALUE = 128
OPENCV_HUE_STEPS = 180  # detectron2 shifts hue in OpenCV's units; PIL's HSV hue has 256 steps


@dataclass(frozen=True)
class AugmentSettings:
    short_edge: int = 768
    max_long_edge: int = 2666
    crop: int = 768
    colour: bool = True
    flip: bool = True
    brightness_delta: float = 32
    contrast: tuple[float, float] = (0.5, 1.5)
    saturation: tuple[float, float] = (0.5, 1.5)
    hue_delta: int = 18  # OpenCV hue steps
    ignore_label: int = IGNORE_LABEL  # what padding fills the label map with (PASCAL-Context-459: 459)


def augment(image: np.ndarray, label: np.ndarray, rng: np.random.Generator, settings: AugmentSettings) -> tuple[np.ndarray, np.ndarray]:
    """`image` `(H, W, 3)` uint8 RGB and `label` `(H, W)` integer ids -> the augmented pair, same size."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.dtype} {image.shape}")
    if label.shape != image.shape[:2]:
        raise ValueError(f"label {label.shape} and image {image.shape[:2]} differ in size")
    image, label = resize_short_edge(image, label, settings.short_edge, settings.max_long_edge)
    image, label = random_crop(image, label, settings.crop, rng)
    if settings.colour:
        image = colour_ssd(image, rng, settings)
    if settings.flip and rng.random() < 0.5:
        image, label = image[:, ::-1], label[:, ::-1]
    return pad_to_multiple(np.ascontiguousarray(image), np.ascontiguousarray(label), settings.crop, settings.ignore_label)


def resize_short_edge(image: np.ndarray, label: np.ndarray, short_edge: int, max_long_edge: int) -> tuple[np.ndarray, np.ndarray]:
    """detectron2's `ResizeShortestEdge`: short side to `short_edge`, long side capped, rounded."""
    h, w = image.shape[:2]
    scale = short_edge / min(h, w)
    if max(h, w) * scale > max_long_edge:
        scale = max_long_edge / max(h, w)
    new_h, new_w = int(h * scale + 0.5), int(w * scale + 0.5)
    if (new_h, new_w) == (h, w):
        return image, label
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))
    label_image = Image.fromarray(label.astype(np.int32), mode="I")
    return resized, np.asarray(label_image.resize((new_w, new_h), Image.NEAREST)).astype(label.dtype)


def random_crop(image: np.ndarray, label: np.ndarray, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    h, w = image.shape[:2]
    crop_h, crop_w = min(size, h), min(size, w)
    top = int(rng.integers(0, h - crop_h + 1))
    left = int(rng.integers(0, w - crop_w + 1))
    return image[top : top + crop_h, left : left + crop_w], label[top : top + crop_h, left : left + crop_w]


def _scaled(values: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    return np.clip(values.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def colour_ssd(image: np.ndarray, rng: np.random.Generator, settings: AugmentSettings) -> np.ndarray:
    """Brightness, then contrast/saturation/hue in one of two orders, each with probability 1/2."""

    def contrast(img: np.ndarray) -> np.ndarray:
        return _scaled(img, alpha=rng.uniform(*settings.contrast)) if rng.integers(2) else img

    def saturation(img: np.ndarray) -> np.ndarray:
        if not rng.integers(2):
            return img
        hsv = np.array(Image.fromarray(img).convert("HSV"))
        hsv[..., 1] = _scaled(hsv[..., 1], alpha=rng.uniform(*settings.saturation))
        return np.asarray(Image.fromarray(hsv, mode="HSV").convert("RGB"))

    def hue(img: np.ndarray) -> np.ndarray:
        if not rng.integers(2):
            return img
        shift = int(rng.integers(-settings.hue_delta, settings.hue_delta + 1)) * 256 / OPENCV_HUE_STEPS
        hsv = np.array(Image.fromarray(img).convert("HSV"))
        hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + round(shift)) % 256).astype(np.uint8)
        return np.asarray(Image.fromarray(hsv, mode="HSV").convert("RGB"))

    if rng.integers(2):
        image = _scaled(image, beta=rng.uniform(-settings.brightness_delta, settings.brightness_delta))
    steps = (contrast, saturation, hue) if rng.integers(2) else (saturation, hue, contrast)
    for step in steps:
        image = step(image)
    return image


def pad_to_multiple(
    image: np.ndarray, label: np.ndarray, multiple: int, ignore_label: int = IGNORE_LABEL
) -> tuple[np.ndarray, np.ndarray]:
    """Pad bottom and right to a multiple of `multiple`: image with 128, label with the ignore id."""
    h, w = image.shape[:2]
    pad_h, pad_w = -h % multiple, -w % multiple
    if not (pad_h or pad_w):
        return image, label
    image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), constant_values=PAD_IMAGE_VALUE)
    label = np.pad(label, ((0, pad_h), (0, pad_w)), constant_values=ignore_label)
    return image, label

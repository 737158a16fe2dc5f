"""Image bytes -> RGB uint8 (H, W, 3), or a reason why not.

EXIF orientation is applied; grayscale, palette, RGBA/LA, CMYK, 16-bit and float images become
8-bit RGB; animated images give their first frame; images with more than `max_pixels` pixels are
refused from their header, before any pixel is decoded (decompression bombs). That limit replaces
PIL's own, which `process.prepare_process` lifts; where it has not been called, PIL's also applies.

Every job decodes with it: labelling and evaluation (the read stage), training and validation,
and the report's gallery, so an image looks the same to all of them.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from schemas import DEFAULT_MAX_PIXELS


class DecodeError(ValueError):
    """An image that cannot be turned into RGB; the message is the error row's ("REASON: detail",
    a reason of `schemas.IMAGE_ERROR_REASONS`)."""


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    if not data:
        raise DecodeError("empty file: 0 bytes")
    with warnings.catch_warnings():
        # Our own pixel limit (checked from the header below) replaces PIL's bomb heuristics.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise DecodeError("not an image: no known image format matches these bytes") from None
        except Image.DecompressionBombError as exc:
            raise DecodeError(f"decompression bomb: {exc}") from None
        except OSError as exc:
            raise DecodeError(f"unreadable header: {exc}") from None
        width, height = image.size
        if width * height > max_pixels:
            raise DecodeError(f"too many pixels: {width}x{height} = {width * height} pixels, over the limit of {max_pixels} (input.max_pixels)")
        if width == 0 or height == 0:
            raise DecodeError(f"no pixels: the image is {width}x{height}")
        try:
            image.seek(0)  # first frame of an animation
            image.load()
            image = ImageOps.exif_transpose(image)
            return _to_rgb(image)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise DecodeError(f"corrupt or truncated: a {image.format} image that fails to decode: {exc}") from None


def _to_rgb(image: Image.Image) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit (or 32-bit integer) samples: keep the top 8 bits of the 16-bit range.
        values = np.asarray(image, dtype=np.int64)
        gray = (np.clip(values, 0, 65535) >> 8).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if image.mode == "F":
        gray = np.clip(np.asarray(image, dtype=np.float32), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if image.mode in ("P", "PA"):
        image = image.convert("RGBA")
    if image.mode != "RGB":
        image = image.convert("RGB")  # L, LA, RGBA (alpha dropped), CMYK, YCbCr, 1
    return np.array(image, dtype=np.uint8)  # a writable copy, whatever PIL shares

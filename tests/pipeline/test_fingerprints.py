"""pipeline.fingerprints: the exact content hash of decoded pixels and the perceptual hash."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from pipeline.decode import decode_image
from pipeline.fingerprints import content_hash, perceptual_hash, phash_bits


def photo(width: int = 640, height: int = 480, seed: int = 0) -> np.ndarray:
    """Smooth random content, like a photo at the scale pHash looks at."""
    coarse = np.random.default_rng(seed).integers(0, 255, (12, 16, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC))


def encoded(image: np.ndarray, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def bits_apart(a: str, b: str) -> int:
    return bin(phash_bits(a) ^ phash_bits(b)).count("1")


def test_content_hash_is_of_the_pixels_not_the_file():
    image = photo()
    plain, squeezed = encoded(image, "PNG", compress_level=0), encoded(image, "PNG", compress_level=9, optimize=True)
    assert plain != squeezed
    assert content_hash(decode_image(plain)) == content_hash(decode_image(squeezed)) == content_hash(image)
    assert len(content_hash(image)) == 32


def test_content_hash_sees_one_pixel_and_the_shape():
    image = photo()
    changed = image.copy()
    changed[100, 200, 1] ^= 1
    assert content_hash(changed) != content_hash(image)
    flat = np.zeros((4, 6, 3), np.uint8)
    assert content_hash(flat) != content_hash(flat.reshape(6, 4, 3))  # same bytes, other shape


def test_perceptual_hash_keeps_reencodes_and_resizes_close_and_other_images_far():
    image = photo()
    original = perceptual_hash(image)
    jpeg = perceptual_hash(decode_image(encoded(image, "JPEG", quality=50)))
    half = perceptual_hash(np.asarray(Image.fromarray(image).resize((320, 240), Image.LANCZOS)))
    assert len(original) == 16
    assert bits_apart(original, jpeg) <= 2 and bits_apart(original, half) <= 2
    assert min(bits_apart(original, perceptual_hash(photo(seed=seed))) for seed in range(1, 6)) > 8

"""pipeline.decode.decode_image: image bytes -> RGB uint8 (H, W, 3), or DecodeError with a reason.

Every input is built here with PIL/numpy; nothing is read from disk or the network.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from pipeline.decode import DecodeError, decode_image
from pipeline.process import prepare_process

LIMIT = 100_000_000  # the job spec's default max_pixels
PIL_DEFAULT_MAX_IMAGE_PIXELS = int(1024 * 1024 * 1024 // 4 // 3)  # PIL.Image's own value


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def rgb_noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def one_bit_png(width: int, height: int, with_pixels: bool = True) -> bytes:
    """A valid, highly compressed 1-bit grayscale PNG (all black) of any declared size.

    Built by hand so that a 12000x12000 image costs a few KiB and no PIL pixel buffer.
    With `with_pixels=False` only the header is real (an empty IDAT).
    """
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, grayscale
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    raw = row * height if with_pixels else b""
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(raw, 9))
        + png_chunk(b"IEND", b"")
    )


@pytest.fixture
def no_pixel_decoding(monkeypatch):
    """Make any attempt to decode pixels fail loudly, to prove a refusal came from the header alone."""

    def refuse(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


# Normal images --------------------------------------------------------------------------------------


def test_png_rgb_is_returned_exactly():
    pixels = rgb_noise(13, 21)
    out = decode_image(encode(Image.fromarray(pixels), "PNG"), LIMIT)
    assert out.dtype == np.uint8
    assert out.shape == (13, 21, 3)  # (H, W, 3), not (W, H, 3)
    np.testing.assert_array_equal(out, pixels)
    assert out.flags["C_CONTIGUOUS"]


def test_jpeg_rgb_keeps_shape_and_approximate_values():
    pixels = np.zeros((24, 40, 3), np.uint8)
    pixels[:, :20] = (200, 30, 30)
    pixels[:, 20:] = (20, 40, 220)
    out = decode_image(encode(Image.fromarray(pixels), "JPEG", quality=95), LIMIT)
    assert out.dtype == np.uint8 and out.shape == (24, 40, 3)
    # Lossy, but flat colour blocks survive within a few levels away from the edge.
    assert np.abs(out[4:20, 2:16].astype(int) - (200, 30, 30)).max() <= 8
    assert np.abs(out[4:20, 24:38].astype(int) - (20, 40, 220)).max() <= 8


# Bad bytes --------------------------------------------------------------------------------------------


def test_zero_bytes_is_an_empty_file_error():
    with pytest.raises(DecodeError, match="empty"):
        decode_image(b"", LIMIT)


def test_truncated_jpeg_is_a_decode_error():
    data = encode(Image.fromarray(rgb_noise(64, 64)), "JPEG", quality=95)
    with pytest.raises(DecodeError, match="truncated"):
        decode_image(data[: len(data) // 2], LIMIT)


def test_truncated_png_is_a_decode_error():
    data = encode(Image.fromarray(rgb_noise(64, 64)), "PNG")
    with pytest.raises(DecodeError):
        decode_image(data[: len(data) // 2], LIMIT)


def test_text_bytes_are_not_an_image():
    with pytest.raises(DecodeError, match="not an image"):
        decode_image(b"id,label\n1,cat\n2,dog\n" * 10, LIMIT)


def test_decode_error_is_a_value_error():
    # Callers that catch ValueError (e.g. generic row handlers) also see decode failures.
    assert issubclass(DecodeError, ValueError)


# Pixel limit (decompression bombs) -----------------------------------------------------------------------


def test_huge_declared_size_is_refused_from_the_header(no_pixel_decoding):
    data = one_bit_png(12000, 12000)  # 144 M pixels in ~20 KiB
    assert len(data) < 1_000_000
    with pytest.raises(DecodeError, match=r"12000x12000 = 144000000 pixels, over the limit of 100000000 \(input\.max_pixels\)"):
        decode_image(data, max_pixels=100_000_000)


def test_small_limit_refuses_normal_image_with_pixel_counts():
    data = encode(Image.fromarray(rgb_noise(30, 50)), "PNG")
    with pytest.raises(DecodeError) as info:
        decode_image(data, max_pixels=1000)
    message = str(info.value)
    assert "50x30" in message and "1500" in message and "1000" in message


def test_image_exactly_at_the_limit_is_accepted():
    data = encode(Image.fromarray(rgb_noise(30, 50)), "PNG")
    assert decode_image(data, max_pixels=1500).shape == (30, 50, 3)


def test_max_pixels_above_pils_default_limit_is_honoured_in_a_prepared_process(no_pixel_decoding, monkeypatch):
    # 15000x15000 = 225 M pixels, under a job limit of 250 M: the image must not be refused as a bomb.
    # (Pixel decoding is disabled by the fixture, so once fixed this fails fast at load(), not as a bomb.)
    # PIL's own default, whatever an earlier test's prepare_process left; restored after the test.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", PIL_DEFAULT_MAX_IMAGE_PIXELS)
    data = one_bit_png(15000, 15000, with_pixels=False)
    with pytest.raises(DecodeError, match="bomb"):  # PIL's own limit, where the process is not prepared
        decode_image(data, max_pixels=250_000_000)
    prepare_process()  # what every job's workers and the CLI do first
    with pytest.raises((DecodeError, AssertionError)) as info:
        decode_image(data, max_pixels=250_000_000)
    assert "bomb" not in str(info.value)


def test_decoding_leaves_pils_process_wide_limit_alone():
    limit = Image.MAX_IMAGE_PIXELS
    decode_image(encode(Image.fromarray(rgb_noise(30, 50)), "PNG"))
    assert Image.MAX_IMAGE_PIXELS == limit


# Modes that must become 8-bit RGB ---------------------------------------------------------------------------


def test_cmyk_jpeg_becomes_rgb():
    data = encode(Image.new("CMYK", (16, 8), (255, 0, 0, 0)), "JPEG", quality=95)  # pure cyan
    assert Image.open(io.BytesIO(data)).mode == "CMYK"  # the test input really is CMYK
    out = decode_image(data, LIMIT)
    assert out.shape == (8, 16, 3) and out.dtype == np.uint8
    assert np.abs(out[4, 8].astype(int) - (0, 255, 255)).max() <= 8


def test_16bit_grayscale_png_keeps_the_high_byte():
    ramp = (np.arange(4 * 256, dtype=np.uint32) * 64).reshape(4, 256)
    ramp[-1, -1] = 65535
    ramp = ramp.astype(np.uint16)
    data = encode(Image.fromarray(ramp), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")  # really a 16-bit image
    out = decode_image(data, LIMIT)
    assert out.dtype == np.uint8 and out.shape == (4, 256, 3)
    expected = (ramp >> 8).astype(np.uint8)
    for channel in range(3):
        np.testing.assert_array_equal(out[..., channel], expected)


def test_16bit_big_endian_tiff_keeps_the_high_byte():
    ramp = (np.arange(8 * 32, dtype=np.uint32) * 257).reshape(8, 32).astype(np.uint16)
    data = encode(Image.fromarray(ramp.astype(">u2")), "TIFF")
    out = decode_image(data, LIMIT)
    np.testing.assert_array_equal(out[..., 1], (ramp >> 8).astype(np.uint8))


def test_grayscale_l_is_replicated_on_three_channels():
    gray = np.arange(6 * 7, dtype=np.uint8).reshape(6, 7) * 5
    out = decode_image(encode(Image.fromarray(gray, mode="L"), "PNG"), LIMIT)
    assert out.shape == (6, 7, 3)
    for channel in range(3):
        np.testing.assert_array_equal(out[..., channel], gray)


def test_one_bit_image_becomes_black_and_white():
    image = Image.new("1", (5, 3), 0)
    image.putpixel((2, 1), 1)
    out = decode_image(encode(image, "PNG"), LIMIT)
    expected = np.zeros((3, 5), np.uint8)
    expected[1, 2] = 255
    np.testing.assert_array_equal(out[..., 0], expected)


def test_rgba_drops_alpha_and_keeps_rgb_values():
    rgba = np.dstack([rgb_noise(9, 11), np.linspace(0, 255, 99, dtype=np.uint8).reshape(9, 11)])
    out = decode_image(encode(Image.fromarray(rgba, mode="RGBA"), "PNG"), LIMIT)
    assert out.shape == (9, 11, 3)
    np.testing.assert_array_equal(out, rgba[..., :3])  # not premultiplied, not composited


def test_palette_image_uses_its_palette_colours():
    image = Image.new("P", (4, 3), 0)
    image.putpalette([10, 20, 30, 200, 100, 50] + [0] * (256 * 3 - 6))
    image.putpixel((1, 2), 1)
    out = decode_image(encode(image, "PNG"), LIMIT)
    assert out.shape == (3, 4, 3)
    np.testing.assert_array_equal(out[0, 0], (10, 20, 30))
    np.testing.assert_array_equal(out[2, 1], (200, 100, 50))


# Orientation and animation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("orientation", "top", "bottom"),
    [
        (6, (255, 0, 0), (0, 0, 255)),  # rotate 90 clockwise for display: stored left -> top
        (8, (0, 0, 255), (255, 0, 0)),  # rotate 90 counter-clockwise: stored left -> bottom
    ],
)
def test_exif_orientation_is_applied(orientation, top, bottom):
    stored = Image.new("RGB", (40, 20))  # W=40, H=20; left half red, right half blue
    stored.paste((255, 0, 0), (0, 0, 20, 20))
    stored.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = decode_image(encode(stored, "JPEG", quality=95, exif=exif.tobytes()), LIMIT)
    assert out.shape == (40, 20, 3)  # transposed: the stored (20, 40, 3) is displayed upright
    assert np.abs(out[5, 10].astype(int) - top).max() <= 10
    assert np.abs(out[34, 10].astype(int) - bottom).max() <= 10


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (8, 6), (255, 0, 0)), Image.new("RGB", (8, 6), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    out = decode_image(data, LIMIT)
    assert out.shape == (6, 8, 3)
    assert (out == (255, 0, 0)).all()

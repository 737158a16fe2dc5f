"""pipeline.review.brush_rle: Label Studio's brush RLE (`@thi.ng/rle-pack`), masks to bytes and back.

Checked against the worked example of annotation_tools.md §1.2/1.3 and against a small reference
encoder written here straight from the pseudo-code of §1.3 (bit strings, no NumPy), which can also
emit literal chunks of arbitrary RGBA bytes, as Label Studio's editor does for soft brush edges.
"""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.review.brush_rle import BrushRLEError, mask_to_rle, rle_to_alpha

# annotation_tools.md §1.2: an 8x6 image (width 8, height 6), car in rows 1-3, columns 2-5.
WORKED_EXAMPLE = [0, 0, 0, 192, 57, 27, 254, 39, 0, 191, 255, 124, 2, 255, 253, 240, 11, 255, 249, 28, 0]
REFERENCE_WIDTHS = (3, 4, 8, 16)


# A reference encoder, from the pseudo-code of annotation_tools.md §1.3 ---------------------------------------


class BitWriter:
    def __init__(self) -> None:
        self.bits: list[str] = []

    def put(self, value: int, count: int) -> None:
        assert 0 <= value < (1 << count), (value, count)
        self.bits.append(format(value, f"0{count}b"))

    def bytes(self) -> list[int]:
        stream = "".join(self.bits)
        stream += "0" * (-len(stream) % 8)  # pad the last byte with zero bits
        return [int(stream[i : i + 8], 2) for i in range(0, len(stream), 8)]


def width_index(length: int) -> int:
    """The first width whose field holds length - 1 (k <= 2**w)."""
    return next(i for i, w in enumerate(REFERENCE_WIDTHS) if length <= 2**w)


def reference_encode(chunks: list[tuple[str, list[int]]]) -> list[int]:
    """`chunks`: ("repeat", [value] * n) or ("literal", [v1, v2, ...]), each at most 65536 values."""
    writer = BitWriter()
    writer.put(sum(len(values) for _, values in chunks), 32)
    writer.put(8 - 1, 5)
    for w in REFERENCE_WIDTHS:
        writer.put(w - 1, 4)
    for kind, values in chunks:
        n = len(values)
        assert 1 <= n <= 65536
        i = width_index(n)
        writer.put(1 if kind == "repeat" else 0, 1)
        writer.put(i, 2)
        writer.put(n - 1, REFERENCE_WIDTHS[i])
        if kind == "repeat":
            assert len(set(values)) == 1
            writer.put(values[0], 8)
        else:
            for v in values:
                writer.put(v, 8)
    return writer.bytes()


def runs_as_repeat_chunks(values: list[int]) -> list[tuple[str, list[int]]]:
    """The pseudo-code's encoding: every maximal run a repeat chunk, split at 65536."""
    chunks = []
    start = 0
    while start < len(values):
        end = start
        while end < len(values) and values[end] == values[start]:
            end += 1
        n = end - start
        while n > 0:
            k = min(n, 65536)
            chunks.append(("repeat", [values[start]] * k))
            n -= k
        start = end
    return chunks


def mask_values(mask: np.ndarray) -> list[int]:
    """A mask as Label Studio's RGBA buffer: 255 or 0 in all four channels, row-major."""
    return [255 if v else 0 for v in mask.ravel() for _ in range(4)]


# The worked example ------------------------------------------------------------------------------------------


def worked_example_mask() -> np.ndarray:
    mask = np.zeros((6, 8), bool)  # height 6, width 8
    mask[1:4, 2:6] = True
    return mask


def test_worked_example_encodes_to_the_documented_bytes():
    assert mask_to_rle(worked_example_mask()) == WORKED_EXAMPLE


def test_the_reference_encoder_agrees_with_the_worked_example():
    # The test's own encoder is right on the documented case, so it can judge the others.
    assert reference_encode(runs_as_repeat_chunks(mask_values(worked_example_mask()))) == WORKED_EXAMPLE


def test_worked_example_decodes_to_its_mask():
    alpha = rle_to_alpha(WORKED_EXAMPLE, 6, 8)
    assert alpha.shape == (6, 8) and alpha.dtype == np.uint8
    expected = np.zeros((6, 8), np.uint8)
    expected[1:4, 2:6] = 255
    np.testing.assert_array_equal(alpha, expected)


def test_decoder_accepts_bytes_and_the_sdks_extra_zero_byte():
    np.testing.assert_array_equal(rle_to_alpha(bytes(WORKED_EXAMPLE), 6, 8) > 0, worked_example_mask())
    np.testing.assert_array_equal(rle_to_alpha(WORKED_EXAMPLE + [0], 6, 8) > 0, worked_example_mask())


# Round trips -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape, density", [((1, 1), 0.5), ((1, 1), 1.0), ((37, 53), 0.3), ((53, 37), 0.8), ((300, 300), 0.5), ((300, 300), 1.0), ((300, 300), 0.0)])
def test_random_masks_round_trip(shape, density):
    rng = np.random.default_rng(hash(shape) % 1000 + int(density * 10))
    mask = rng.random(shape) < density
    rle = mask_to_rle(mask)
    assert all(0 <= b <= 255 for b in rle)
    alpha = rle_to_alpha(rle, *shape)
    np.testing.assert_array_equal(alpha > 0, mask)
    np.testing.assert_array_equal(alpha, np.where(mask, 255, 0))


@pytest.mark.parametrize("shape", [(1, 1), (37, 53), (60, 40)])
def test_masks_encode_as_the_reference_encoder_does(shape):
    rng = np.random.default_rng(shape[0])
    mask = rng.random(shape) < 0.4
    mask[: shape[0] // 2, : shape[1] // 2] = True  # some long runs as well as short ones
    assert mask_to_rle(mask) == reference_encode(runs_as_repeat_chunks(mask_values(mask)))


def test_an_all_painted_300x300_mask_splits_its_run_of_360000_values():
    mask = np.ones((300, 300), bool)
    rle = mask_to_rle(mask)
    # 360000 = 5 * 65536 + 32320: six repeat chunks, exactly as the reference writes them.
    chunks = runs_as_repeat_chunks([255] * 360000)
    assert [len(values) for _, values in chunks] == [65536] * 5 + [32320]
    assert rle == reference_encode(chunks)
    np.testing.assert_array_equal(rle_to_alpha(rle, 300, 300), np.full((300, 300), 255, np.uint8))


def test_a_mask_of_any_integer_type_counts_nonzero_as_painted():
    mask = np.array([[0, 3, 0], [255, 0, 1]], np.int32)
    np.testing.assert_array_equal(rle_to_alpha(mask_to_rle(mask), 2, 3) > 0, mask != 0)


def test_a_mask_that_is_not_2d_is_refused():
    with pytest.raises(ValueError, match="2-D"):
        mask_to_rle(np.zeros((2, 3, 4), bool))


# Literal runs and partial alpha (what the editor writes for antialiased strokes) -----------------------------


def test_literal_chunks_with_partial_alpha_decode_to_the_exact_alpha_values():
    height, width = 20, 15  # 1200 values
    rng = np.random.default_rng(7)

    def noise(n):
        return rng.integers(0, 256, size=n).tolist()

    # Chunks of every field width and both kinds, with arbitrary (partial) RGBA values.
    chunks = [
        ("repeat", [0] * 44),
        ("literal", noise(1)),
        ("literal", noise(7)),  # 3-bit field
        ("repeat", [128] * 5),
        ("literal", noise(16)),  # 4-bit field
        ("repeat", [200] * 300),  # 16-bit field
        ("literal", noise(200)),  # 8-bit field
        ("literal", noise(300)),  # 16-bit field
        ("repeat", [77]),  # a repeat of one
    ]
    used = sum(len(values) for _, values in chunks)
    chunks.append(("literal", noise(height * width * 4 - used)))
    assert {(kind, width_index(len(v))) for kind, v in chunks} >= {
        ("literal", 0), ("literal", 1), ("literal", 2), ("literal", 3), ("repeat", 0), ("repeat", 2), ("repeat", 3)
    }
    rgba = np.asarray([v for _, values in chunks for v in values], np.uint8).reshape(height, width, 4)
    alpha = rle_to_alpha(reference_encode(chunks), height, width)
    np.testing.assert_array_equal(alpha, rgba[:, :, 3])
    assert np.count_nonzero((alpha > 0) & (alpha < 255)) > 50  # partial alpha really is there


def test_a_long_literal_then_a_repeat_decode_exactly():
    # One literal of 65536 values (the longest a chunk holds) followed by a repeat of the rest.
    height, width = 128, 130  # 66560 values
    rng = np.random.default_rng(3)
    values = rng.integers(0, 256, size=65536).tolist() + [17] * (height * width * 4 - 65536)
    rle = reference_encode([("literal", values[:65536]), ("repeat", values[65536:])])
    expected = np.asarray(values, np.uint8).reshape(height, width, 4)[:, :, 3]
    np.testing.assert_array_equal(rle_to_alpha(rle, height, width), expected)


# Errors ------------------------------------------------------------------------------------------------------


def test_a_value_count_that_is_not_the_image_size_names_both_sizes():
    with pytest.raises(BrushRLEError, match=r"192.*5x8x4 = 160"):
        rle_to_alpha(WORKED_EXAMPLE, 5, 8)
    with pytest.raises(BrushRLEError, match=r"192.*7x8x4 = 224"):
        rle_to_alpha(WORKED_EXAMPLE, 7, 8)


def test_a_stream_shorter_than_its_header_is_refused():
    with pytest.raises(BrushRLEError, match="header"):
        rle_to_alpha(WORKED_EXAMPLE[:5], 6, 8)
    with pytest.raises(BrushRLEError):
        rle_to_alpha([], 6, 8)


@pytest.mark.parametrize("keep", [7, 9, 12, 20])
def test_a_truncated_stream_is_refused(keep):
    # The worked example is 21 bytes; cut at chunk boundaries and inside chunks.
    with pytest.raises(BrushRLEError, match="ends"):
        rle_to_alpha(WORKED_EXAMPLE[:keep], 6, 8)


def test_a_truncated_stream_of_a_random_mask_is_refused():
    rng = np.random.default_rng(11)
    mask = rng.random((40, 50)) < 0.5
    rle = mask_to_rle(mask)
    for keep in (len(rle) // 2, len(rle) - 2):
        with pytest.raises(BrushRLEError):
            rle_to_alpha(rle[:keep], 40, 50)


def test_a_literal_that_runs_past_the_end_is_refused():
    # The header says 192 values; one literal chunk claims 192 words but only 10 follow.
    writer = BitWriter()
    writer.put(192, 32)
    writer.put(7, 5)
    for w in REFERENCE_WIDTHS:
        writer.put(w - 1, 4)
    writer.put(0, 1)
    writer.put(2, 2)
    writer.put(191, 8)
    for v in range(10):
        writer.put(v, 8)
    with pytest.raises(BrushRLEError, match="ends"):
        rle_to_alpha(writer.bytes(), 6, 8)

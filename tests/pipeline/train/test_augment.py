"""The paper's training augmentation: sizes, the long-side cap, padding, image/label alignment, seeds."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.train.augment import IGNORE_LABEL, PAD_IMAGE_VALUE, AugmentSettings, augment


def blocks(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """A label map of 10 vertical bands and an image whose pixels encode their label (20 x id)."""
    label = (np.arange(w)[None, :].repeat(h, 0) * 10 // w).astype(np.uint8)
    image = np.repeat((label * 20)[..., None], 3, axis=2).astype(np.uint8)
    return image, label


def test_short_side_to_768_then_a_768_crop():
    image, label = blocks(300, 500)
    out, out_label = augment(image, label, np.random.default_rng(0), AugmentSettings())
    assert out.shape == (768, 768, 3) and out.dtype == np.uint8
    assert out_label.shape == (768, 768) and out_label.dtype == np.uint8
    assert IGNORE_LABEL not in out_label  # 768 x 1280 after resizing: the crop needs no padding


def test_long_side_is_capped_and_the_rest_padded_with_ignore():
    image, label = blocks(100, 1000)  # x7.68 would make the long side 7680 > 2666
    out, out_label = augment(image, label, np.random.default_rng(0), AugmentSettings(colour=False))
    assert out.shape == (768, 768, 3)
    # 100 x 1000 -> 267 x 2666, cropped to 267 x 768, padded below to 768.
    assert (out_label[267:] == IGNORE_LABEL).all() and (out[267:] == PAD_IMAGE_VALUE).all()
    assert (out_label[:267] != IGNORE_LABEL).all()


@pytest.mark.parametrize("seed", range(6))
def test_crops_and_flips_move_image_and_label_together(seed):
    image, label = blocks(900, 1200)  # short side already 900: no resizing, so pixels stay exact
    settings = AugmentSettings(short_edge=900, crop=512, colour=False)
    out, out_label = augment(image, label, np.random.default_rng(seed), settings)
    assert out.shape[:2] == out_label.shape == (512, 512)
    assert (out[..., 0] == out_label * 20).all()


def test_the_same_seed_gives_the_same_pair_and_other_seeds_differ():
    image, label = blocks(400, 640)
    image = (image + np.random.default_rng(5).integers(0, 40, image.shape)).astype(np.uint8)
    runs = [augment(image, label, np.random.default_rng(seed), AugmentSettings()) for seed in (1, 1, 2, 3)]
    assert all(np.array_equal(a, b) for a, b in zip(runs[0], runs[1]))
    assert not all(np.array_equal(runs[0][0], other[0]) for other in runs[2:])


def test_colour_augmentation_changes_pixels_not_labels():
    image, label = blocks(768, 768)
    image = (image // 2 + np.random.default_rng(3).integers(0, 100, image.shape)).astype(np.uint8)
    changed = 0
    for seed in range(8):
        plain = augment(image, label, np.random.default_rng(seed), AugmentSettings(colour=False, flip=False))
        coloured = augment(image, label, np.random.default_rng(seed), AugmentSettings(flip=False))
        assert coloured[0].dtype == np.uint8 and coloured[0].shape == plain[0].shape
        assert np.array_equal(coloured[1], plain[1])
        changed += not np.array_equal(coloured[0], plain[0])
    assert changed >= 4  # each of four steps fires with probability 1/2


def test_mismatched_pairs_are_refused():
    image, label = blocks(100, 120)
    with pytest.raises(ValueError, match="differ in size"):
        augment(image, label[:, :100], np.random.default_rng(0), AugmentSettings())
    with pytest.raises(ValueError, match="uint8"):
        augment(image.astype(np.float32), label, np.random.default_rng(0), AugmentSettings())

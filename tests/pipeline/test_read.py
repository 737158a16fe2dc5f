"""One image decoder for every job: an EXIF-rotated image reads alike in labelling and evaluation
(the read stage's step), training and validation (`read_pair`), and the report's gallery."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from pipeline.datasets import BenchmarkItem
from pipeline.decode import decode_image
from pipeline.read import read_and_decode
from pipeline.sources import KIND_FILE, ImageRef, plan_shards
from pipeline.train.data import read_pair


def exif_rotated_jpeg(width: int, height: int) -> bytes:
    """A JPEG stored `width` x `height` whose EXIF says: rotate 90 degrees clockwise on display."""
    pixels = np.random.default_rng(0).integers(0, 255, (height // 8, width // 8, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).resize((width, height), Image.NEAREST)
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif, quality=95)
    return buffer.getvalue()


def test_an_exif_rotated_image_reads_alike_in_labelling_evaluation_training_and_reports(tmp_path):
    data = exif_rotated_jpeg(120, 80)
    (tmp_path / "photo.jpg").write_bytes(data)
    # Its label map is drawn on the image as displayed: 80 wide, 120 high.
    Image.fromarray(np.zeros((120, 80), np.uint8)).save(tmp_path / "photo.png")

    plan = plan_shards([ImageRef("photo.jpg", KIND_FILE, str(tmp_path / "photo.jpg"))], shard_size=1)
    labelling = read_and_decode(plan, image_column="image", max_pixels=10**8, storage_options={})["image"][0]
    training, label = read_pair(BenchmarkItem("photo", str(tmp_path / "photo.jpg"), str(tmp_path / "photo.png")), {})
    gallery = decode_image(data)

    assert labelling.shape == (120, 80, 3)  # upright: EXIF orientation applied
    np.testing.assert_array_equal(training, labelling)
    np.testing.assert_array_equal(gallery, labelling)
    assert label.shape == training.shape[:2]

"""The read step: one image decoder for every job (an EXIF-rotated image reads alike in labelling
and evaluation, training and validation, and the report's gallery), and error rows whose reasons
tell a vanished object, denied access, other read failures and bad bytes apart."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.datasets import BenchmarkItem
from pipeline.decode import decode_image
from pipeline.infer import inference_error_message
from pipeline.read import read_and_decode, read_error_message
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


def test_each_failure_gets_its_reason_first(tmp_path):
    (tmp_path / "text.jpg").write_bytes(b"plain text")
    (tmp_path / "locked.png").write_bytes(b"\x89PNG")
    (tmp_path / "locked.png").chmod(0o000)
    refs = [ImageRef(name, KIND_FILE, str(tmp_path / name)) for name in ("gone.png", "locked.png", "text.jpg")]
    try:
        errors = read_and_decode(plan_shards(refs, shard_size=3), "image", 10**8, {})["error"]
    finally:
        (tmp_path / "locked.png").chmod(0o644)
    assert errors[0].startswith(f"not found: {tmp_path / 'gone.png'}: FileNotFoundError: ")
    if os.geteuid() != 0:  # root reads whatever the mode says
        assert errors[1].startswith(f"access denied: {tmp_path / 'locked.png'}: PermissionError: ")
    assert errors[2].startswith("not an image: ")


class HTTPError(OSError):
    """An HTTP filesystem's error carrying the response's status (as aiohttp's and gcsfs's do)."""

    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


@pytest.mark.parametrize(
    "exc, reason",
    [
        (FileNotFoundError("NoSuchKey"), "not found"),
        (PermissionError("AccessDenied"), "access denied"),
        (HTTPError(403), "access denied"),
        (HTTPError(404), "not found"),
        (HTTPError(500), "read failed"),
        (ConnectionResetError("reset by peer"), "read failed"),
    ],
)
def test_read_failures_are_told_apart(exc, reason):
    assert read_error_message("s3://bucket/a.jpg", exc).startswith(f"{reason}: s3://bucket/a.jpg: {type(exc).__name__}: ")


@pytest.mark.parametrize(
    "exc, reason",
    [(torch.OutOfMemoryError("CUDA out of memory"), "out of memory"), (MemoryError(), "out of memory"), (RuntimeError("bad"), "inference failed")],
)
def test_inference_failures_are_told_apart(exc, reason):
    assert inference_error_message(exc).startswith(f"{reason}: {type(exc).__name__}")

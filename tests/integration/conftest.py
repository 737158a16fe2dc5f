"""Integration fixtures: a real local Ray, a real S3 server on loopback, job inputs on disk."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import ray
from PIL import Image

from schemas import JobSpec
from tests.conftest import TINY_CHECKPOINT


@pytest.fixture(scope="module")
def local_ray(request):
    """A real local Ray per test module; the module's jobs reuse it instead of starting their own.

    Per module, not per session: no Ray of ours runs while the submission test starts a head, and
    none is left to shut down at interpreter exit. Its logical CPUs: the module's `RAY_CPUS`, else
    2 (the CI machine's cores).
    """
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=getattr(request.module, "RAY_CPUS", 2), include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def image_bytes(width: int, height: int, seed: int, fmt: str = "PNG", mode: str = "RGB", **save: object) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).resize((width, height), Image.NEAREST).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise on display
    return image_bytes(120, 80, 7, "JPEG", exif=exif)


def sixteen_bit_png() -> bytes:
    ramp = (np.arange(64 * 48, dtype=np.uint32).reshape(48, 64) * 21).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, format="PNG")  # uint16 -> mode I;16
    return buffer.getvalue()


def huge_declared_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (12000, 12000)).save(buffer, format="PNG")  # 144 Mpx, a few kB compressed
    return buffer.getvalue()


# name -> (bytes, expected status, expected reason fragment)
def job_inputs() -> dict[str, tuple[bytes, str, str]]:
    jpeg = image_bytes(160, 120, 1, "JPEG")
    return {
        "a_plain.png": (image_bytes(160, 120, 0), "ok", ""),
        "b_plain.jpg": (jpeg, "ok", ""),
        "c_zero.jpg": (b"", "error", "empty file"),
        "d_truncated.jpg": (jpeg[: len(jpeg) // 2], "error", "truncated"),
        "e_text.jpg": (b"this is a text file, not an image\n" * 4, "error", "not an image"),
        "f_huge.png": (huge_declared_png(), "error", "over the limit"),
        "g_cmyk.jpg": (image_bytes(96, 64, 2, "JPEG", mode="CMYK"), "ok", ""),
        "h_gray16.png": (sixteen_bit_png(), "ok", ""),
        "i_gray.png": (image_bytes(80, 96, 3, mode="L"), "ok", ""),
        "j_rgba.png": (image_bytes(90, 70, 4, mode="RGBA"), "ok", ""),
        "k_exif.jpg": (exif_rotated_jpeg(), "ok", ""),
        "sub/l_nested.png": (image_bytes(100, 100, 5), "ok", ""),
    }


def write_inputs(folder: Path) -> dict[str, tuple[bytes, str, str]]:
    inputs = job_inputs()
    for name, (data, _, _) in inputs.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return inputs


def tiny_job(reference: dict, input_url: str, output_url: str, **overrides: object) -> JobSpec:
    spec = {
        "input": {"url": input_url, "shard_size": 5, "max_pixels": 50_000_000},
        "taxonomy": {"classes": list(reference["classes"])},
        # 256, not the paper's 768: the jobs' checks do not depend on the size, and it is 5x faster.
        "model": {"clip_model": reference["clip_cfg"], "weights": str(TINY_CHECKPOINT), "image_size": 256},
        "inference": {"top_k": 2, "batch_size": 2},
        "output": {"url": output_url, "formats": ["parquet", "coco", "png"]},
        "ray": {"num_actors": 1},
    }
    for path, value in overrides.items():
        section, key = path.split("__")
        spec[section][key] = value
    return JobSpec.model_validate(spec)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto in server mode) on loopback; yields fsspec storage options."""
    port = free_port()
    moto_server = Path(sys.executable).with_name("moto_server")
    process = subprocess.Popen([str(moto_server), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        process.kill()
        raise RuntimeError("moto_server did not start")
    os.environ["AWS_DEFAULT_REGION"] = "us-east-1"  # s3fs creates buckets in the default region
    options = {"key": "testing-key-id", "secret": "testing-secret-value", "client_kwargs": {"endpoint_url": endpoint}}
    yield options
    process.terminate()
    process.wait(timeout=10)

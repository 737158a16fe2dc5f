"""Integration-test helpers: job inputs made on disk (including hostile ones), tiny job specs,
free ports, reading a job's outputs back, and what the model says about the same images."""

from __future__ import annotations

import io
import socket
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

import sed_model
from pipeline.decode import decode_image
from pipeline.label import JobOutput
from pipeline.label.encode import label_map_of  # noqa: F401  (re-exported for the tests)
from schemas import JobSpec
from tests.helpers import TINY_CHECKPOINT


def read_rows(store: JobOutput) -> list[dict]:
    """Every Parquet row of the committed shards."""
    tables = []
    for shard, marker in sorted(store.committed_shards().items()):
        with store.fs.open(store.path(marker["files"][0]), "rb") as f:
            tables.append(pq.read_table(f))
    return pa.concat_tables(tables).to_pylist() if tables else []


def model_labels(
    model: sed_model.SED, data: bytes, top_k: int | None, text: torch.Tensor, classes: list[str], tiling: sed_model.Tiling | None = None
) -> tuple[np.ndarray, list[int]]:
    predictor = sed_model.SEDPredictor(model, top_k=top_k, tiling=tiling)
    predictor.set_taxonomy(classes, text_features=text)
    image = torch.from_numpy(decode_image(data, 50_000_000)).permute(2, 0, 1)
    labeling = predictor.label_batch([image])[0]
    return labeling.labels.numpy().astype(np.uint16), labeling.kept.tolist()


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
        if "__" in path:
            section, key = path.split("__")
            spec[section][key] = value
        else:  # a whole section (`error_breaker=None`)
            spec[path] = value
    return JobSpec.model_validate(spec)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TagAttributes(HTMLParser):
    """Every start tag of a page with its attributes (to check that a page runs no script)."""

    def __init__(self) -> None:
        super().__init__()
        self.attributes: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.attributes.append((tag, dict(attrs)))


def assert_self_contained_without_script(html: str) -> int:
    """A page that runs no script and loads nothing: no script tags, no `on*` handlers, every
    `src`/`href` a data URI. Returns how many JPEG images it embeds (the galleries)."""
    parser = TagAttributes()
    parser.feed(html)
    for tag, attributes in parser.attributes:
        assert not any(name.startswith("on") for name in attributes), (tag, attributes)
        assert tag != "script"
        for name in ("src", "href"):
            assert not attributes.get(name) or attributes[name].startswith("data:"), (tag, attributes)
    return sum(tag == "img" and a.get("src", "").startswith("data:image/jpeg") for tag, a in parser.attributes)


def render_in_chromium(page: Path, folder: Path) -> tuple[str, list[str]]:
    """Render `page` in headless Chromium: its DOM after rendering, and the console's errors.
    A screenshot of it must hold pixels (the page drew)."""
    screenshot = folder / f"{page.stem}.png"
    common = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
              "--disable-component-update", "--no-first-run", f"--user-data-dir={folder / 'profile'}"]
    shot = subprocess.run(common + [f"--screenshot={screenshot}", "--window-size=1200,3000", page.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert screenshot.exists() and screenshot.stat().st_size > 10_000, shot.stderr[-2000:]
    dumped = subprocess.run(common + ["--enable-logging=stderr", "--v=0", "--dump-dom", page.as_uri()],
                            capture_output=True, text=True, timeout=120)
    return dumped.stdout, [line for line in dumped.stderr.splitlines() if "CONSOLE" in line and "ERROR" in line.upper()]

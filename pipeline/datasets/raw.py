"""The official download a dataset is prepared from, read through fsspec (any URL, local paths)."""

from __future__ import annotations

import io
import posixpath
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from ..storage import filesystem, to_url
from .registry import DatasetError


@dataclass
class Sample:
    """One prepared image: its id, the image file's bytes and extension, and its label map."""

    image_id: str
    image: bytes
    image_extension: str
    labels: np.ndarray


class RawRoot:
    """Paths relative to RAW_ROOT; a missing one is an error naming the path it expected."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = url
        self.fs, self.root = filesystem(url, storage_options)
        self.root = self.root.rstrip("/")
        if not self.fs.isdir(self.root):
            raise DatasetError(f"raw dataset folder {url!r} does not exist")

    def path(self, relative: str) -> str:
        return posixpath.join(self.root, relative)

    def describe(self, relative: str) -> str:
        return to_url(self.fs, self.path(relative))

    def require_dir(self, relative: str, what: str) -> str:
        path = self.path(relative)
        if not self.fs.isdir(path):
            raise DatasetError(f"expected {what} at {self.describe(relative)}, found no such folder")
        return path

    def read(self, relative: str) -> bytes:
        try:
            return self.fs.cat_file(self.path(relative))
        except FileNotFoundError:
            raise DatasetError(f"expected the file {self.describe(relative)}, found none") from None

    def read_image_array(self, relative: str) -> np.ndarray:
        """Pixels as stored (no EXIF rotation, no mode conversion), as the paper's scripts read them."""
        try:
            with Image.open(io.BytesIO(self.read(relative))) as image:
                return np.asarray(image)
        except OSError as exc:
            raise DatasetError(f"{self.describe(relative)} is not a readable image: {exc}") from exc

    def files_under(self, relative: str, suffix: str) -> list[str]:
        """Paths (relative to RAW_ROOT) of every file under `relative` ending with `suffix`, sorted."""
        folder = self.require_dir(relative, f"the {suffix} files")
        return sorted(posixpath.relpath(p, self.root) for p in self.fs.find(folder) if p.endswith(suffix))

"""CVAT: pre-annotations out as "CVAT for images 1.1", corrections back from "Segmentation mask 1.1".

Out: `annotations.xml` with one `<mask>` per class present: CVAT's mask RLE, run lengths over
the mask's tight box, row by row, starting with a background run (0 if the box starts painted);
`left`/`top` its corner, `width`/`height` its size. Import it into a task holding the same images
(their names are the job's image ids) with `conv_mask_to_poly=false`.

Back: the task exported as "Segmentation mask 1.1" (a zip or its folder): `labelmap.txt` names a
colour per label; `SegmentationClass/<image>.png` paints each pixel in its label's colour (RGB,
palette, or one index per line of `labelmap.txt`). CVAT rasterises masks, polygons and boxes
into it by z-order, so no pixel has two labels. Its "background" (0, 0, 0) is unpainted, unless
the job has a class named "background".
"""

from __future__ import annotations

import io
import posixpath
import zipfile
from typing import Any
from xml.etree import ElementTree

import numpy as np
from PIL import Image

from ..label.commit import redact_url
from ..storage import StorageError, filesystem
from .ground_truth import Correction
from .rows import ReviewError

LABELMAP = "labelmap.txt"
CLASS_FOLDER = "SegmentationClass"
BACKGROUND = "background"


def mask_rle(mask: np.ndarray) -> tuple[list[int], int, int, int, int]:
    """A non-empty boolean mask -> (runs, left, top, width, height) as CVAT's `<mask>` holds it."""
    rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    top, bottom, left, right = int(rows[0]), int(rows[-1]), int(columns[0]), int(columns[-1])
    box = mask[top : bottom + 1, left : right + 1].ravel()
    changes = np.flatnonzero(box[1:] != box[:-1]) + 1
    runs = np.diff(np.concatenate(([0], changes, [box.size]))).tolist()
    if box[0]:
        runs.insert(0, 0)  # runs start with background
    return runs, left, top, right - left + 1, bottom - top + 1


def annotations_xml(images: list[dict[str, Any]], classes: list[str], colours: list[str]) -> bytes:
    """`images`: dicts of name, width, height, label_map (class ids) and class_ids present."""
    root = ElementTree.Element("annotations")
    ElementTree.SubElement(root, "version").text = "1.1"
    meta = ElementTree.SubElement(ElementTree.SubElement(root, "meta"), "task")
    ElementTree.SubElement(meta, "size").text = str(len(images))
    ElementTree.SubElement(meta, "mode").text = "annotation"
    labels = ElementTree.SubElement(meta, "labels")
    for name, colour in zip(classes, colours):
        label = ElementTree.SubElement(labels, "label")
        ElementTree.SubElement(label, "name").text = name
        ElementTree.SubElement(label, "color").text = colour
        ElementTree.SubElement(label, "type").text = "mask"
        ElementTree.SubElement(label, "attributes")
    for number, image in enumerate(images):
        element = ElementTree.SubElement(
            root, "image", {"id": str(number), "name": image["name"], "width": str(image["width"]), "height": str(image["height"])}
        )
        for class_id in image["class_ids"]:
            runs, left, top, width, height = mask_rle(image["label_map"] == class_id)
            attributes = {
                "label": classes[class_id], "source": "auto", "occluded": "0", "rle": ", ".join(map(str, runs)),
                "left": str(left), "top": str(top), "width": str(width), "height": str(height), "z_order": "0",
            }
            ElementTree.SubElement(element, "mask", attributes)
    ElementTree.indent(root)
    return ElementTree.tostring(root, encoding="utf-8", xml_declaration=True)


class SegmentationExport:
    """A "Segmentation mask 1.1" export, from its zip or its unpacked folder, at any fsspec URL."""

    def __init__(self, path: str, storage_options: dict[str, Any] | None = None) -> None:
        self.path = redact_url(path)
        try:
            fs, root = filesystem(path, storage_options)
            if fs.isdir(root):
                root = root.rstrip("/")
                contents = fs.cat([name for name in fs.find(root) if not name.endswith("/")])
                self.files = {name[len(root) + 1 :]: data for name, data in contents.items()}
            else:
                with zipfile.ZipFile(io.BytesIO(fs.cat_file(root))) as archive:
                    self.files = {name: archive.read(name) for name in archive.namelist() if not name.endswith("/")}
        except (OSError, StorageError, zipfile.BadZipFile) as exc:
            raise ReviewError(f"{self.path}: neither a zip nor a folder of a CVAT \"Segmentation mask 1.1\" export ({type(exc).__name__}: {exc})") from exc
        if LABELMAP not in self.files:
            raise ReviewError(f"{self.path}: no {LABELMAP}: not a CVAT \"Segmentation mask 1.1\" export")
        self.labels = _labelmap(self.files[LABELMAP].decode("utf-8"), self.path)

    def masks(self) -> dict[str, bytes]:
        """Each image's class PNG, by image name without extension (as CVAT names them)."""
        prefix = f"{CLASS_FOLDER}/"
        return {posixpath.splitext(name[len(prefix) :])[0]: data for name, data in self.files.items() if name.startswith(prefix)}

    def correction(self, name: str, data: bytes, classes: list[str], index: int, size: tuple[int, int], unlabeled: int, unpainted: int | None, reviewer: str | None) -> Correction:
        where = f"{self.path}: {CLASS_FOLDER}/{name}.png"
        class_ids = {class_name: i for i, class_name in enumerate(classes)}
        names = [label for label, _ in self.labels]
        for label in names:
            if label not in class_ids and label != BACKGROUND:
                raise ReviewError(f"{self.path}: {LABELMAP} names label {label!r}, which is not one of the job's classes")
        with Image.open(io.BytesIO(data)) as image:
            if (image.height, image.width) != size:
                raise ReviewError(f"{where} is {image.width}x{image.height}, its image {size[1]}x{size[0]}")
            if image.mode in ("L", "I", "I;16"):  # one index per labelmap line
                indices = np.asarray(image).astype(np.int64)
                if indices.max(initial=0) >= len(names):
                    raise ReviewError(f"{where}: index {int(indices.max())} has no line in {LABELMAP} ({len(names)} labels)")
                per_label = [indices == k for k in range(len(names))]
            else:
                rgb = np.asarray(image.convert("RGB")).astype(np.int64)
                packed = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
                colours = [(r << 16) | (g << 8) | b for _, (r, g, b) in self.labels]
                unknown = np.setdiff1d(np.unique(packed), colours)
                if unknown.size:
                    c = int(unknown[0])
                    raise ReviewError(f"{where}: colour {(c >> 16, (c >> 8) & 255, c & 255)} is not in {LABELMAP}")
                per_label = [packed == colour for colour in colours]
        label_map = np.full(size, unlabeled, dtype=np.uint8 if unlabeled == 255 else np.uint16)
        painted = np.zeros(size, dtype=bool)
        for label, mask in zip(names, per_label):
            if label in class_ids:
                label_map[mask] = class_ids[label]
                painted |= mask
        if unpainted is not None:
            label_map[~painted] = unpainted
        return Correction(index, label_map, reviewer, None, 0, int((~painted).sum()), f"{CLASS_FOLDER}/{name}.png")


def _labelmap(text: str, path: str) -> list[tuple[str, tuple[int, int, int]]]:
    """`name:r,g,b:parts:actions` lines -> [(name, colour)], in file order (index PNGs count on it)."""
    labels = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, _, rest = line.partition(":")
        try:
            colour = tuple(int(v) for v in rest.split(":", 1)[0].split(","))
        except ValueError:
            colour = ()
        if len(colour) != 3:
            raise ReviewError(f"{path}: {LABELMAP} line {number}: expected name:r,g,b:parts:actions, got {line!r}")
        labels.append((name, colour))
    return labels

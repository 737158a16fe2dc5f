"""`sed-label review export` and `review import`: a job's least certain images out to an annotation
tool, the reviewers' corrections back as ground truth.

    export: committed rows -> `select` -> label maps (from the rows' RLE), margin maps (format
            `confidence`), images (copied, or referenced where they are) -> the tool's files + review.json
    import: the tool's export -> `Correction`s, checked against the job -> `write_ground_truth`
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import posixpath
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

import matplotlib
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from fsspec.implementations.local import LocalFileSystem
from PIL import Image

from schemas import MARGIN_PNG_SCALE, STATUS_OK

from ..label.commit import CONFIDENCE_DIR, redact_url
from ..label.encode import label_map_of, png_file
from ..report import figures
from ..sources import KIND_FILE
from ..storage import OutputStore, StorageError, filesystem, to_url
from . import cvat, label_studio
from .ground_truth import Correction, unlabeled_value, write_ground_truth
from .rows import ReviewedJob, ReviewError, Selection, image_name, relative_name, select

TOOLS = ("label-studio", "cvat")
EXPORT_MANIFEST = "review.json"
IMAGES_DIR, UNCERTAINTY_DIR = "images", "uncertainty"
LOCAL_FILES_URL = "/data/local-files/?d="
# Schemes Label Studio opens itself (cloud storage it presigns, or plain web URLs).
REMOTE_SCHEMES = ("s3", "gs", "gcs", "azure-blob", "http", "https")


@dataclass(frozen=True)
class ExportSettings:
    tool: str
    selection: Selection
    dest: str
    dest_storage_options: dict[str, Any] = field(default_factory=dict)
    input_storage_options: dict[str, Any] = field(default_factory=dict)
    copy_images: bool = False
    local_files_root: str | None = None  # Label Studio's LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT


def export_review(job_url: str, job_options: dict[str, Any], settings: ExportSettings) -> dict[str, Any]:
    """Write the chosen images' pre-annotations for `settings.tool` to `settings.dest`; returns review.json."""
    if settings.tool not in TOOLS:
        raise ReviewError(f"--to {settings.tool!r}: expected one of {', '.join(TOOLS)}")
    job = ReviewedJob(job_url, job_options)
    chosen = select(job, settings.selection)
    if chosen.num_rows == 0:
        raise ReviewError(f"--select {settings.selection}: no image of the job qualifies")
    rows = job.rows(chosen)
    label_maps = [label_map_of(row) for row in rows]
    margins = _margin_maps(job, rows)
    planned = job.planned(rows)
    data = job.image_bytes(rows, settings.input_storage_options, planned) if settings.copy_images else None
    names = [image_name(row["image_id"], data[i]) if data else relative_name(row["image_id"]) for i, row in enumerate(rows)]
    files: dict[str, bytes] = {}
    if data:
        files.update({f"{IMAGES_DIR}/{name}": content for name, content in zip(names, data)})
    colours = ["#%02x%02x%02x" % tuple(int(v) for v in c) for c in figures.class_colours(len(job.classes))]
    notes: list[str] = []
    if settings.tool == "label-studio":
        files.update(_label_studio_files(job, settings, rows, planned, names, label_maps, margins, colours, notes))
    else:
        items = [
            {"name": name, "width": row["width"], "height": row["height"], "label_map": label_map, "class_ids": sorted(l["class_id"] for l in row["labels"])}
            for name, row, label_map in zip(names, rows, label_maps)
        ]
        files["annotations.xml"] = cvat.annotations_xml(items, job.classes, colours)
        if not data:
            notes.append("CVAT matches annotations to the task's images by file name: the task must hold images named as in annotations.xml")
    manifest = {
        "tool": settings.tool,
        "selection": str(settings.selection),
        "job": redact_url(job_url),
        "classes": job.classes,
        "checkpoint_hash": job.record["checkpoint_hash"],
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "notes": notes,
        "images": [
            {"image_index": row["image_index"], "image_id": row["image_id"], "source": redact_url(row["source"]), "name": name,
             "mean_margin": row["mean_margin"], "low_margin_share": row["low_margin_share"]}
            for row, name in zip(rows, names)
        ],
    }
    store = OutputStore(settings.dest, settings.dest_storage_options)
    store.write_many(files)
    store.write_json(EXPORT_MANIFEST, manifest)
    return manifest


def _margin_maps(job: ReviewedJob, rows: list[dict[str, Any]]) -> list[np.ndarray] | None:
    """The rows' margin maps, if the job wrote them (format `confidence`)."""
    if "confidence" not in job.record["spec"]["output"]["formats"]:
        return None
    names = [png_file(row["shard_id"], row["image_index"], row["image_id"], folder=CONFIDENCE_DIR) for row in rows]
    return [np.asarray(Image.open(io.BytesIO(content))) for content in job.store.read_many(names)]


def _label_studio_files(
    job: ReviewedJob,
    settings: ExportSettings,
    rows: list[dict[str, Any]],
    planned: list[dict[str, Any]],
    names: list[str],
    label_maps: list[np.ndarray],
    margins: list[np.ndarray] | None,
    colours: list[str],
    notes: list[str],
) -> dict[str, bytes]:
    dest_fs, dest_root = filesystem(settings.dest, settings.dest_storage_options)
    dest_is_local = isinstance(dest_fs, LocalFileSystem)

    def reference(location: str, what: str) -> str:
        return _image_reference(location, settings.local_files_root, what)

    heat_maps = margins is not None and (not dest_is_local or settings.local_files_root is not None)
    if margins is not None and not heat_maps:
        notes.append("uncertainty heat maps left out: Label Studio could not open them (give --local-files-root)")
    files: dict[str, bytes] = {}
    tasks = []
    model_version = f"sed-{job.record['checkpoint_hash'][:12]}"
    for i, (row, plan_row, name) in enumerate(zip(rows, planned, names)):
        if settings.copy_images:
            image_url = reference(to_url(dest_fs, posixpath.join(dest_root.rstrip("/"), IMAGES_DIR, name)), f"image {row['image_id']}")
        elif plan_row["kind"] != KIND_FILE:
            raise ReviewError(f"image {row['image_id']} is inside {redact_url(plan_row['source'])} ({plan_row['kind']}): pass --copy-images")
        else:
            image_url = reference(plan_row["source"], f"image {row['image_id']}")
        uncertainty_url = None
        if heat_maps:
            heat_name = f"{UNCERTAINTY_DIR}/{posixpath.splitext(name)[0]}.png"
            files[heat_name] = _heat_map(margins[i])
            uncertainty_url = reference(to_url(dest_fs, posixpath.join(dest_root.rstrip("/"), heat_name)), "the uncertainty maps")
        tasks.append(
            label_studio.task(row, image_url, job.classes, label_maps[i], model_version, None if margins is None else margins[i], uncertainty_url)
        )
    config = label_studio.label_config(job.classes, colours, uncertainty_layer=margins is not None, uncertainty_image=heat_maps)
    project = {"title": f"sed-label review: {posixpath.basename(job.url.rstrip('/'))}", "label_config": config,
               "sampling": "Uncertainty sampling", "model_version": model_version}
    files["label_config.xml"] = config.encode("utf-8")
    files["project.json"] = json.dumps(project, indent=2).encode("utf-8")
    files["tasks.json"] = json.dumps(tasks).encode("utf-8")
    return files


def _image_reference(location: str, local_files_root: str | None, what: str) -> str:
    """What a task's `data` holds for an image at `location`: a local-files URL under Label Studio's
    document root, or a URL it opens itself."""
    scheme = urllib.parse.urlsplit(location).scheme
    if scheme in REMOTE_SCHEMES:
        return location
    if local_files_root is None:
        raise ReviewError(
            f"{what} is a local file ({location}): Label Studio serves local files from its document root; "
            "pass --local-files-root (its LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT)"
        )
    path = os.path.abspath(location[len("file://") :] if location.startswith("file://") else location)
    root = os.path.abspath(local_files_root)
    if os.path.commonpath([path, root]) != root:
        raise ReviewError(f"{what} ({path}) is not under --local-files-root {root}")
    return LOCAL_FILES_URL + urllib.parse.quote(os.path.relpath(path, root))


def _heat_map(margin: np.ndarray) -> bytes:
    """A margin map as a picture: dark where two classes were close, bright where the model was sure."""
    rgb = (matplotlib.colormaps["magma"](margin.astype(np.float32) / MARGIN_PNG_SCALE)[..., :3] * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass(frozen=True)
class ImportSettings:
    tool: str
    job_url: str
    output: str
    job_storage_options: dict[str, Any] = field(default_factory=dict)
    output_storage_options: dict[str, Any] = field(default_factory=dict)
    input_storage_options: dict[str, Any] = field(default_factory=dict)
    unpainted: str = "ignore"  # or a class name
    reviewer: str | None = None  # CVAT exports do not say who painted
    export_storage_options: dict[str, Any] = field(default_factory=dict)


def import_review(export: str, settings: ImportSettings) -> dict[str, Any]:
    """Read the tool's export of the corrections and write them as ground truth; returns review.json."""
    if settings.tool not in TOOLS:
        raise ReviewError(f"--from {settings.tool!r}: expected one of {', '.join(TOOLS)}")
    job = ReviewedJob(settings.job_url, settings.job_storage_options)
    unlabeled = unlabeled_value(job)
    if settings.unpainted == "ignore":
        unpainted = None
    elif settings.unpainted in job.classes:
        unpainted = job.classes.index(settings.unpainted)
    else:
        raise ReviewError(f"--unpainted {settings.unpainted!r}: expected 'ignore' or one of the job's classes")
    scores = job.scores()
    provenance: dict[str, Any] = {"tool": settings.tool, "export": redact_url(export), "unpainted": settings.unpainted}
    if settings.tool == "label-studio":
        tasks = _read_json_export(export, settings.export_storage_options)
        indices = {int(t["data"]["sed_image_index"]) for t in tasks if isinstance(t.get("data"), dict) and "sed_image_index" in t["data"]}
        rows = _labelled_rows(job, scores, indices)
        found, untouched = label_studio.corrections(tasks, job.classes, _sizes(rows), unlabeled, unpainted)
        provenance.update(overlaps="the region drawn last wins", tasks_not_annotated=untouched)
    else:
        found, rows = _cvat_corrections(job, scores, cvat.SegmentationExport(export, settings.export_storage_options), unlabeled, unpainted, settings.reviewer)
        provenance.update(overlaps="none: CVAT merges regions by z-order before it exports")
    return write_ground_truth(job, found, rows, settings.output, settings.output_storage_options, settings.input_storage_options, provenance)


def _read_json_export(export: str, storage_options: dict[str, Any]) -> list[dict[str, Any]]:
    try:
        fs, path = filesystem(export, storage_options)
        tasks = json.loads(fs.cat_file(path))
    except (OSError, StorageError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ReviewError(f"{redact_url(export)}: not a readable Label Studio JSON export: {type(exc).__name__}: {exc}") from exc
    if not isinstance(tasks, list):
        raise ReviewError(f"{redact_url(export)}: a Label Studio JSON export is a list of tasks")
    return tasks


def _labelled_rows(job: ReviewedJob, scores: pa.Table, indices: set[int]) -> dict[int, dict[str, Any]]:
    """The job's committed, labelled rows among `indices`, by image index (one read of their shards)."""
    chosen = scores.filter(pc.is_in(scores.column("image_index"), pa.array(sorted(indices), pa.int64())))
    chosen = chosen.filter(pc.equal(chosen.column("status"), STATUS_OK))
    return {row["image_index"]: row for row in job.rows(chosen)}


def _sizes(rows: dict[int, dict[str, Any]]) -> dict[int, tuple[int, int]]:
    """(height, width) by image index."""
    return {index: (row["height"], row["width"]) for index, row in rows.items()}


def _cvat_corrections(
    job: ReviewedJob, scores: pa.Table, export_reader: cvat.SegmentationExport, unlabeled: int, unpainted: int | None, reviewer: str | None
) -> tuple[list[Correction], dict[int, dict[str, Any]]]:
    """The export's corrections, and the job's rows they correct (by image index)."""
    masks = export_reader.masks()
    if not masks:
        raise ReviewError(f"{export_reader.path}: no {cvat.CLASS_FOLDER}/*.png: the export holds no annotated image")
    # CVAT names a mask after its image without the extension: the image id's stem, or the whole id
    # where the export added an extension to it (`--copy-images` of an id without one).
    by_name: dict[str, int | None] = {}
    for image_id, index, status in zip(*(scores.column(c).to_pylist() for c in ("image_id", "image_index", "status"))):
        if status == STATUS_OK:
            for name in {posixpath.splitext(relative_name(image_id))[0], relative_name(image_id)}:
                by_name[name] = index if by_name.get(name, index) == index else None
    unknown = [name for name in masks if name not in by_name]
    if unknown:
        raise ReviewError(f"{export_reader.path}: {len(unknown)} images are not among the job's labelled images: {', '.join(sorted(unknown)[:5])}")
    ambiguous = [name for name in masks if by_name[name] is None]
    if ambiguous:
        raise ReviewError(f"{export_reader.path}: {', '.join(sorted(ambiguous)[:5])}: several of the job's images have this name without extension")
    by_stem = {name: by_name[name] for name in masks}
    rows = _labelled_rows(job, scores, set(by_stem.values()))
    sizes = _sizes(rows)
    found = [
        export_reader.correction(name, data, job.classes, by_stem[name], sizes[by_stem[name]], unlabeled, unpainted, reviewer)
        for name, data in sorted(masks.items())
    ]
    return found, rows

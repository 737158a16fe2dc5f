"""`build_report`: read a job's outputs through fsspec, write `report.json` and `report.html`."""

from __future__ import annotations

import json
import posixpath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from jinja2 import Environment, PackageLoader, select_autoescape

from schemas import DEFAULT_MAX_PIXELS

from ..datasets import DatasetError, read_label_map
from ..datasets.labelmaps import IGNORE_UINT8, IGNORE_UINT16
from ..decode import DecodeError, decode_image
from ..infer import UNLABELED
from ..label.commit import JOB_FILE, JobOutput
from ..label.encode import label_map_of
from ..metrics import SemSegEvaluator
from ..sources import read_images
from ..storage import filesystem, to_url
from . import figures
from .near_duplicates import MAX_DISTANCE, near_duplicate_groups
from .stats import ImageSummary, LabelStatistics

REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
NEAR_DUPLICATES_FILE = "near_duplicates.parquet"
NEAR_DUPLICATE_GROUPS_LISTED = 50  # in report.json and the page, largest first; the Parquet file has them all
NEAR_DUPLICATE_IDS_LISTED = 20  # image ids listed per group there
GROUND_TRUTH_EXTENSIONS = (".png", ".tif", ".tiff")


class ReportError(RuntimeError):
    """An output folder that holds no job results to report on."""


class _GroundTruth:
    """Label maps named like the images (`a/b.jpg` -> `a/b.png`), compared with the labels."""

    def __init__(self, url: str, classes: list[str], storage_options: dict[str, Any], semantics: str) -> None:
        self.fs, self.root = filesystem(url, storage_options)
        self.root = self.root.rstrip("/")
        self.storage_options = storage_options
        self.evaluators: dict[int, SemSegEvaluator] = {}
        self.classes = classes
        self.semantics = semantics
        self.matched = 0
        self.missing: list[str] = []
        # One listing, not a request per row: the ground truth may cover a few reviewed images of millions.
        found = sorted(
            (GROUND_TRUTH_EXTENSIONS.index(posixpath.splitext(p)[1].lower()), p)
            for p in self.fs.find(self.root)
            if p.lower().endswith(GROUND_TRUTH_EXTENSIONS)
        )
        self.label_maps: dict[str, str] = {}
        for _, path in found:
            self.label_maps.setdefault(posixpath.splitext(path[len(self.root) + 1 :])[0], path)

    def add(self, row: dict[str, Any]) -> None:
        path = self.label_maps.get(posixpath.splitext(row["image_id"].lstrip("/"))[0])
        if path is None:
            if len(self.missing) < 20:
                self.missing.append(row["image_id"])
            return
        url = to_url(self.fs, path)
        try:
            truth = read_label_map(url, self.storage_options)
            ignore = IGNORE_UINT8 if truth.dtype == np.uint8 else IGNORE_UINT16
            evaluator = self.evaluators.setdefault(ignore, SemSegEvaluator(self.classes, ignore_label=ignore, semantics=self.semantics))
            evaluator.process(label_map_of(row), truth)
        except (DatasetError, ValueError) as exc:
            raise ReportError(f"ground truth {url}: {exc}") from exc
        self.matched += 1

    def results(self) -> dict[str, Any]:
        if not self.evaluators:
            return {"images": 0, "missing_examples": self.missing}
        evaluator = next(iter(self.evaluators.values()))
        for other in list(self.evaluators.values())[1:]:
            evaluator.confusion += other.confusion
        metrics = evaluator.evaluate()
        return {
            "images": self.matched,
            "semantics": self.semantics,
            "metrics": {k: (None if np.isnan(v) else round(float(v), 4)) for k, v in metrics.items()},
            "confusion_pairs": evaluator.confusion_pairs(10),
            "missing_examples": self.missing,
        }


def _gallery(store: JobOutput, entries: list[ImageSummary], colours: np.ndarray, classes: list[str], options: dict) -> list[dict]:
    """Overlays for some images: the source is read again through the job's plan."""
    if not entries:
        return []
    plan = store.read_plan()
    wanted = plan.filter(pc.is_in(plan.column("image_index"), pc.cast([e.image_index for e in entries], "int64")))
    return gallery({r["image_index"]: r for r in wanted.to_pylist()}, entries, colours, classes, options)


def gallery(plan_rows: dict[int, dict], entries: list[ImageSummary], colours: np.ndarray, classes: list[str], options: dict) -> list[dict]:
    """Overlays of `entries` with their legends; `plan_rows` (by image index) say where each source
    is, `options` how to read it (the input spec's fields)."""
    if not entries:
        return []
    data = read_images([dict(plan_rows[e.image_index], inline=None) for e in entries], options.get("image_column", "image"), options.get("storage_options", {}))
    items = []
    for entry, value in zip(entries, data):
        item = {"image_id": entry.image_id, "confidence": entry.confidence, "picture": None, "legend": []}
        try:
            if isinstance(value, Exception):
                raise DecodeError(str(value))
            image = decode_image(value, options.get("max_pixels", DEFAULT_MAX_PIXELS))
            item["picture"] = figures.overlay(image, label_map_of(entry.row), colours, int(UNLABELED))
        except DecodeError as exc:
            item["unavailable"] = f"source not readable for the gallery: {exc}"
        for label in sorted(entry.row["labels"], key=lambda l: -l["area"]):
            colour = "#%02x%02x%02x" % tuple(int(v) for v in colours[label["class_id"]])
            item["legend"].append({"name": classes[label["class_id"]], "colour": colour, "area": label["area"]})
        items.append(item)
    return items


def near_duplicates(store: JobOutput, stats: LabelStatistics) -> dict[str, Any]:
    """Group the rows' perceptual hashes (`near_duplicates.py`); write every grouped image to
    `near_duplicates.parquet` (group, image_index, image_id, phash) and return the summary with the
    largest groups. The image ids come from the plan, for the grouped images only."""
    hashes = np.frombuffer(stats.phashes, dtype=np.uint64)
    indices = np.frombuffer(stats.phash_indices, dtype=np.int64)
    groups = near_duplicate_groups(hashes)
    grouped = groups >= 0
    plan = store.read_plan()
    members = pa.table({"group": groups[grouped], "image_index": indices[grouped], "phash": pa.array([f"{h:016x}" for h in hashes[grouped].tolist()], pa.string())})
    ids = plan.select(["image_index", "image_id"]).filter(pc.is_in(plan.column("image_index"), members.column("image_index")))
    members = members.join(ids, "image_index").sort_by([("group", "ascending"), ("image_index", "ascending")])
    members = members.select(["group", "image_index", "image_id", "phash"])
    sink = pa.BufferOutputStream()
    pq.write_table(members, sink, compression="zstd")
    store.write(NEAR_DUPLICATES_FILE, sink.getvalue().to_pybytes())
    listed = members.filter(pc.less(members.column("group"), NEAR_DUPLICATE_GROUPS_LISTED)).to_pylist()
    largest: list[dict[str, Any]] = []
    for member in listed:
        if not largest or largest[-1]["group"] != member["group"]:
            largest.append({"group": member["group"], "images": 0, "image_ids": []})
        largest[-1]["images"] += 1
        if len(largest[-1]["image_ids"]) < NEAR_DUPLICATE_IDS_LISTED:
            largest[-1]["image_ids"].append(member["image_id"])
    return {
        "max_hamming_distance": MAX_DISTANCE,
        "groups": int(groups.max()) + 1 if grouped.any() else 0,
        "images": int(grouped.sum()),
        "file": NEAR_DUPLICATES_FILE,
        "largest_groups": largest,
    }


def build_report(
    output_url: str,
    storage_options: dict[str, Any] | None = None,
    input_storage_options: dict[str, Any] | None = None,
    ground_truth: str | None = None,
    ground_truth_options: dict[str, Any] | None = None,
    semantics: str = "detectron2",
    gallery_size: int = 8,
) -> dict[str, Any]:
    """Summarise a finished or partly finished job; returns what `report.json` holds.

    `storage_options` are for the output folder, `input_storage_options` for reading the source
    images of the gallery again, `ground_truth_options` for the ground-truth label maps.
    """
    store = JobOutput(output_url, storage_options)
    record = store.read_json(JOB_FILE)
    if record is None:
        raise ReportError(f"{output_url} holds no sed-label job (no {JOB_FILE})")
    classes = record["classes"]
    stats = LabelStatistics(classes, gallery_size=gallery_size)
    truth = _GroundTruth(ground_truth, classes, ground_truth_options or {}, semantics) if ground_truth else None
    markers = store.committed_shards()
    for _, marker in sorted(markers.items()):
        for row in store.read_labels(marker).to_pylist():
            stats.add_row(row)
            if truth is not None and row["status"] == "ok":
                truth.add(row)
    report = {
        "output_url": output_url,
        "shards_committed": len(markers),
        "images_planned": record["images"],
        "complete": stats.images == record["images"],
        "labels": stats.to_dict(),
        "near_duplicates": near_duplicates(store, stats),
    }
    if truth is not None:
        report["ground_truth"] = {"url": ground_truth, **truth.results()}
    colours = figures.class_colours(len(classes))
    # job.json keeps no credentials: the gallery reads the sources with the caller's options.
    input_options = {**record["spec"]["input"], "storage_options": input_storage_options or {}}
    page = {
        "report": report,
        "charts": {
            "class_share": figures.class_share_chart(stats),
            "histograms": figures.probability_histograms(stats),
            "kept": figures.kept_classes_chart(stats, len(record.get("prompts", classes))),
            "throughput": figures.throughput_chart(stats),
        },
        "least_confident": _gallery(store, stats.least_confident, colours, classes, input_options),
        "random_sample": _gallery(store, stats.random_sample, colours, classes, input_options),
        "spec_json": json.dumps(record["spec"], indent=2),
    }
    environment = Environment(loader=PackageLoader("pipeline.report", "templates"), autoescape=select_autoescape(["html"]))
    html = environment.get_template("report.html").render(**page)
    store.write_json(REPORT_JSON, report)
    store.write(REPORT_HTML, html.encode("utf-8"))
    return report

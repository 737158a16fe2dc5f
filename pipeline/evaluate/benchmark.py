"""`sed-label eval`: the paper's evaluation protocol over a prepared benchmark dataset, on Ray.

    prepared items -> read + decode (CPU tasks) -> SED (actor pool, `SEDInference`: short side
    640 / long side 2560 with PIL, pooling 1x1, probabilities resized in one step to the image)
      -> each image's sparse confusion counts against its label map (CPU tasks, `score_labels`)
      -> summed into one `SemSegEvaluator` on the driver

The labelling job's steps are reused as they are; no prediction is kept anywhere, so any number
of images streams through.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray

import sed_model
from schemas import STATUS_OK, InferenceSpec, InputSpec, ModelSpec, RaySpec

from ..datasets import BenchmarkItem, DatasetError, DatasetSpec, PreparedDataset, read_prepared
from ..metrics import SemSegEvaluator
from ..progress import LogProgress, Progress
from ..ray_stages import connect_ray, encode_taxonomy_once, model_stage, read_stage
from ..sources import KIND_FILE, ImageRef, plan_shards
from ..storage import filesystem, write_bytes
from .score import score_labels

SUMMARY_METRICS = ("mIoU", "fwIoU", "mACC", "pACC")
PRESET_TITLES = {"convnext_b": "ConvNeXt-B", "convnext_l": "ConvNeXt-L"}


class BenchmarkError(ValueError):
    """A benchmark that cannot run: unknown model, dataset not prepared, bad arguments."""


@dataclass
class BenchmarkSettings:
    dataset: str
    root: str
    model: ModelSpec
    top_k: int | None = None
    batch_size: int = 4
    limit: int | None = None
    device: str = "auto"
    ray: RaySpec = field(default_factory=RaySpec)
    storage_options: dict[str, Any] = field(default_factory=dict)


def model_from_argument(text: str) -> str | dict[str, Any]:
    """`--model`: a preset / OpenCLIP architecture name, or a path or URL to a JSON OpenCLIP config."""
    if not text.endswith(".json"):
        return text
    try:
        fs, path = filesystem(text)
        config = json.loads(fs.cat_file(path))
    except (OSError, json.JSONDecodeError) as exc:
        raise BenchmarkError(f"--model {text!r}: cannot read a JSON OpenCLIP config: {exc}") from exc
    if not isinstance(config, dict):
        raise BenchmarkError(f"--model {text!r} must hold a JSON object (an OpenCLIP model config)")
    return config


def run_benchmark(settings: BenchmarkSettings, progress: Progress | None = None) -> dict[str, Any]:
    """Evaluate the model on the prepared dataset; returns the result (metrics, the paper's claim)."""
    progress = progress or LogProgress()
    try:
        sed_model.SEDConfig(clip_model=settings.model.clip_model).open_clip_config()
    except (sed_model.UnknownModelError, ValueError) as exc:
        raise BenchmarkError(f"--model: {exc}") from exc
    if settings.limit is not None and settings.limit < 1:
        raise BenchmarkError(f"--limit must be at least 1, got {settings.limit}")
    dataset = read_prepared(settings.dataset, settings.root, settings.storage_options)
    items = dataset.items[: settings.limit]
    if not items:
        raise DatasetError(f"{settings.root!r} holds no images")
    # The paper's protocol is the inference defaults: short side 640, long side at most 2560.
    inference = InferenceSpec(top_k=settings.top_k, batch_size=settings.batch_size, device=settings.device)
    started = time.monotonic()
    owns_ray = connect_ray(settings.ray)
    try:
        evaluator, errors, checkpoint_hash = _evaluate(settings, inference, dataset, items, progress)
    finally:
        if owns_ray:
            ray.shutdown()
    return {
        "dataset": dataset.spec.name,
        "split": dataset.split,
        "root": settings.root,
        "model": settings.model.clip_model,
        "weights": settings.model.weights,
        "checkpoint_hash": checkpoint_hash,
        "top_k": settings.top_k,
        "protocol": {
            "short_edge": inference.short_edge,
            "max_size": inference.max_size,
            "class_attention_pooling": sed_model.SEDConfig(clip_model=settings.model.clip_model).eval_pooling,
            "templates": len(sed_model.IMAGENET_TEMPLATES),
        },
        "semantics": evaluator.semantics,
        "images": len(items) - len(errors),
        "images_in_dataset": len(dataset.items),
        "limit": settings.limit,
        "errors": errors,
        "metrics": {name: (None if math.isnan(value) else round(float(value), 4)) for name, value in evaluator.evaluate().items()},
        "paper": paper_row(dataset.spec, settings.model.clip_model, settings.top_k, _subset(dataset, len(items))),
        "seconds": round(time.monotonic() - started, 3),
    }


def _evaluate(
    settings: BenchmarkSettings,
    inference: InferenceSpec,
    dataset: PreparedDataset,
    items: list[BenchmarkItem],
    progress: Progress,
) -> tuple[SemSegEvaluator, list[dict[str, str]], str]:
    spec = dataset.spec
    taxonomy = spec.taxonomy()
    text_features, checkpoint_hash = encode_taxonomy_once(settings.model, taxonomy, settings.ray, progress)
    classes = list(taxonomy.classes)
    source = InputSpec(url=settings.root, storage_options=settings.storage_options)
    plan = plan_shards([ImageRef(item.image_id, KIND_FILE, item.image_url) for item in items], shard_size=len(items))
    ds = read_stage(plan, source)
    ds = model_stage(ds, settings.model, inference, taxonomy, text_features, checkpoint_hash, settings.ray)
    ds = ds.map_batches(
        score_labels,
        fn_kwargs={
            "label_urls": [item.label_url for item in items],
            "classes": classes,
            "ignore_label": spec.ignore_label,
            "storage_options": settings.storage_options,
        },
        batch_format="numpy",
        num_cpus=0.5,
    )
    evaluator = SemSegEvaluator(classes, ignore_label=spec.ignore_label)
    counts = evaluator.confusion.reshape(-1)  # a view: adding here adds to the matrix
    errors: list[dict[str, str]] = []
    progress.note(f"{spec.title} ({dataset.split}): {len(items)} images of {len(dataset.items)} in {settings.root}")
    progress.start(len(items), "images", "evaluating")
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None, prefetch_batches=0):
        for i in range(len(batch["image_index"])):
            if batch["status"][i] == STATUS_OK:
                np.add.at(counts, batch["confusion_index"][i], batch["confusion_count"][i])
            else:
                errors.append({"image_id": str(batch["image_id"][i]), "error": str(batch["error"][i])})
        progress.advance(len(batch["image_index"]))
    return evaluator, errors, checkpoint_hash


def _subset(dataset: PreparedDataset, evaluated: int) -> str | None:
    """Why the evaluated images are not the paper's whole set, if they are not."""
    if dataset.limit is not None:
        return f"the dataset was prepared from its first {dataset.limit} images only"
    if evaluated < len(dataset.items):
        return f"measured on {evaluated} of {len(dataset.items)} images only"
    return None


def paper_row(spec: DatasetSpec, model: str | dict[str, Any], top_k: int | None, subset: str | None) -> dict[str, Any]:
    """The paper's claimed mIoU for this dataset, model and top-k, or why there is none."""
    claimed = spec.claimed(model, top_k)
    if claimed is not None:
        row = PRESET_TITLES[model] + ("" if top_k is None else f" fast (K={top_k})")
        note = f"SED (CVPR 2024), Table 1, {row}, {spec.title}"
        if subset is not None:
            note += f"; {subset}, not comparable"
        return {"mIoU": claimed, "row": row, "note": note}
    if not spec.claimed_miou:
        note = f"the paper reports no mIoU for {spec.title}"
    elif not isinstance(model, str) or model not in PRESET_TITLES:
        note = "no claimed value: the model is not one of the paper's (convnext_b, convnext_l)"
    else:
        note = f"no claimed value: the paper reports exact (no --top-k) and fast (--top-k 8) rows, not --top-k {top_k}"
    return {"mIoU": None, "row": None, "note": note}


def summary_lines(result: dict[str, Any]) -> list[str]:
    """What `sed-label eval` prints at the end."""
    metrics = result["metrics"]
    lines = [
        f"{result['dataset']}: {result['images']} images, {result['seconds']:.1f} s",
        "  ".join(f"{name} {metrics[name]:.2f}" if metrics[name] is not None else f"{name} n/a" for name in SUMMARY_METRICS),
    ]
    paper = result["paper"]
    if paper["mIoU"] is not None and metrics["mIoU"] is not None:
        lines.append(f"paper ({paper['note']}): mIoU {paper['mIoU']:.1f}   measured: mIoU {metrics['mIoU']:.1f}")
    else:
        lines.append(f"paper: {paper['note']}")
    if result["errors"]:
        lines.append(f"WARNING: {len(result['errors'])} images failed and are not counted, e.g. {result['errors'][0]['image_id']}: {result['errors'][0]['error']}")
    return lines


def save_result(result: dict[str, Any], url: str) -> None:
    """The result as JSON at `url` (any fsspec URL)."""
    fs, path = filesystem(url)
    write_bytes(fs, path, json.dumps(result, indent=2).encode("utf-8"))

"""`run_preview`: label a sample of a job's input with the job's own pipeline, before the big job.

The sample is spread over the input's listing (every k-th image: deterministic). It runs the
labelling job's stages (read and decode, SED on the actor pool, encoding) on the job's model and
Ray, with the model step's statistics on, and reads its rows as the report does; nothing is written
to the job's output. What it tells:

- per output class: share of pixels, images where present, mean confidence; classes never predicted;
  the distractors' share;
- prompt pairs likely to be confused: by the cosine of their template-averaged text embeddings,
  and by how often one is the other's runner-up at the sample's pixels;
- early rejection: classes kept and prompts winning pixels per image, to choose `top_k`;
- the model's measured images/s per actor on this hardware, and the estimated wall time (and,
  with a GPU-hour price, the cost) of the whole input per number of actors;
- a gallery of overlays with the legend in output classes.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import ray
from jinja2 import ChoiceLoader, Environment, PackageLoader, select_autoescape

from schemas import STATUS_OK, JobSpec

from ..label.commit import redact, redact_url
from ..label.encode import encode_labels
from ..progress import LogProgress, Progress
from ..ray_stages import connect_ray, encode_taxonomy_once, model_stage, read_stage
from ..report import figures
from ..report.build import gallery
from ..report.stats import LabelStatistics
from ..sources import list_images, plan_shards
from ..storage import OutputStore
from ..taxonomy import DISTRACTOR, Taxonomy, load_taxonomy

PREVIEW_JSON = "preview.json"
PREVIEW_HTML = "preview.html"
DEFAULT_SAMPLE = 64
# Cosine of template-averaged text embeddings from which prompts of different classes are flagged:
# near-duplicates (a name and its plural, the same name twice). Looser pairs: lower it.
DEFAULT_SIMILARITY = 0.95
ACTOR_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128)
PAIRS_SHOWN = 15
GALLERY_SIZE = 12


@dataclass
class LabelledSample:
    stats: LabelStatistics  # the rows, summarised as the report does
    runner_up: np.ndarray  # (prompts, prompts) pixels: [best, runner-up]
    prompts_won: list[int]  # per ok image: how many prompts won some pixel
    timed_images: int  # the images the model's rate is measured on (after each actor's first batch)
    model_seconds: float  # the model's own time on them, summed over actors
    wall_seconds: float  # from the first labelled batch to the last


@dataclass(frozen=True)
class PreviewSettings:
    sample: int = DEFAULT_SAMPLE
    similarity: float = DEFAULT_SIMILARITY
    gpu_hour_cost: float | None = None


def duration(hours: float | None) -> str:
    """Hours as a person reads them: seconds, minutes, hours or days."""
    if hours is None:
        return "n/a"
    seconds = hours * 3600
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def sample_indices(total: int, sample: int) -> list[int]:
    """`sample` positions spread evenly over a listing of `total` (all of them if it is shorter)."""
    if total <= sample:
        return list(range(total))
    return [int(i * total / sample) for i in range(sample)]


def similar_prompts(taxonomy: Taxonomy, text_features: np.ndarray, threshold: float) -> list[dict[str, Any]]:
    """Prompt pairs that would change a label if confused (`_confusable`) whose template-averaged
    text embeddings have a cosine of at least `threshold`, most similar first."""
    mean = text_features.mean(axis=1)
    mean = mean / np.linalg.norm(mean, axis=1, keepdims=True)
    cosine = mean @ mean.T
    pairs = []
    for a in range(len(taxonomy.prompts)):
        for b in range(a + 1, len(taxonomy.prompts)):
            if _confusable(taxonomy, a, b) and cosine[a, b] >= threshold:
                pairs.append({**_pair(taxonomy, a, b), "cosine": round(float(cosine[a, b]), 4)})
    return sorted(pairs, key=lambda p: -p["cosine"])


def _confusable(taxonomy: Taxonomy, a: int, b: int) -> bool:
    """Prompts whose confusion changes a label: of different classes, or a class and a distractor
    (two prompts of one class, or two distractors, give the same label)."""
    return taxonomy.prompt_class[a] != taxonomy.prompt_class[b]


def _owner(taxonomy: Taxonomy, prompt: int) -> str:
    index = taxonomy.prompt_class[prompt]
    return "(distractor)" if index == DISTRACTOR else taxonomy.classes[index]


def _pair(taxonomy: Taxonomy, a: int, b: int) -> dict[str, str]:
    return {"prompt_a": taxonomy.prompts[a], "class_a": _owner(taxonomy, a), "prompt_b": taxonomy.prompts[b], "class_b": _owner(taxonomy, b)}


def runner_up_pairs(taxonomy: Taxonomy, counts: np.ndarray) -> list[dict[str, Any]]:
    """Pairs (best prompt, runner-up prompt) that would change a label (`_confusable`) by pixels,
    most first; `share` is the share of the best prompt's pixels where the other came second."""
    won = counts.sum(axis=1)
    pairs = []
    for a, b in zip(*np.nonzero(counts)):
        if _confusable(taxonomy, int(a), int(b)):
            pairs.append({**_pair(taxonomy, int(a), int(b)), "pixels": int(counts[a, b]), "share": round(float(counts[a, b] / won[a]), 4)})
    return sorted(pairs, key=lambda p: -p["pixels"])


def estimates(input_images: int, images_per_second: float, spec: JobSpec, gpu_hour_cost: float | None) -> list[dict[str, Any]]:
    """Wall time of the whole input per number of actors, if the model is the bottleneck and each
    actor runs as fast as the sample's; with a price, the GPU cost (actors x gpus_per_actor x hours)."""
    configured = spec.ray.num_actors if isinstance(spec.ray.num_actors, int) else spec.ray.num_actors.max
    rows = []
    for actors in sorted({*ACTOR_COUNTS, configured}):
        hours = input_images / (images_per_second * actors) / 3600 if images_per_second else None
        gpu_hours = hours * actors * spec.ray.gpus_per_actor if hours is not None else None
        cost = gpu_hours * gpu_hour_cost if gpu_hour_cost is not None and gpu_hours is not None else None
        rows.append({"actors": actors, "configured": actors == configured, "hours": hours, "gpu_hours": gpu_hours, "cost": cost})
    return rows


def run_preview(spec: JobSpec, output_url: str, settings: PreviewSettings = PreviewSettings(), progress: Progress | None = None) -> dict[str, Any]:
    """Label a sample of the job's input; write `preview.json` and `preview.html` to `output_url`
    (never the job's output) and return what `preview.json` holds."""
    progress = progress or LogProgress()
    taxonomy = load_taxonomy(spec.taxonomy)
    owns_ray = connect_ray(spec.ray)
    try:
        text_features, checkpoint_hash = encode_taxonomy_once(spec.model, taxonomy, spec.ray, progress)
        refs = list_images(spec.input)
        chosen = [refs[i] for i in sample_indices(len(refs), settings.sample)]
        plan = plan_shards(chosen, shard_size=len(chosen))
        progress.note(f"preview: {len(chosen)} of the {len(refs)} images of {redact_url(spec.input.url)}, spread over the listing")
        sampled = _label_sample(spec, taxonomy, text_features, checkpoint_hash, plan, progress)
    finally:
        if owns_ray:
            ray.shutdown()
    stats, prompts_won = sampled.stats, sampled.prompts_won
    labelled = stats.to_dict()
    images_per_second = sampled.timed_images / sampled.model_seconds if sampled.model_seconds else 0.0
    preview = {
        "job": {"input": redact_url(spec.input.url), "output": redact_url(spec.output.url)},
        "sample": {"images": stats.images, "of": len(refs), "ok": stats.ok, "errors_by_reason": labelled["errors_by_reason"]},
        "taxonomy": taxonomy.structure(),
        "classes": [
            {
                "name": entry["name"],
                "prompts": list(taxonomy.class_prompts(entry["class_id"])),
                "pixel_share": entry["pixel_share"],
                "images": entry["images"],
                "mean_confidence": entry["mean_prob"],
            }
            for entry in labelled["classes"]
        ],
        "never_predicted": [entry["name"] for entry in labelled["classes"] if entry["images"] == 0],
        "unlabeled_share": labelled["unlabeled_share"],
        "distractor_share": labelled["distractor_share"],
        "similar_prompts": {"threshold": settings.similarity, "pairs": similar_prompts(taxonomy, text_features, settings.similarity)[:PAIRS_SHOWN]},
        "runner_up": runner_up_pairs(taxonomy, sampled.runner_up)[:PAIRS_SHOWN],
        "early_rejection": {
            "top_k": spec.inference.top_k,
            "prompts": len(taxonomy.prompts),
            "kept_per_image": labelled["kept_classes_per_image"],
            "prompts_winning_pixels_per_image": {str(k): prompts_won.count(k) for k in sorted(set(prompts_won))},
        },
        "speed": {
            "images_per_second_per_actor": round(images_per_second, 3),
            "model_seconds": round(sampled.model_seconds, 3),
            "timed_images": sampled.timed_images,
            "sample_wall_seconds": round(sampled.wall_seconds, 3),
            "device": spec.inference.device,
            "gpus_per_actor": spec.ray.gpus_per_actor,
            "cpus_per_actor": spec.ray.cpus_per_actor,
        },
        "estimate": {"input_images": len(refs), "gpu_hour_cost": settings.gpu_hour_cost, "per_actors": estimates(len(refs), images_per_second, spec, settings.gpu_hour_cost)},
    }
    _write(preview, stats, taxonomy, plan, spec, output_url)
    return preview


def _label_sample(
    spec: JobSpec, taxonomy: Taxonomy, text_features: np.ndarray, checkpoint_hash: str, plan: pa.Table, progress: Progress
) -> LabelledSample:
    """The labelling job's stages over the sample, rows read as the report reads a job's."""
    ds = read_stage(plan, spec.input)
    ds = model_stage(ds, spec.model, spec.inference, taxonomy, text_features, checkpoint_hash, spec.ray, statistics=True)
    ds = ds.map_batches(
        encode_labels,
        fn_kwargs={"num_classes": len(taxonomy.classes), "taxonomy_hash": taxonomy.hash, "checkpoint_hash": checkpoint_hash},
        batch_format="numpy",
        num_cpus=0.5,
    )
    stats = LabelStatistics(list(taxonomy.classes), gallery_size=GALLERY_SIZE)
    prompts = len(taxonomy.prompts)
    counts = np.zeros((prompts, prompts), dtype=np.int64)
    prompts_won: list[int] = []
    timed = {True: [0, 0.0], False: [0, 0.0]}  # warm or not -> [ok images, model seconds]
    first = None
    progress.start(plan.num_rows, "images", "preview")
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=0):
        first = first or time.monotonic()
        for row in batch.to_pylist():
            stats.add_row(row)
            if row["status"] == STATUS_OK:
                timed[row["model_warm"]][0] += 1
                timed[row["model_warm"]][1] += row["model_seconds"]
                pairs = np.asarray(row["runner_up_pairs"], dtype=np.int64)
                np.add.at(counts.reshape(-1), pairs, np.asarray(row["runner_up_counts"], dtype=np.int64))
                prompts_won.append(row["prompts_won"])
        progress.advance(batch.num_rows)
    # The rate of batches after each actor's first (which pays its start), if there are any.
    images, seconds = timed[True] if timed[True][0] else timed[False]
    return LabelledSample(stats, counts, prompts_won, images, seconds, time.monotonic() - (first or time.monotonic()))


def _write(preview: dict[str, Any], stats: LabelStatistics, taxonomy: Taxonomy, plan: pa.Table, spec: JobSpec, output_url: str) -> None:
    colours = figures.class_colours(len(taxonomy.classes))
    plan_rows = {row["image_index"]: row for row in plan.to_pylist()}
    input_options = spec.input.model_dump(mode="json")
    page = {
        "preview": preview,
        "charts": {"class_share": figures.class_share_chart(stats), "kept": figures.kept_classes_chart(stats, len(taxonomy.prompts))},
        "gallery": gallery(plan_rows, stats.random_sample, colours, list(taxonomy.classes), input_options),
        "spec_json": json.dumps(redact(spec.model_dump(mode="json")), indent=2),
    }
    # The report's templates too: the pages share their style and gallery (`page.html`).
    loader = ChoiceLoader([PackageLoader("pipeline.preview", "templates"), PackageLoader("pipeline.report", "templates")])
    environment = Environment(loader=loader, autoescape=select_autoescape(["html"]))
    environment.filters["duration"] = duration
    html = environment.get_template("preview.html").render(**page)
    store = OutputStore(output_url)
    store.write_json(PREVIEW_JSON, preview)
    store.write(PREVIEW_HTML, html.encode("utf-8"))

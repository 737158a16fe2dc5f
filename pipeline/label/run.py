"""The labelling job on Ray Data.

    plan (listed once, saved) -> pending shards -> read + decode (CPU tasks)
      -> SED (actor pool: one model per actor, text embeddings computed once per job)
      -> RLE / PNG encoding (CPU tasks) -> shard writers in the driver -> commit markers

Rows stream through Ray Data with bounded memory; the driver only holds the rows of shards that
are not complete yet (small: RLE strings and statistics, no pixels but PNG bytes when asked for).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from schemas import LABELS_SCHEMA_VERSION, JobSpec

from ..progress import LogProgress, Progress
from ..ray_stages import connect_ray, encode_taxonomy_once, model_stage, read_stage
from ..sources import list_images, plan_shards
from ..taxonomy import Taxonomy, load_taxonomy
from .commit import COCO_DIR, JOB_FILE, MERGED_COCO_FILE, SUMMARY_FILE, JobConflictError, JobOutput, job_fingerprint, redact
from .encode import encode_labels
from .writers import ShardWriter, coco_categories


@dataclass
class JobSummary:
    output_url: str
    images: int = 0
    ok: int = 0
    errors: int = 0
    shards_total: int = 0
    shards_done_before: int = 0
    shards_committed: int = 0
    seconds: float = 0.0
    images_per_second: float = 0.0
    nothing_to_do: bool = False
    errors_by_reason: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def prepare_output(
    spec: JobSpec, taxonomy: Taxonomy, checkpoint_hash: str, overwrite: bool, progress: Progress
) -> tuple[JobOutput, pa.Table, str]:
    """Check the output against this job, create or reuse its plan; return (store, plan, fingerprint)."""
    store = JobOutput(spec.output.url, spec.output.storage_options)
    fingerprint = job_fingerprint(spec, taxonomy.hash, checkpoint_hash)
    record = store.read_json(JOB_FILE)
    if record is not None and overwrite:
        progress.note(f"--overwrite: removing the previous results in {spec.output.url}")
        store.clear()
        record = None
    if record is not None and record.get("fingerprint") != fingerprint:
        raise JobConflictError(
            f"{spec.output.url} holds the results of a different job (model, taxonomy, input or inference "
            "settings changed); refusing to mix them. Use a new output URL, or --overwrite to replace them."
        )
    plan = store.read_plan() if record is not None else None
    if plan is None:
        plan = plan_shards(list_images(spec.input), spec.input.shard_size)
        store.write_json(
            JOB_FILE,
            {
                "fingerprint": fingerprint,
                "spec": redact(spec.model_dump(mode="json")),
                "classes": list(taxonomy.classes),
                "taxonomy_hash": taxonomy.hash,
                "checkpoint_hash": checkpoint_hash,
                "labels_schema_version": LABELS_SCHEMA_VERSION,
                "images": plan.num_rows,
                "created_at": time.time(),
            },
        )
        store.write_plan(plan)
    return store, plan, fingerprint


def run_job(spec: JobSpec, overwrite: bool = False, progress: Progress | None = None) -> JobSummary:
    """Run (or resume) a labelling job and return its summary.

    Bad configuration (taxonomy, weights, output conflicts) raises before any image is labelled.
    """
    progress = progress or LogProgress()
    started = time.monotonic()
    taxonomy = load_taxonomy(spec.taxonomy)
    owns_ray = connect_ray(spec.ray)
    try:
        text_features, checkpoint_hash = encode_taxonomy_once(spec.model, list(taxonomy.classes), list(taxonomy.templates))
        store, plan, fingerprint = prepare_output(spec, taxonomy, checkpoint_hash, overwrite, progress)
        counts = pc.value_counts(plan.column("shard_id"))
        shard_sizes = dict(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist()))
        done_before = store.committed_shards()
        pending = sorted(set(shard_sizes) - set(done_before))
        summary = JobSummary(output_url=spec.output.url, shards_total=len(shard_sizes), shards_done_before=len(done_before))
        if not pending:
            summary.nothing_to_do = True
            progress.note(f"nothing to do: all {len(shard_sizes)} shards in {spec.output.url} are already committed")
        else:
            progress.note(
                f"{plan.num_rows} images in {len(shard_sizes)} shards; {len(done_before)} already committed, {len(pending)} to do"
            )
            job = _Job(spec, taxonomy, checkpoint_hash, fingerprint, store, shard_sizes, progress)
            job.label(text_features, plan, pending)
    finally:
        if owns_ray:
            ray.shutdown()
    markers = store.committed_shards()
    summary.images = sum(m["images"] for m in markers.values())
    summary.ok = sum(m["ok"] for m in markers.values())
    summary.errors = sum(m["errors"] for m in markers.values())
    summary.shards_committed = len(markers) - len(done_before)
    summary.seconds = round(time.monotonic() - started, 3)
    labelled_now = sum(m["images"] for shard, m in markers.items() if shard not in done_before)
    summary.images_per_second = round(labelled_now / summary.seconds, 3) if summary.seconds else 0.0
    summary.errors_by_reason = _errors_by_reason(store, markers)
    if "coco" in spec.output.formats and (not summary.nothing_to_do or not store.exists(MERGED_COCO_FILE)):
        merge_coco(store, taxonomy.classes, sorted(markers))
    store.write_json(SUMMARY_FILE, summary.to_dict())
    return summary


class _Job:
    """One run over the pending shards of a job."""

    def __init__(
        self,
        spec: JobSpec,
        taxonomy: Taxonomy,
        checkpoint_hash: str,
        fingerprint: str,
        store: JobOutput,
        shard_sizes: dict[str, int],
        progress: Progress,
    ) -> None:
        self.spec = spec
        self.taxonomy = taxonomy
        self.checkpoint_hash = checkpoint_hash
        self.fingerprint = fingerprint
        self.store = store
        self.shard_sizes = shard_sizes
        self.progress = progress

    def dataset(self, text_features: np.ndarray, plan: pa.Table, pending: list[str]) -> ray.data.Dataset:
        spec = self.spec
        ds = read_stage(plan.filter(pc.is_in(plan.column("shard_id"), pa.array(pending))), spec.input)
        classes, templates = list(self.taxonomy.classes), list(self.taxonomy.templates)
        ds = model_stage(ds, spec.model, spec.inference, classes, templates, text_features, self.checkpoint_hash, spec.ray)
        return ds.map_batches(
            encode_labels,
            fn_kwargs={
                "num_classes": len(self.taxonomy.classes),
                "taxonomy_hash": self.taxonomy.hash,
                "checkpoint_hash": self.checkpoint_hash,
                "write_png": "png" in spec.output.formats,
            },
            batch_format="numpy",
            num_cpus=0.5,
        )

    def label(self, text_features: np.ndarray, plan: pa.Table, pending: list[str]) -> None:
        metadata = {
            "sed_label.classes": json.dumps(list(self.taxonomy.classes)),
            "sed_label.job_fingerprint": self.fingerprint,
        }
        writers: dict[str, ShardWriter] = {}
        self.progress.start(sum(self.shard_sizes[shard] for shard in pending), "images", "labelling")
        # No prefetching: Ray Data's iterator then held each block until the next one was done, so
        # a shard whose block was out waited on the job's next block (a slow or stalled read) to commit.
        dataset = self.dataset(text_features, plan, pending)
        batches = iter(dataset.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=0))
        try:
            for batch in batches:
                self._write(batch, writers, metadata)
                self.progress.advance(batch.num_rows)
        finally:
            # On an error, stop the dataset's reads and actors now rather than when it is collected.
            close = getattr(batches, "close", None)
            if close is not None:
                close()
        if writers:
            missing = {s: w.expected_rows - w.rows for s, w in writers.items()}
            raise RuntimeError(f"shards ended incomplete (rows missing per shard: {missing}); rerun the job to finish them")

    def _write(self, batch: pa.Table, writers: dict[str, ShardWriter], metadata: dict[str, str]) -> None:
        """Hand a batch's rows to their shards' writers; commit each shard as soon as it is complete."""
        for shard in pc.unique(batch.column("shard_id")).to_pylist():
            writer = writers.get(shard)
            if writer is None:
                writer = writers[shard] = ShardWriter(
                    self.store, shard, self.shard_sizes[shard], self.spec.output.formats, self.taxonomy.classes, metadata
                )
            writer.add(batch.filter(pc.equal(batch.column("shard_id"), shard)))
            if writer.complete:
                stats = writer.commit()
                del writers[shard]
                self.progress.note(f"shard {shard} committed: {stats['ok']} ok, {stats['errors']} errors")


def _errors_by_reason(store: JobOutput, markers: dict[str, dict[str, Any]]) -> dict[str, int]:
    """Error rows counted by reason (the reason's text up to its first colon)."""
    reasons: dict[str, int] = {}
    for marker in markers.values():
        if not marker["errors"]:
            continue
        table = store.read_labels(marker, columns=["error"])
        errors = table.column("error").drop_null().to_pylist()
        for message in errors:
            reason = message.split(":", 1)[0]
            reasons[reason] = reasons.get(reason, 0) + 1
    return dict(sorted(reasons.items(), key=lambda item: -item[1]))


def merge_coco(store: JobOutput, classes: tuple[str, ...] | list[str], shards: list[str]) -> None:
    """One COCO file for the whole job from the committed shards' files, streamed to storage."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as out:
        out.write('{"info": {"description": "sed-label pseudo-labels"}, "categories": ')
        out.write(json.dumps(coco_categories(classes)))
        for key in ("images", "annotations"):
            out.write(f', "{key}": [')
            first = True
            for shard in shards:
                for item in json.loads(store.read_bytes(f"{COCO_DIR}/{shard}.json"))[key]:
                    out.write(("" if first else ", ") + json.dumps(item))
                    first = False
            out.write("]")
        out.write("}")
    try:
        store.upload(MERGED_COCO_FILE, out.name)
    finally:
        os.unlink(out.name)

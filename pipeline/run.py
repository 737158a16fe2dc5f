"""The labelling job on Ray Data: the only module that knows the executor.

    plan (listed once, saved) -> pending shards -> read + decode (CPU tasks)
      -> SED (actor pool: one model per actor, text embeddings computed once per job)
      -> RLE / PNG encoding (CPU tasks) -> shard writers in the driver -> commit markers

Rows stream through Ray Data with bounded memory; the driver only holds the rows of shards that
are not complete yet (small: RLE strings and statistics, no pixels but PNG bytes when asked for).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

import sed_model
from schemas import LABELS_SCHEMA_VERSION, JobSpec

from .commit import COCO_DIR, JOB_FILE, MERGED_COCO_FILE, SUMMARY_FILE, JobConflictError, OutputStore, job_fingerprint, redact
from .encode import encode_labels
from .executor import connect_ray, decoded_images, quiet_ray_data
from .infer import SEDInference
from .model_loading import encode_taxonomy
from .preflight import PreflightError
from .sources import list_images, plan_shards
from .taxonomy import Taxonomy, load_taxonomy
from .writers import ShardWriter, coco_categories

log = logging.getLogger("sed_label")


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


def prepare_output(spec: JobSpec, taxonomy: Taxonomy, checkpoint_hash: str, overwrite: bool) -> tuple[OutputStore, pa.Table, str]:
    """Check the output against this job, create or reuse its plan; return (store, plan, fingerprint)."""
    store = OutputStore(spec.output.url, spec.output.storage_options)
    fingerprint = job_fingerprint(spec, taxonomy.hash, checkpoint_hash)
    record = store.read_json(JOB_FILE)
    if record is not None and overwrite:
        log.warning("overwriting the previous results in %s", spec.output.url)
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


def run_job(spec: JobSpec, overwrite: bool = False, progress: Callable[[str], None] | None = None) -> JobSummary:
    """Run (or resume) a labelling job and return its summary.

    Bad configuration (taxonomy, weights, output conflicts) raises before any image is labelled.
    """
    say = progress or log.info
    started = time.monotonic()
    taxonomy = load_taxonomy(spec.taxonomy)
    owns_ray = connect_ray(spec.ray)
    try:
        # The text embeddings are computed once per job, by one task, and shared by all actors.
        encode = ray.remote(encode_taxonomy).options(num_cpus=1)
        try:
            text_features, checkpoint_hash = ray.get(encode.remote(spec.model, list(taxonomy.classes), list(taxonomy.templates)))
        except sed_model.CheckpointError as exc:  # Ray raises the task's error as a subclass of its type
            raise PreflightError(f"model.weights: {getattr(exc, 'cause', exc)}") from None
        store, plan, fingerprint = prepare_output(spec, taxonomy, checkpoint_hash, overwrite)
        counts = pc.value_counts(plan.column("shard_id"))
        shard_sizes = dict(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist()))
        done_before = store.committed_shards()
        pending = sorted(set(shard_sizes) - set(done_before))
        summary = JobSummary(output_url=spec.output.url, shards_total=len(shard_sizes), shards_done_before=len(done_before))
        if not pending:
            summary.nothing_to_do = True
            say(f"nothing to do: all {len(shard_sizes)} shards in {spec.output.url} are already committed")
        else:
            say(f"{plan.num_rows} images in {len(shard_sizes)} shards; {len(done_before)} already committed, {len(pending)} to do")
            job = _Job(spec, taxonomy, checkpoint_hash, fingerprint, store, shard_sizes, say)
            job.label(ray.put(text_features.numpy()), plan, pending, started)
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
        store: OutputStore,
        shard_sizes: dict[str, int],
        say: Callable[[str], None],
    ) -> None:
        self.spec = spec
        self.taxonomy = taxonomy
        self.checkpoint_hash = checkpoint_hash
        self.fingerprint = fingerprint
        self.store = store
        self.shard_sizes = shard_sizes
        self.say = say

    def dataset(self, text_ref: ray.ObjectRef, plan: pa.Table, pending: list[str]) -> ray.data.Dataset:
        spec = self.spec
        ds = decoded_images(plan.filter(pc.is_in(plan.column("shard_id"), pa.array(pending))), spec.input)
        ds = ds.map_batches(
            SEDInference,
            fn_constructor_kwargs={
                "model": spec.model.model_dump(mode="json"),
                "inference": spec.inference.model_dump(mode="json"),
                "classes": list(self.taxonomy.classes),
                "templates": list(self.taxonomy.templates),
                # Computed once per job; each actor fetches it from the object store.
                "text_features": functools.partial(ray.get, text_ref),
                "checkpoint_hash": self.checkpoint_hash,
            },
            batch_size=spec.inference.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=spec.ray.num_actors),
            num_cpus=spec.ray.cpus_per_actor,
            num_gpus=spec.ray.gpus_per_actor,
        )
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

    def label(self, text_ref: ray.ObjectRef, plan: pa.Table, pending: list[str], started: float) -> None:
        quiet_ray_data()
        metadata = {
            "sed_label.classes": json.dumps(list(self.taxonomy.classes)),
            "sed_label.job_fingerprint": self.fingerprint,
        }
        writers: dict[str, ShardWriter] = {}
        progress = {"shards": 0, "images": 0}
        # No prefetching: Ray Data's iterator then held each block until the next one was done, so
        # a shard whose block was out waited on the job's next block (a slow or stalled read) to commit.
        dataset = self.dataset(text_ref, plan, pending)
        batches = iter(dataset.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=0))
        try:
            for batch in batches:
                self._write(batch, writers, metadata, progress, len(pending), started)
        finally:
            # On an error, stop the dataset's reads and actors now rather than when it is collected.
            close = getattr(batches, "close", None)
            if close is not None:
                close()
        if writers:
            missing = {s: w.expected_rows - w.rows for s, w in writers.items()}
            raise RuntimeError(f"shards ended incomplete (rows missing per shard: {missing}); rerun the job to finish them")

    def _write(
        self,
        batch: pa.Table,
        writers: dict[str, ShardWriter],
        metadata: dict[str, str],
        progress: dict[str, int],
        pending: int,
        started: float,
    ) -> None:
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
                progress["shards"] += 1
                progress["images"] += stats["images"]
                rate = progress["images"] / max(time.monotonic() - started, 1e-9)
                self.say(
                    f"shard {shard} committed: {stats['ok']} ok, {stats['errors']} errors "
                    f"[{progress['shards']}/{pending} shards, {rate:.2f} images/s]"
                )


def _errors_by_reason(store: OutputStore, markers: dict[str, dict[str, Any]]) -> dict[str, int]:
    """Error rows counted by reason (the reason's text up to its first colon)."""
    reasons: dict[str, int] = {}
    for shard, marker in markers.items():
        if not marker["errors"]:
            continue
        table = pq.read_table(pa.BufferReader(store.read_bytes(marker["files"][0])), columns=["error"])
        errors = table.column("error").drop_null().to_pylist()
        for message in errors:
            reason = message.split(":", 1)[0]
            reasons[reason] = reasons.get(reason, 0) + 1
    return dict(sorted(reasons.items(), key=lambda item: -item[1]))


def merge_coco(store: OutputStore, classes: tuple[str, ...] | list[str], shards: list[str]) -> None:
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

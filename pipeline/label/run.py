"""The labelling job on Ray Data.

    plan (listed once, saved) -> pending shards -> read + decode (CPU tasks)
      -> SED (actor pool: one model per actor, text embeddings computed once per job)
      -> RLE encoding, PNG label maps written (CPU tasks) -> shard files and commit markers

Rows stream through Ray Data with bounded memory. The driver holds only the rows of shards that
are not complete yet (RLE strings and statistics: no pixels) and writes each complete shard's two
files and its marker from a few threads, so no storage request stops it: per image it does a few
microseconds of bookkeeping, not a request. The files that grow with the images (PNG label maps)
are written by the encode tasks, across the cluster.

A job's start lists the committed markers once (no marker is read); its end reads them many at a
time, and the merged COCO file is built by a task (`output.merge_coco`). A shard with failures
that are not its images' waits for the error breaker's judgment before its commit (`breaker.py`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from schemas import LABELS_SCHEMA_VERSION, STATUS_OK, JobSpec, error_reason

from ..progress import LogProgress, Progress
from ..ray_stages import connect_ray, encode_taxonomy_once, model_stage, read_stage
from ..sources import list_images, plan_shards
from ..storage import is_process_local
from ..taxonomy import Taxonomy, load_taxonomy
from .breaker import ErrorBreaker, ErrorRateExceeded, is_watched
from .coco import coco_categories
from .commit import COCO_DIR, JOB_FILE, MERGED_COCO_FILE, SUMMARY_FILE, JobConflictError, JobOutput, job_fingerprint, redact
from .duplicates import DuplicateResolver
from .encode import encode_labels
from .registry import RegistryClient, start_registry
from .writers import ShardWriter

# Shards committed at once by the driver's threads (each is three requests: Parquet, COCO, marker).
COMMIT_THREADS = 8
# `output.merge_coco: auto` merges the shards' COCO files into one up to this many images; above
# it the merged file would be gigabytes that most COCO readers load whole (use coco/*.json).
MERGE_COCO_AUTO_MAX_IMAGES = 100_000
COCO_SHARDS_READ_AT_ONCE = 64


@dataclass
class JobSummary:
    output_url: str
    images: int = 0
    ok: int = 0
    errors: int = 0
    duplicates: int = 0
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
                "taxonomy": taxonomy.structure(),
                "prompts": list(taxonomy.prompts),
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
        text_features, checkpoint_hash = encode_taxonomy_once(spec.model, taxonomy, spec.ray, progress)
        store, plan, fingerprint = prepare_output(spec, taxonomy, checkpoint_hash, overwrite, progress)
        counts = pc.value_counts(plan.column("shard_id"))
        shard_sizes = dict(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist()))
        done_before = set(store.committed_shard_ids())
        pending = sorted(set(shard_sizes) - done_before)
        summary = JobSummary(output_url=spec.output.url, shards_total=len(shard_sizes), shards_done_before=len(done_before))
        if not pending:
            summary.nothing_to_do = True
            progress.note(f"nothing to do: all {len(shard_sizes)} shards in {spec.output.url} are already committed")
        else:
            progress.note(
                f"{plan.num_rows} images in {len(shard_sizes)} shards; {len(done_before)} already committed, {len(pending)} to do"
            )
            job = _Job(spec, taxonomy, checkpoint_hash, fingerprint, store, shard_sizes, progress, done_before)
            job.label(text_features, plan, pending)
        markers = store.committed_shards()
        summary.images = sum(m["images"] for m in markers.values())
        summary.ok = sum(m["ok"] for m in markers.values())
        summary.errors = sum(m["errors"] for m in markers.values())
        summary.duplicates = sum(m.get("duplicates", 0) for m in markers.values())
        summary.shards_committed = len(markers) - len(done_before)
        labelled_now = sum(m["images"] for shard, m in markers.items() if shard not in done_before)
        summary.errors_by_reason = _errors_by_reason(store, markers)
        if _merges_coco(spec, plan.num_rows):
            if not summary.nothing_to_do or not store.exists(MERGED_COCO_FILE):
                _merge_coco_in_a_task(store, taxonomy.classes, sorted(markers))
        else:
            store.remove(MERGED_COCO_FILE)  # a merge of an earlier run would no longer match the shards
    finally:
        if owns_ray:
            ray.shutdown()
    summary.seconds = round(time.monotonic() - started, 3)
    summary.images_per_second = round(labelled_now / summary.seconds, 3) if summary.seconds else 0.0
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
        done_before: set[str],
    ) -> None:
        self.spec = spec
        self.taxonomy = taxonomy
        self.checkpoint_hash = checkpoint_hash
        self.fingerprint = fingerprint
        self.store = store
        self.shard_sizes = shard_sizes
        self.progress = progress
        # Exact duplicates (`registry.py`, `duplicates.py`): the shards whose rows the driver holds
        # (a shard joins `committed` before it leaves `live`), and the copies waiting for their originals.
        self.live: dict[str, ShardWriter] = {}
        self.committed = set(done_before)
        self.registry: RegistryClient | None = None
        self.resolver = DuplicateResolver(store, spec.input.shard_size, len(taxonomy.classes), self.live, self.committed)

    def dataset(self, text_features: np.ndarray, plan: pa.Table, pending: list[str]) -> ray.data.Dataset:
        spec = self.spec
        claim = self.registry.claim if self.registry is not None else None
        ds = read_stage(plan.filter(pc.is_in(plan.column("shard_id"), pa.array(pending))), spec.input, fingerprints=True, claim=claim)
        margin_maps = "confidence" in spec.output.formats
        ds = model_stage(ds, spec.model, spec.inference, self.taxonomy, text_features, self.checkpoint_hash, spec.ray, margin_maps=margin_maps)
        return ds.map_batches(
            encode_labels,
            fn_kwargs={
                "num_classes": len(self.taxonomy.classes),
                "taxonomy_hash": self.taxonomy.hash,
                "checkpoint_hash": self.checkpoint_hash,
                "output": {"url": spec.output.url, "storage_options": spec.output.storage_options},
                "formats": tuple(spec.output.formats),
                # Copies of committed rows get their labels in the encode tasks, where those can
                # read the output; otherwise (memory://) the driver gives them.
                "shard_size": None if is_process_local(self.store.fs) else spec.input.shard_size,
            },
            batch_format="numpy",
            num_cpus=0.5,
        )

    def label(self, text_features: np.ndarray, plan: pa.Table, pending: list[str]) -> None:
        metadata = {
            "sed_label.classes": json.dumps(list(self.taxonomy.classes)),
            "sed_label.job_fingerprint": self.fingerprint,
        }
        if self.spec.duplicates.reuse_labels:
            self.registry = start_registry(self.spec.duplicates.registry_actors, self.spec.input.shard_size, self.store, sorted(self.committed))
        try:
            self._label(text_features, plan, pending, metadata)
        finally:
            if self.registry is not None:
                self.registry.close()

    def _label(self, text_features: np.ndarray, plan: pa.Table, pending: list[str], metadata: dict[str, str]) -> None:
        writers: dict[str, ShardWriter] = {}
        breaker = ErrorBreaker(self.spec.error_breaker)
        held: list[tuple[int, ShardWriter]] = []  # (rows seen when it may commit, shard) with watched failures
        self.progress.start(sum(self.shard_sizes[shard] for shard in pending), "images", "labelling")
        # No prefetching: Ray Data's iterator then held each block until the next one was done, so
        # a shard whose block was out waited on the job's next block (a slow or stalled read) to commit.
        dataset = self.dataset(text_features, plan, pending)
        batches = iter(dataset.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=0))
        commits: list[Future] = []
        try:
            self._label_batches(batches, breaker, writers, held, commits, metadata)
        except ErrorRateExceeded as stop:
            failed = [future.exception() for future in commits if future.exception() is not None]
            if failed:  # the pool has finished: a commit that failed meanwhile is told too
                raise ErrorRateExceeded(f"{stop}; besides, a shard's commit failed: {failed[0]}") from failed[0]
            raise
        _raise_failed(commits)  # the pool has finished every commit
        if writers:
            missing = {s: w.expected_rows - w.rows for s, w in writers.items()}
            raise RuntimeError(
                f"shards ended incomplete (rows missing per shard: {missing}; {self.resolver.parked} of them copies whose "
                "original never came); rerun the job to finish them"
            )

    def _label_batches(
        self,
        batches: Any,
        breaker: ErrorBreaker,
        writers: dict[str, ShardWriter],
        held: list[tuple[int, ShardWriter]],
        commits: list[Future],
        metadata: dict[str, str],
    ) -> None:
        """Rows into shard writers; complete shards committed from a pool of threads, or held back
        while the breaker may still stop the job (`breaker.py`)."""
        with ThreadPoolExecutor(COMMIT_THREADS, thread_name_prefix="commit") as committer:

            def commit(writer: ShardWriter) -> None:
                commits.append(committer.submit(self._commit, writer))

            try:
                for batch in batches:
                    breaker.observe(batch)
                    for writer in self._complete_shards(batch, writers, metadata):
                        if breaker.enabled and any(is_watched(reason) for reason in writer.errors_by_reason()):
                            held.append((breaker.rows_seen + breaker.settings.window, writer))
                        else:
                            commit(writer)
                    self._stop_if_tripped(breaker.tripped(), held, writers)
                    while held and held[0][0] <= breaker.rows_seen:
                        commit(held.pop(0)[1])
                    self.progress.advance(batch.num_rows)
                    _raise_failed(commits)
                self._stop_if_tripped(breaker.tripped(final=True), held, writers)
                for _, writer in held:
                    commit(writer)
            finally:
                # On an error, stop the dataset's reads and actors now rather than when it is collected.
                close = getattr(batches, "close", None)
                if close is not None:
                    close()

    def _complete_shards(self, batch: pa.Table, writers: dict[str, ShardWriter], metadata: dict[str, str]) -> list[ShardWriter]:
        """Hand a batch's rows to their shards' writers; return the writers of the shards now complete."""
        complete = []
        batch = self.resolver.resolve(batch)
        for shard in pc.unique(batch.column("shard_id")).to_pylist():
            writer = writers.get(shard)
            if writer is None:
                writer = writers[shard] = self.live[shard] = ShardWriter(
                    self.store, shard, self.shard_sizes[shard], self.spec.output.formats, self.taxonomy.classes, metadata
                )
            writer.add(batch.filter(pc.equal(batch.column("shard_id"), shard)))
            if writer.complete:
                complete.append(writers.pop(shard))
        return complete

    def _stop_if_tripped(self, why: str | None, held: list[tuple[int, ShardWriter]], writers: dict[str, ShardWriter]) -> None:
        if why is None:
            return
        raise ErrorRateExceeded(
            f"job stopped: {why}. {len(held) + len(writers)} shards in progress were left uncommitted, among them "
            f"every shard with such failures in the last {self.spec.error_breaker.window} images: once the cause is "
            "fixed, a rerun labels their images (error_breaker: null would commit such failures as error rows instead)"
        )

    def _commit(self, writer: ShardWriter) -> None:
        stats = writer.commit()
        self.committed.add(writer.shard_id)  # before it leaves `live`: see DuplicateResolver
        del self.live[writer.shard_id]
        if self.registry is not None:
            self.registry.mark_committed([writer.shard_id])
        self.progress.note(f"shard {writer.shard_id} committed: {stats['ok']} ok, {stats['errors']} errors")


def _raise_failed(commits: list[Future]) -> None:
    """Raise the error of a failed commit (the job stops: nothing committed is touched); drop finished ones."""
    done = [future for future in commits if future.done()]
    for future in done:
        commits.remove(future)
        future.result()


def _errors_by_reason(store: JobOutput, markers: dict[str, dict[str, Any]]) -> dict[str, int]:
    """Error rows counted by reason (the reason's text up to its first colon), from the markers."""
    reasons: dict[str, int] = {}
    for marker in markers.values():
        counts = marker.get("errors_by_reason")
        if counts is None and marker["errors"]:  # committed by a version that did not count them
            errors = store.read_labels(marker, columns=["status", "error"])
            counts = Counter(error_reason(e) for e in errors.filter(pc.not_equal(errors.column("status"), STATUS_OK)).column("error").to_pylist())
        for reason, count in (counts or {}).items():
            reasons[reason] = reasons.get(reason, 0) + count
    return dict(sorted(reasons.items(), key=lambda item: -item[1]))


def _merges_coco(spec: JobSpec, images: int) -> bool:
    if "coco" not in spec.output.formats:
        return False
    if spec.output.merge_coco == "auto":
        return images <= MERGE_COCO_AUTO_MAX_IMAGES
    return spec.output.merge_coco


def _merge_coco_in_a_task(store: JobOutput, classes: tuple[str, ...], shards: list[str]) -> None:
    """`merge_coco` in a Ray task, off the driver (here, where only this process sees the storage)."""
    if is_process_local(store.fs):
        merge_coco(store.url, {}, classes, shards, store=store)
        return
    merge = ray.remote(merge_coco).options(num_cpus=1)
    ray.get(merge.remote(store.url, store.storage_options, classes, shards))


def merge_coco(
    url: str, storage_options: dict[str, Any], classes: tuple[str, ...] | list[str], shards: list[str], store: JobOutput | None = None
) -> None:
    """One COCO file for the whole job from the committed shards' files: read many at a time, each
    once, streamed through two local files (images, annotations) into one upload."""
    store = store or JobOutput(url, storage_options)
    with tempfile.TemporaryDirectory() as folder:
        parts = {key: open(os.path.join(folder, key), "w") for key in ("images", "annotations")}
        firsts = dict.fromkeys(parts, True)
        try:
            for start in range(0, len(shards), COCO_SHARDS_READ_AT_ONCE):
                chunk = shards[start : start + COCO_SHARDS_READ_AT_ONCE]
                for data in store.read_many([f"{COCO_DIR}/{shard}.json" for shard in chunk]):
                    document = json.loads(data)
                    for key, out in parts.items():
                        for item in document[key]:
                            out.write(("" if firsts[key] else ", ") + json.dumps(item))
                            firsts[key] = False
        finally:
            for out in parts.values():
                out.close()
        merged = os.path.join(folder, "merged.json")
        with open(merged, "w") as out:
            out.write('{"info": {"description": "sed-label pseudo-labels"}, "categories": ')
            out.write(json.dumps(coco_categories(classes)))
            for key in parts:
                out.write(f', "{key}": [')
                with open(os.path.join(folder, key)) as part:
                    shutil.copyfileobj(part, out)
                out.write("]")
            out.write("}")
        store.upload(MERGED_COCO_FILE, merged)

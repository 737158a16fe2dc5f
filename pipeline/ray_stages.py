"""The Ray plumbing the three Ray jobs share (labelling, evaluation, training).

- `connect_ray`: join a cluster or start an embedded Ray, its own logging kept off the console;
- `encode_text_in_tasks`, `encode_taxonomy_once`: the taxonomy's text embeddings, computed once per
  job by tasks (its classes split over the cluster's CPUs, or one GPU task), so no actor or worker
  runs the text tower again;
- `read_stage`: plan rows -> decoded images (or error rows), read lazily by CPU tasks;
- `model_stage`: SED on an actor pool (`infer.SEDInference`, one model per actor).

The steps themselves (`read.py`, `infer.py`) know nothing of Ray.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import ray

import sed_model
from schemas import InferenceSpec, InputSpec, ModelSpec, RaySpec

from .infer import SEDInference
from .model_loading import encode_taxonomy
from .preflight import PreflightError
from .process import prepare_process
from .progress import Progress
from .read import read_and_decode
from .sources import inline_process_local_bytes
from .taxonomy import Taxonomy

DECODE_BATCH_ROWS = 8  # images decoded per batch: what a read task holds in pixels at once
READ_TASK_MAX_ROWS = 64  # plan rows per read task, at most: fewer tasks keep the driver's memory flat
READ_TASK_MEMORY = 768 * 2**20  # Ray Data measured up to 730 MiB per read task
# A text task loads the whole model: ConvNeXt-B's SED peaked at 1.6 GB loading and encoding (measured).
TEXT_TASK_MEMORY = 2 * 2**30
# Classes per text task, at least: on one thread of a 2-core AMD EPYC, ConvNeXt-B encodes a class's
# 80 prompts in 1.4 s (T=847: about 20 minutes in one task) and builds in 4 s.
TEXT_CLASSES_PER_TASK = 16
Claim = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


def connect_ray(spec: RaySpec) -> bool:
    """Connect to (or start) Ray; True if this call started it and so should shut it down.

    Ray's own progress bars are off: the caller reports progress (`progress.py`). Workers' output
    stays in Ray's session logs instead of being copied to this process's console.
    """
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    # A worker's error (a storage error in an encode task) reaches the driver as itself, so the
    # job stops with its message instead of Ray Data's "UDF failed to process a data block".
    context.raise_original_map_exception = True
    if ray.is_initialized():
        return False
    if spec.address is None:
        # "local": always a new embedded instance, never a cluster that happens to run on this machine.
        ray.init(address="local", num_cpus=spec.num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    else:
        ray.init(address=spec.address, log_to_driver=False)
    return True


def encode_text_in_tasks(encode: Callable[..., Any], calls: list[tuple[Any, ...]], num_gpus: float = 0) -> list[Any]:
    """Run `encode(*args)` (the text tower: a whole model load each) for each `args` of `calls`,
    one task each (one CPU, and `num_gpus`), all at once; return their results in order.

    A checkpoint that cannot be read is a `PreflightError` naming `model.weights`.
    """
    remote = ray.remote(encode).options(num_cpus=1, num_gpus=num_gpus, memory=text_task_memory(ray.nodes()))
    try:
        return ray.get([remote.remote(*args) for args in calls])
    except sed_model.CheckpointError as exc:  # Ray raises the task's error as a subclass of its type
        raise PreflightError(f"model.weights: {getattr(exc, 'cause', exc)}") from None


def text_task_memory(nodes: list[dict[str, Any]]) -> int:
    """The memory a text task asks for: `TEXT_TASK_MEMORY`, or the largest live node's (as
    `ray.nodes()` lists them) if less, since a request no node can meet would wait forever."""
    largest = max((node["Resources"].get("memory", 0) for node in nodes if node["Alive"]), default=0)
    return min(TEXT_TASK_MEMORY, int(largest))


def text_task_slices(classes: int, cpus: int) -> list[tuple[int, int]]:
    """`(first, end)` class ranges for the text tasks: up to one per CPU, each of at least
    `TEXT_CLASSES_PER_TASK` classes (a task loads the whole model before it encodes anything)."""
    tasks = max(1, min(cpus, classes // TEXT_CLASSES_PER_TASK))
    bounds = [round(i * classes / tasks) for i in range(tasks + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def rows_per_read_task(rows: int, cpus: int) -> int:
    """Plan rows per read task: a few tasks per CPU for small jobs, large tasks for large ones.

    Each Ray task leaves about 10 KB in the driver (Ray's bookkeeping, measured), so a job of
    millions of images must not be cut into 8-image tasks; decoding still runs 8 images at a time.
    """
    return max(DECODE_BATCH_ROWS, min(READ_TASK_MAX_ROWS, rows // max(4 * cpus, 1)))


def _decoded_rows_of_task(
    task: pa.Table, plan: ray.ObjectRef | pa.Table, rows_per_task: int, claim: Claim | None = None, **decode_options: Any
) -> Iterator[dict[str, Any]]:
    """The plan rows of the read tasks numbered in `task["id"]`, read and decoded
    `DECODE_BATCH_ROWS` at a time (`read_and_decode`), each decoded batch passed through `claim`
    if given (the labelling job's content registry: one call per registry actor per batch)."""
    prepare_process()
    table = plan if isinstance(plan, pa.Table) else ray.get(plan)
    rows = pa.concat_tables([table.slice(int(i) * rows_per_task, rows_per_task) for i in task.column("id").to_pylist()])
    for start in range(0, rows.num_rows, DECODE_BATCH_ROWS):
        batch = read_and_decode(rows.slice(start, DECODE_BATCH_ROWS), **decode_options)
        yield batch if claim is None else claim(batch)


def read_stage(plan: pa.Table, source: InputSpec, fingerprints: bool = False, claim: Claim | None = None) -> ray.data.Dataset:
    """Plan rows -> decoded images (or error rows), read lazily by CPU tasks.

    The plan goes to the object store once; each read task slices its rows from it, so the
    driver creates no per-block objects up front and its memory stays flat as the job grows.
    `fingerprints` adds each image's `content_hash` and `phash`; `claim` (which needs them) sees
    every decoded batch in the read task (`label/registry.py`).
    """
    plan = inline_process_local_bytes(plan, source)
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    per_task = rows_per_read_task(plan.num_rows, cpus)
    tasks = math.ceil(plan.num_rows / per_task)
    resources = {
        "num_cpus": 1,
        # Room for decoded pixels. Being a different resource request from the actors', it also
        # keeps Ray Data from fusing decoding into the model actors, which only run the model.
        "memory": READ_TASK_MEMORY,
    }
    # One read task per task number (batch_size=1): as two map stages (plan rows, then decoding 8
    # at a time), Ray Data fused them and bundled 8 task numbers per task for the second stage's
    # batch size, so one task read 8 tasks' rows (a 64-image job in one block: its shards all
    # committed at the end).
    return ray.data.range(tasks, override_num_blocks=tasks).map_batches(
        _decoded_rows_of_task,
        fn_kwargs={
            "plan": ray.put(plan),
            "rows_per_task": per_task,
            "claim": claim,
            "fingerprints": fingerprints or claim is not None,
            "image_column": source.image_column,
            "max_pixels": source.max_pixels,
            "storage_options": source.storage_options,
        },
        batch_format="pyarrow",
        batch_size=1,
        **resources,
    )


def model_stage(
    images: ray.data.Dataset,
    model: ModelSpec,
    inference: InferenceSpec,
    taxonomy: Taxonomy,
    text_features: np.ndarray,
    checkpoint_hash: str,
    ray_spec: RaySpec,
    statistics: bool = False,
    margin_maps: bool = False,
) -> ray.data.Dataset:
    """Decoded images -> label maps and per-class statistics in the taxonomy's output classes, by
    SED (scoring its prompts) on an actor pool.

    The prompts' text embeddings go to the object store once; each actor fetches them when it starts.
    `statistics` adds what `sed-label preview` measures, `margin_maps` each image's quantised margin
    map (format `confidence`; `SEDInference`).
    """
    text_ref = ray.put(text_features)
    return images.map_batches(
        SEDInference,
        fn_constructor_kwargs={
            "model": model.model_dump(mode="json"),
            "inference": inference.model_dump(mode="json"),
            "taxonomy": taxonomy,
            "text_features": functools.partial(ray.get, text_ref),
            "checkpoint_hash": checkpoint_hash,
            "statistics": statistics,
            "margin_maps": margin_maps,
        },
        batch_size=inference.batch_size,
        batch_format="numpy",
        compute=_actor_pool(ray_spec),
        num_cpus=ray_spec.cpus_per_actor,
        num_gpus=ray_spec.gpus_per_actor,
    )


def _actor_pool(spec: RaySpec) -> ray.data.ActorPoolStrategy:
    """A fixed pool, or one Ray Data grows towards `max` while blocks wait for an actor (and an
    autoscaling cluster adds nodes for the actors it cannot place) and shrinks when idle."""
    if isinstance(spec.num_actors, int):
        return ray.data.ActorPoolStrategy(size=spec.num_actors)
    return ray.data.ActorPoolStrategy(min_size=spec.num_actors.min, max_size=spec.num_actors.max)


def encode_taxonomy_once(
    model: ModelSpec, taxonomy: Taxonomy, ray_spec: RaySpec | None = None, progress: Progress | None = None
) -> tuple[np.ndarray, str]:
    """The text embeddings `(T, P, D)` of the taxonomy's prompts and the checkpoint hash, computed
    once per job: on one GPU where the job's actors have GPUs (seconds), else by tasks that split
    the classes over the cluster's CPUs (`text_task_slices`; T x 80 prompts through ConvNeXt-B's
    text tower take minutes on one CPU thread). Each class is encoded on its own
    (`sed_model.encode_classes`), so the split changes no embedding. `progress` is told where it runs."""
    num_gpus = min(1.0, ray_spec.gpus_per_actor) if ray_spec is not None else 0
    prompts, templates = list(taxonomy.prompts), list(taxonomy.templates)
    if num_gpus > 0:
        calls = [(model, prompts, templates, "cuda")]
    else:
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        calls = [(model, prompts[first:end], templates, "cpu") for first, end in text_task_slices(len(prompts), cpus)]
    if progress is not None:
        where = "a GPU" if num_gpus > 0 else f"{len(calls)} CPU task{'s' if len(calls) > 1 else ''}"
        progress.note(f"text embeddings of {len(prompts)} prompts x {len(templates)} templates, on {where}")
    parts = encode_text_in_tasks(encode_taxonomy, calls, num_gpus=num_gpus)
    hashes = {checkpoint_hash for _, checkpoint_hash in parts}
    if len(hashes) > 1:
        raise PreflightError(f"model.weights: {model.weights} changed while the taxonomy was encoded (checkpoint hashes {sorted(hashes)})")
    return np.concatenate([text.numpy() for text, _ in parts]), hashes.pop()

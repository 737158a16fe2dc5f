"""Training SED on Ray Train: the paper's recipe (`sed_model.train_step`) in DDP across workers.

    pairs (image, label map) under an fsspec URL -> the paper's augmentation (`augment.py`)
    -> `train_step` on each worker (DDP) -> every `checkpoint_every` iterations and at the end:
       checkpoints/iter_NNNNNNN.safetensors (the project's format: `sed_model.load_checkpoint` and
       the labelling job read it), state.pt (model, optimiser, schedule: what a resumed run needs)
       and metrics.jsonl (losses, lr, gradient norm per iteration)

The data order is a function of (seed, iteration) alone, and training restarts from `state.pt`
whenever it exists, so a run killed at any moment and started again (or a worker group restarted
by Ray Train) continues the same run: same schedule position, same batches. The class texts are
encoded once, by one task, with the frozen text tower.
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
from PIL import Image

import sed_model
from schemas import TrainSpec

from .augment import AugmentSettings, augment
from .commit import OutputStore
from .executor import connect_ray
from .model_loading import encode_taxonomy, load_model
from .sources import IMAGE_EXTENSIONS
from .storage import filesystem, to_url
from .taxonomy import load_taxonomy

log = logging.getLogger("sed_label")

STATE_FILE = "state.pt"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"


class TrainDataError(ValueError):
    """Training data that cannot be used; the message names the file."""


@dataclass
class TrainSummary:
    output_url: str
    iterations: int
    started_at_iteration: int
    checkpoints: list[str]
    first_loss: float | None
    last_loss: float | None
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def list_pairs(spec: TrainSpec) -> list[tuple[str, str]]:
    """(image URL, label map URL) per image under `data.url/images_dir`, sorted; each needs its label."""
    data = spec.data
    fs, root = filesystem(data.url, data.storage_options)
    images_root = posixpath.join(root.rstrip("/"), data.images_dir)
    labels_root = posixpath.join(root.rstrip("/"), data.labels_dir)
    if not fs.isdir(images_root):
        raise TrainDataError(f"data.url: {to_url(fs, images_root)} is not a folder of images")
    labels = {posixpath.splitext(posixpath.basename(p))[0]: p for p in fs.find(labels_root) if p.lower().endswith(".png")}
    pairs = []
    for path in sorted(fs.find(images_root)):
        stem, extension = posixpath.splitext(posixpath.basename(path))
        if extension.lower() not in IMAGE_EXTENSIONS:
            continue
        if stem not in labels:
            raise TrainDataError(f"data: image {to_url(fs, path)} has no label map {data.labels_dir}/{stem}.png")
        pairs.append((to_url(fs, path), to_url(fs, labels[stem])))
    if not pairs:
        raise TrainDataError(f"data.url: no images in {to_url(fs, images_root)}")
    return pairs


def batch_indices(iteration: int, batch_size: int, num_items: int, seed: int) -> list[int]:
    """The dataset indices of iteration `iteration`'s batch: epochs of seeded permutations, in order."""
    indices = []
    for position in range(iteration * batch_size, (iteration + 1) * batch_size):
        epoch, offset = divmod(position, num_items)
        indices.append(int(np.random.default_rng([seed, epoch]).permutation(num_items)[offset]))
    return indices


def _read_pair(image_url: str, label_url: str, storage_options: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    fs, path = filesystem(image_url, storage_options)
    try:
        image = np.asarray(Image.open(io.BytesIO(fs.cat_file(path))).convert("RGB"))
    except Exception as exc:
        raise TrainDataError(f"cannot read image {image_url}: {type(exc).__name__}: {exc}") from exc
    fs, path = filesystem(label_url, storage_options)
    label = np.asarray(Image.open(io.BytesIO(fs.cat_file(path))))
    if label.ndim != 2:
        raise TrainDataError(f"label map {label_url} must be single-channel class ids, got shape {label.shape}")
    if label.shape != image.shape[:2]:
        raise TrainDataError(f"label map {label_url} is {label.shape[::-1]}, its image {image.shape[1::-1]} (width, height)")
    return image, label


def load_batch(
    spec: TrainSpec, pairs: list[tuple[str, str]], iteration: int, rank: int, world: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """This worker's share of iteration `iteration`'s batch: uint8 images `(b, 3, S, S)`, labels `(b, S, S)`."""
    recipe = spec.recipe
    settings = AugmentSettings(recipe.short_edge, recipe.max_long_edge, recipe.crop, recipe.colour, recipe.flip)
    indices = batch_indices(iteration, recipe.batch_size, len(pairs), recipe.seed)
    images, labels = [], []
    for slot in range(rank, recipe.batch_size, world):
        image, label = _read_pair(*pairs[indices[slot]], spec.data.storage_options)
        # Each image's augmentation depends on (seed, iteration, slot) only: resumable, worker-independent.
        image, label = augment(image, label, np.random.default_rng([recipe.seed, iteration, slot]), settings)
        images.append(torch.from_numpy(image).permute(2, 0, 1))
        labels.append(torch.from_numpy(label.astype(np.int64)))
    size = max(i.shape[-2] for i in images), max(i.shape[-1] for i in images)
    if any(i.shape[-2:] != size for i in images):
        raise TrainDataError(f"augmented images differ in size ({[tuple(i.shape[-2:]) for i in images]}); set recipe.crop")
    return torch.stack(images), torch.stack(labels)


def _recipe(spec: TrainSpec) -> sed_model.Recipe:
    r = spec.recipe
    return sed_model.Recipe(r.lr, r.image_tower_lr_multiplier, r.weight_decay, r.iterations, r.clip_grad_norm, r.exclude_ignored)


def checkpoint_name(iteration: int) -> str:
    return f"{CHECKPOINT_DIR}/iter_{iteration:07d}.safetensors"


def _restore(store: OutputStore, model: torch.nn.Module, optimizer: torch.optim.Optimizer, schedule: Any) -> tuple[int, list[dict]]:
    """Load `state.pt` if the output has one; return the iteration to start at and the metrics so far."""
    if not store.exists(STATE_FILE):
        return 0, []
    state = torch.load(io.BytesIO(store.read_bytes(STATE_FILE)), map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    metrics = []
    if store.exists(METRICS_FILE):
        metrics = [json.loads(line) for line in store.read_bytes(METRICS_FILE).decode().splitlines() if line]
    return int(state["iteration"]), [m for m in metrics if m["iteration"] < state["iteration"]]


def _save(store: OutputStore, model: sed_model.SED, optimizer: Any, schedule: Any, iteration: int, metrics: list[dict]) -> None:
    """Checkpoint first, then metrics, then the state that makes a restart continue from here."""
    with tempfile.TemporaryDirectory() as tmp:
        local = f"{tmp}/model.safetensors"
        sed_model.save_checkpoint(model, local)
        store.upload(checkpoint_name(iteration), local)
    store.write(METRICS_FILE, "".join(json.dumps(m) + "\n" for m in metrics).encode())
    buffer = io.BytesIO()
    torch.save({"iteration": iteration, "model": model.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict()}, buffer)
    store.write(STATE_FILE, buffer.getvalue())


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """What each Ray Train worker runs: resume, then iterate; rank 0 writes checkpoints and metrics."""
    spec = TrainSpec.model_validate(config["spec"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    text = torch.from_numpy(ray.get(config["text"])).to(device)
    pairs = config["pairs"]
    store = OutputStore(spec.output.url, spec.output.storage_options)
    torch.manual_seed(spec.recipe.seed)
    model, _ = load_model(spec.model, device)
    recipe = _recipe(spec)
    optimizer = sed_model.build_optimizer(model, recipe)
    schedule = sed_model.build_schedule(optimizer, recipe)
    start, metrics = _restore(store, model, optimizer, schedule)
    trained = ray.train.torch.prepare_model(model, move_to_device=False)  # DDP across the workers
    for iteration in range(start, recipe.iterations):
        images, targets = load_batch(spec, pairs, iteration, rank, world)
        record = sed_model.train_step(trained, images.to(device), targets.to(device), text, optimizer, schedule, recipe)
        record["iteration"] = iteration
        metrics.append(record)
        done = iteration + 1
        if done % spec.output.checkpoint_every == 0 or done == recipe.iterations:
            if rank == 0:
                _save(store, model, optimizer, schedule, done, metrics)
            ray.train.report({"iteration": done, "loss": record["loss"]})


def _fit(spec: TrainSpec, classes: tuple[str, ...], templates: tuple[str, ...], pairs: list[tuple[str, str]]) -> None:
    """Encode the class texts once, then run the workers on Ray Train until the last iteration."""
    owns_ray = connect_ray(spec.ray)
    try:
        encode = ray.remote(encode_taxonomy).options(num_cpus=1)
        text, _ = ray.get(encode.remote(spec.model, list(classes), list(templates)))
        with tempfile.TemporaryDirectory() as ray_storage:
            trainer = ray.train.torch.TorchTrainer(
                train_loop_per_worker,
                train_loop_config={"spec": spec.model_dump(mode="json"), "text": ray.put(text.numpy()), "pairs": pairs},
                scaling_config=ray.train.ScalingConfig(
                    num_workers=spec.scaling.num_workers,
                    use_gpu=spec.scaling.use_gpu,
                    resources_per_worker={"CPU": spec.scaling.cpus_per_worker},
                ),
                # Ray Train's own storage holds only its run records: checkpoints and state go to
                # the output URL, written by rank 0 (see `_save`).
                run_config=ray.train.RunConfig(storage_path=ray_storage, name="sed-train", failure_config=ray.train.FailureConfig(max_failures=3)),
            )
            trainer.fit()
    finally:
        if owns_ray:
            ray.shutdown()


def run_training(spec: TrainSpec) -> TrainSummary:
    """Train (or resume) as the spec says; returns where it started, the checkpoints and the losses.

    A run whose state is already at its last iteration starts nothing.
    """
    started = time.monotonic()
    taxonomy = load_taxonomy(spec.taxonomy)
    pairs = list_pairs(spec)
    store = OutputStore(spec.output.url, spec.output.storage_options)
    start = 0
    if store.exists(STATE_FILE):
        start = int(torch.load(io.BytesIO(store.read_bytes(STATE_FILE)), map_location="cpu", weights_only=True)["iteration"])
    if start < spec.recipe.iterations:
        _fit(spec, taxonomy.classes, taxonomy.templates, pairs)
    metrics = [json.loads(line) for line in store.read_bytes(METRICS_FILE).decode().splitlines() if line]
    fs, root = filesystem(spec.output.url, spec.output.storage_options)
    checkpoints = sorted(to_url(fs, p) for p in fs.glob(posixpath.join(root.rstrip("/"), CHECKPOINT_DIR, "*.safetensors")))
    return TrainSummary(
        output_url=spec.output.url,
        iterations=spec.recipe.iterations,
        started_at_iteration=start,
        checkpoints=checkpoints,
        first_loss=metrics[0]["loss"] if metrics else None,
        last_loss=metrics[-1]["loss"] if metrics else None,
        seconds=round(time.monotonic() - started, 3),
    )

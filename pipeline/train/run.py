"""Training SED on Ray Train: the paper's recipe (`sed_model.train_step`) in DDP across workers.

    labelled images (`data.py`: a folder or a prepared benchmark) -> the paper's augmentation
    -> `train_step` on each worker (DDP; mixed precision on GPU) -> every `validation.every`
    iterations: mIoU on the validation images (`validation.py`, all workers) -> every
    `checkpoint_every` iterations and at the end, written by rank 0:
       checkpoints/iter_NNNNNNN.safetensors (the project's format: `sed_model.load_checkpoint` and
       the labelling job read it), metrics.jsonl (losses averaged over the workers, lr, gradient
       norm, validation metrics), tensorboard/ (the same, when tensorboard is installed) and
       state.pt (model, optimiser, schedule, loss scale: what a resumed run needs)

The data order is a function of (seed, iteration) alone, and training restarts from `state.pt`
whenever it exists, so a run killed at any moment and started again (or a worker group restarted
by the driver) continues the same run: same schedule position, same batches. The class texts are
encoded once, by one task, with the frozen text tower. A resumed run takes all its weights from
`state.pt` and reads neither `model.weights` nor `model.clip_weights` (an offline cluster resumes
a run that started from downloaded OpenCLIP weights).
"""

from __future__ import annotations

import io
import json
import logging
import math
import posixpath
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

import sed_model
from schemas import TrainSpec
from sed_model.checkpoint import load_state_dict_strict

from ..model_loading import encode_taxonomy, load_model, model_config
from ..preflight import preflight_training
from ..process import prepare_process
from ..progress import LogProgress, Progress
from ..ray_stages import connect_ray, encode_text_in_tasks
from ..storage import OutputStore, filesystem, to_url
from ..taxonomy import Taxonomy
from .data import LabelledData, TrainDataError, TrainingInputs, load_batch, training_inputs
from .tensorboard_log import TensorBoardLog
from .validation import validate

log = logging.getLogger("sed_label")

STATE_FILE = "state.pt"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
PRECISION_ORDER = ("float32", "float16", "bfloat16")  # by what a worker's device runs natively
WORKER_GROUP_RESTARTS = 3  # after failures other than the training data's
PROGRESS_POLL_SECONDS = 1.0


@dataclass
class TrainSummary:
    output_url: str
    iterations: int
    started_at_iteration: int
    checkpoints: list[str]
    first_loss: float | None
    last_loss: float | None
    validation: dict[str, Any] | None  # the last evaluation: its iteration and val_* metrics
    validation_miou: list[tuple[int, float]]  # (iterations done, val_mIoU) of every evaluation
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _common_precision(requested: str, device: torch.device, world: int) -> str:
    """Resolve "auto" alike on every worker (the least capable one decides): DDP replicas must agree on
    the loss scaling, or a float16 worker skipping an overflowed step would drift from the others."""
    precision = sed_model.training_precision(requested, device)
    if requested != "auto" or world == 1:
        return precision
    code = torch.tensor([PRECISION_ORDER.index(precision)], device=device)
    dist.all_reduce(code, op=dist.ReduceOp.MIN)
    return PRECISION_ORDER[int(code)]


def _recipe(spec: TrainSpec, device: torch.device, world: int) -> sed_model.Recipe:
    r = spec.recipe
    precision = _common_precision(r.precision, device, world)
    return sed_model.Recipe(r.lr, r.image_tower_lr_multiplier, r.weight_decay, r.iterations, r.clip_grad_norm, r.exclude_ignored, precision)


def checkpoint_name(iteration: int) -> str:
    return f"{CHECKPOINT_DIR}/iter_{iteration:07d}.safetensors"


def _read_metrics(store: OutputStore) -> list[dict[str, Any]]:
    if not store.exists(METRICS_FILE):
        return []
    return [json.loads(line) for line in store.read_bytes(METRICS_FILE).decode().splitlines() if line]


def read_training_state(store: OutputStore) -> dict[str, Any] | None:
    """The output's `state.pt`, or None before the run's first checkpoint."""
    if not store.exists(STATE_FILE):
        return None
    return torch.load(io.BytesIO(store.read_bytes(STATE_FILE)), map_location="cpu", weights_only=True)


def model_to_train(spec: TrainSpec, state: dict[str, Any] | None, device: torch.device | str = "cpu") -> sed_model.SED:
    """The run's model: the spec's starting weights, or resumed, the state's (every parameter).

    Resumed, the starting weights are not read: `state.pt` replaces them all, and the text tower
    is frozen, so the state encodes the classes as the starting weights did.
    """
    if state is None:
        model, _ = load_model(spec.model, device)
        return model
    model = sed_model.build_sed(model_config(spec.model))
    source = f"the training state {spec.output.url.rstrip('/')}/{STATE_FILE} (model.clip_model and image_size must be its run's)"
    load_state_dict_strict(model, state["model"], source=source)
    return model.to(device).eval()  # as `load_model` gives it


def encode_classes_to_train(spec: TrainSpec, prompts: list[str], templates: list[str]) -> torch.Tensor:
    """The embeddings `(T, P, D)` of the taxonomy's prompts (its classes, for a taxonomy without
    groups or distractors), from the state's model if the run is resumed."""
    store = OutputStore(spec.output.url, spec.output.storage_options)
    state = read_training_state(store)
    if state is None:
        text, _ = encode_taxonomy(spec.model, prompts, templates)
        return text
    return model_to_train(spec, state).encode_classes(prompts, templates).cpu()


def restore_training_state(
    store: OutputStore, state: dict[str, Any] | None, optimizer: Any, schedule: Any, scaler: Any
) -> tuple[int, list[dict]]:
    """Load `state` (`read_training_state`) into the optimiser's parts (`model_to_train` has the
    model's); return the iteration to start at and the metrics so far (0 and none without a state)."""
    if state is None:
        return 0, []
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return int(state["iteration"]), [m for m in _read_metrics(store) if m["iteration"] < state["iteration"]]


def save_training_state(store: OutputStore, model: sed_model.SED, optimizer: Any, schedule: Any, scaler: Any, iteration: int, metrics: list[dict]) -> None:
    """Checkpoint first, then metrics, then the state that makes a restart continue from here."""
    with tempfile.TemporaryDirectory() as tmp:
        local = f"{tmp}/model.safetensors"
        sed_model.save_checkpoint(model, local)
        store.upload(checkpoint_name(iteration), local)
    store.write(METRICS_FILE, "".join(json.dumps(_finite(m)) + "\n" for m in metrics).encode())
    state = {"iteration": iteration, "model": model.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict()}
    state["scaler"] = scaler.state_dict() if scaler is not None else {}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    store.write(STATE_FILE, buffer.getvalue())


def _finite(record: dict[str, Any]) -> dict[str, Any]:
    """Standard JSON: an overflowed float16 step's infinite gradient norm is written as null."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}


def _mean_over_workers(record: dict[str, Any], world: int, device: torch.device) -> None:
    """Each worker's losses are of its share of the batch: log their mean, the whole batch's loss."""
    if world == 1:
        return
    names = [name for name in record if name.startswith("loss")]
    values = torch.tensor([record[name] for name in names], dtype=torch.float64, device=device)
    dist.all_reduce(values)
    record.update(zip(names, (values / world).tolist()))


def _due(done: int, every: int, last: int) -> bool:
    return done % every == 0 or done == last


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """What each Ray Train worker runs: resume, then iterate; rank 0 writes checkpoints and metrics."""
    spec = TrainSpec.model_validate(config["spec"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    prepare_process()
    text = torch.from_numpy(ray.get(config["text"])).to(device)  # one row per prompt
    taxonomy: Taxonomy = config["taxonomy"]
    # Prompt groups and distractors: the loss is on the classes the prompts form.
    prompt_class = None if taxonomy.is_flat else torch.tensor(taxonomy.prompt_class, device=device)
    data: LabelledData = config["data"]
    validation: LabelledData | None = config["validation"]
    store = OutputStore(spec.output.url, spec.output.storage_options)
    torch.manual_seed(spec.recipe.seed)
    state = read_training_state(store)
    model = model_to_train(spec, state, device)
    recipe = _recipe(spec, device, world)
    optimizer = sed_model.build_optimizer(model, recipe)
    schedule = sed_model.build_schedule(optimizer, recipe)
    scaler = sed_model.build_grad_scaler(recipe, device)
    start, metrics = restore_training_state(store, state, optimizer, schedule, scaler)
    del state  # the model and optimiser hold copies
    trained = ray.train.torch.prepare_model(model, move_to_device=False)  # DDP across the workers
    board = TensorBoardLog(store, spec.output.tensorboard and rank == 0)
    try:
        for iteration in range(start, recipe.iterations):
            images, targets = load_batch(spec, data, iteration, rank, world)
            record = sed_model.train_step(
                trained, images.to(device), targets.to(device), text, optimizer, schedule, recipe, data.ignore_label, scaler, prompt_class
            )
            _mean_over_workers(record, world, device)
            record["iteration"] = iteration
            done = iteration + 1
            if validation is not None and _due(done, spec.validation.every, recipe.iterations):
                record.update(validate(model, text, taxonomy, validation, spec.validation.top_k, rank, world))
            metrics.append(record)
            board.add(record)
            if rank == 0:
                config["iterations_done"].set.remote(done)  # fire and forget: the driver's progress bar
            if _due(done, spec.output.checkpoint_every, recipe.iterations):
                if rank == 0:
                    save_training_state(store, model, optimizer, schedule, scaler, done, metrics)
                    board.upload()
                ray.train.report({key: value for key, value in record.items() if key != "iteration"} | {"iteration": done})
    finally:
        board.close()


@ray.remote(num_cpus=0)
class IterationCounter:
    """Where the run is, for the driver's progress: rank 0 sets it after each iteration."""

    def __init__(self, done: int) -> None:
        self.done = done

    def set(self, done: int) -> None:
        self.done = done

    def get(self) -> int:
        return self.done


def _follow(counter: ray.actor.ActorHandle, progress: Progress, start: int, stop: threading.Event) -> None:
    """Advance `progress` to the counter's iteration about once a second until `stop` is set."""
    shown = start
    while True:
        stopping = stop.wait(PROGRESS_POLL_SECONDS)
        done = ray.get(counter.get.remote())
        if done > shown:
            progress.advance(done - shown)
            shown = done
        if stopping:
            return


def _fit(spec: TrainSpec, inputs: TrainingInputs, start: int, progress: Progress) -> None:
    """Encode the class texts once, then run the workers on Ray Train until the last iteration."""
    prompts, templates = list(inputs.taxonomy.prompts), list(inputs.taxonomy.templates)
    owns_ray = connect_ray(spec.ray)
    try:
        text = encode_text_in_tasks(encode_classes_to_train, [(spec, prompts, templates)])[0]
        counter = IterationCounter.remote(start)
        config = {
            "spec": spec.model_dump(mode="json"),
            "text": ray.put(text.numpy()),
            "taxonomy": inputs.taxonomy,
            "data": inputs.data,
            "validation": inputs.validation,
            "iterations_done": counter,
        }
        progress.start(spec.recipe.iterations, "iterations", "training")
        progress.advance(start)
        stop = threading.Event()
        follower = threading.Thread(target=_follow, args=(counter, progress, start, stop), daemon=True)
        follower.start()
        try:
            _fit_with_restarts(spec, config)
        finally:
            stop.set()
            follower.join()
    finally:
        if owns_ray:
            ray.shutdown()


def _fit_with_restarts(spec: TrainSpec, config: dict[str, Any]) -> None:
    # A failed worker group is started again here rather than by Ray Train (max_failures=0),
    # so that errors in the training data, which every attempt would meet again, stop the run
    # at once; any other failure gets WORKER_GROUP_RESTARTS new groups, each resuming from state.pt.
    for attempt in range(WORKER_GROUP_RESTARTS + 1):
        try:
            _fit_worker_group(spec, config, attempt)
            return
        except ray.train.WorkerGroupError as exc:
            data_errors = [e for _, e in sorted(exc.worker_failures.items()) if isinstance(e, TrainDataError)]
            if data_errors:
                raise TrainDataError(str(data_errors[0])) from exc
            if attempt == WORKER_GROUP_RESTARTS:
                raise
            log.warning(
                "training workers failed (%s); starting them again from the last state (%d of %d)",
                exc, attempt + 1, WORKER_GROUP_RESTARTS,
            )


def _fit_worker_group(spec: TrainSpec, config: dict[str, Any], attempt: int) -> None:
    with tempfile.TemporaryDirectory() as ray_storage:
        trainer = ray.train.torch.TorchTrainer(
            train_loop_per_worker,
            train_loop_config=config,
            scaling_config=ray.train.ScalingConfig(
                num_workers=spec.scaling.num_workers,
                use_gpu=spec.scaling.use_gpu,
                resources_per_worker={"CPU": spec.scaling.cpus_per_worker},
            ),
            # Ray Train's own storage holds only its run records: checkpoints and state go to
            # the output URL, written by rank 0 (see `save_training_state`).
            run_config=ray.train.RunConfig(
                storage_path=ray_storage, name=f"sed-train-{attempt}", failure_config=ray.train.FailureConfig(max_failures=0)
            ),
        )
        trainer.fit()


def run_training(spec: TrainSpec, progress: Progress | None = None) -> TrainSummary:
    """Train (or resume) as the spec says; returns where it started, the checkpoints, the losses and
    the last validation.

    A run whose state is already at its last iteration starts nothing.
    """
    started = time.monotonic()
    inputs = training_inputs(spec)
    store = OutputStore(spec.output.url, spec.output.storage_options)
    state = read_training_state(store)
    start = 0 if state is None else int(state["iteration"])
    del state
    preflight_training(spec, inputs.taxonomy, resuming=start > 0)
    if start < spec.recipe.iterations:
        _fit(spec, inputs, start, progress or LogProgress())
    metrics = _read_metrics(store)
    evaluations = [m for m in metrics if "val_mIoU" in m]
    last_validation = None
    if evaluations:
        last_validation = {k: v for k, v in evaluations[-1].items() if k == "iteration" or k.startswith("val_")}
    fs, root = filesystem(spec.output.url, spec.output.storage_options)
    checkpoints = sorted(to_url(fs, p) for p in fs.glob(posixpath.join(root.rstrip("/"), CHECKPOINT_DIR, "*.safetensors")))
    return TrainSummary(
        output_url=spec.output.url,
        iterations=spec.recipe.iterations,
        started_at_iteration=start,
        checkpoints=checkpoints,
        first_loss=metrics[0]["loss"] if metrics else None,
        last_loss=metrics[-1]["loss"] if metrics else None,
        validation=last_validation,
        validation_miou=[(m["iteration"] + 1, m["val_mIoU"]) for m in evaluations],
        seconds=round(time.monotonic() - started, 3),
    )

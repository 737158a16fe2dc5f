"""`sed-label train` on Ray Train: two DDP workers on the tiny model, checkpoints, resume, labelling with the result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import sed_model
from pipeline.storage import OutputStore
from pipeline.metrics import SemSegEvaluator
from pipeline.model_loading import encode_taxonomy, load_model
from pipeline.train.tensorboard_log import TensorBoardLog
from pipeline.train.run import (
    STATE_FILE,
    checkpoint_name,
    model_to_train,
    read_training_state,
    restore_training_state,
    run_training,
    save_training_state,
)
from pipeline.train.data import TrainDataError, labelled_data, load_batch
from schemas import TaxonomySpec, TrainSpec
from tests.helpers import TINY_CHECKPOINT

from .processes import local_raylet_pid, pids_titled, run_in_thread, wait_for

# Ray Train runs of several iterations: about 4 minutes in all on 2 cores.
pytestmark = pytest.mark.slow

CLASSES = ["sky", "tree", "road"]
ITERATIONS = 6
VALIDATE_EVERY = 2  # as checkpoints: each evaluation has its weights on disk


def write_pairs(root: Path, count: int = 2, size: int = 64) -> None:
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir(parents=True)
    for i in range(count):
        label = np.zeros((size, size), np.uint8)
        label[size // (2 + 2 * i) :] = 1  # image 1 has less sky and more road than image 0
        label[:, : size // (4 - 2 * i)] = 2
        label[:4, :4] = 255
        colours = np.array([[90, 160, 230], [40, 140, 50], [100, 100, 100]], np.uint8)
        image = colours[np.minimum(label, 2)] + np.random.default_rng(i).integers(0, 20, (size, size, 3), dtype=np.uint8)
        Image.fromarray(image).save(root / "images" / f"img{i}.jpg")
        Image.fromarray(label).save(root / "labels" / f"img{i}.png")


def train_spec(reference: dict, data: Path, output: Path, **recipe) -> TrainSpec:
    return TrainSpec.model_validate(
        {
            "data": {"url": str(data)},
            "taxonomy": {"classes": CLASSES},
            "model": {"clip_model": reference["clip_cfg"], "weights": str(TINY_CHECKPOINT), "image_size": 64},
            "recipe": {"iterations": ITERATIONS, "batch_size": 2, "crop": 64, "short_edge": 64, "colour": False, "flip": False, "lr": 1e-3, **recipe},
            "output": {"url": str(output), "checkpoint_every": 2},
            "validation": {"url": str(data), "every": VALIDATE_EVERY},
            "scaling": {"num_workers": 2},
        }
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory, reference, local_ray):
    root = tmp_path_factory.mktemp("train")
    write_pairs(root / "data")
    spec = train_spec(reference, root / "data", root / "out")
    return spec, run_training(spec)


def test_two_workers_train_and_the_loss_falls(trained):
    spec, summary = trained
    metrics = [json.loads(line) for line in Path(spec.output.url, "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics] == list(range(ITERATIONS))
    assert summary.started_at_iteration == 0
    assert [Path(c).name for c in summary.checkpoints] == [f"iter_{i:07d}.safetensors" for i in (2, 4, 6)]
    losses = [m["loss"] for m in metrics]
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses  # measured: 2.79 -> 2.62
    assert all(m["grad_norm"] > 0 and 0 <= m["lr"] <= 1e-3 for m in metrics)


def test_the_logged_loss_is_the_whole_batchs_not_one_workers(trained, reference):
    """Each worker trains on one of the batch's two images; the logged loss is their mean, which is the
    loss of the whole batch computed in one process with the initial weights."""
    spec, _ = trained
    first = json.loads(Path(spec.output.url, "metrics.jsonl").read_text().splitlines()[0])
    model, _ = load_model(spec.model)
    text, _ = encode_taxonomy(spec.model, CLASSES, list(sed_model.IMAGENET_TEMPLATES))
    images, targets = load_batch(spec, labelled_data(spec.data), iteration=0, rank=0, world=1)
    model.train()
    with torch.no_grad():
        losses = sed_model.sed_loss(model(images, text), targets)
        alone = [float(sum(sed_model.sed_loss(model(images[i : i + 1], text), targets[i : i + 1]).values())) for i in range(2)]
    assert first["loss"] == pytest.approx(float(sum(losses.values())), rel=2e-5)
    assert alone[0] != pytest.approx(first["loss"], rel=2e-5)  # rank 0's own loss would not pass (measured: 10x off)


def evaluate_checkpoint(checkpoint: str, data: Path) -> dict[str, float]:
    """The paper's evaluation protocol, in this process, with the project's evaluator."""
    model, _ = sed_model.create_model(None, checkpoint)
    predictor = sed_model.SEDPredictor(model)
    predictor.set_taxonomy(CLASSES)
    evaluator = SemSegEvaluator(CLASSES)
    for name in ("img0", "img1"):
        image = torch.from_numpy(np.array(Image.open(data / "images" / f"{name}.jpg"))).permute(2, 0, 1)
        evaluator.process(predictor.label_batch([image])[0].labels.numpy(), np.array(Image.open(data / "labels" / f"{name}.png")))
    return evaluator.evaluate()


def test_validation_miou_is_the_evaluators_on_the_weights_of_that_iteration(trained):
    spec, summary = trained
    metrics = [json.loads(line) for line in Path(spec.output.url, "metrics.jsonl").read_text().splitlines()]
    logged = {m["iteration"] + 1: m for m in metrics if "val_mIoU" in m}
    assert list(logged) == [2, 4, 6]
    assert summary.validation["iteration"] + 1 == ITERATIONS and summary.validation["val_images"] == 2
    assert summary.validation_miou == [(done, logged[done]["val_mIoU"]) for done in (2, 4, 6)]
    direct = {done: evaluate_checkpoint(checkpoint, Path(spec.data.url)) for done, checkpoint in zip((2, 4, 6), summary.checkpoints)}
    for done, expected in direct.items():
        # Up to near-ties (each worker labels and encodes the prompts with its own thread count, so
        # oneDNN may round differently): measured 0.01-0.05 apart, while successive evaluations are
        # 10 mIoU apart.
        for name in ("mIoU", "pACC", "mACC", "fwIoU"):
            assert logged[done][f"val_{name}"] == pytest.approx(expected[name], abs=0.1), (done, name)


def test_tensorboard_has_the_losses_and_the_validation(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    spec, _ = trained
    events = EventAccumulator(str(Path(spec.output.url, "tensorboard")))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(ITERATIONS))
    assert [e.step for e in events.Scalars("val/mIoU")] == [1, 3, 5]  # iterations 2, 4, 6 done
    assert {"train/lr", "train/grad_norm", "train/loss_sem_seg_0", "val/pACC"} <= set(events.Tags()["scalars"])


def test_a_training_checkpoint_labels_images(trained, reference):
    spec, summary = trained
    model, info = sed_model.create_model(None, summary.checkpoints[-1])
    assert info is not None and model.config.image_size == 64
    text = model.encode_classes(CLASSES)
    image = torch.from_numpy(np.asarray(Image.open(Path(spec.data.url, "images", "img0.jpg")))).permute(2, 0, 1)
    labels = model.predict_batch([image], text)[0].labels
    assert labels.shape == (64, 64) and set(labels.unique().tolist()) <= {0, 1, 2}


def test_rerunning_a_finished_run_changes_nothing(trained):
    spec, summary = trained
    before = Path(summary.checkpoints[-1]).read_bytes()
    again = run_training(spec)
    assert again.started_at_iteration == ITERATIONS and Path(again.checkpoints[-1]).read_bytes() == before


def test_a_killed_run_resumes_to_the_same_weights(trained, reference, tmp_path):
    """SIGKILL `sed-label train` (its whole process group) after its first checkpoint, run it again:
    the final weights equal the uninterrupted run's. The resumed run reads no starting weights
    (an offline cluster resumes a run begun from downloaded ones): they are gone by then."""
    spec, summary = trained
    starting_weights = tmp_path / "start.pth"
    starting_weights.write_bytes(TINY_CHECKPOINT.read_bytes())
    resumed = train_spec(reference, Path(spec.data.url), tmp_path / "out")
    resumed.model.weights = str(starting_weights)
    spec_file = tmp_path / "train.yaml"
    spec_file.write_text(yaml.safe_dump(resumed.model_dump(mode="json")))
    command = [sys.executable, "-m", "jobs.cli", "train", str(spec_file)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    state = tmp_path / "out" / STATE_FILE
    deadline = time.monotonic() + 300
    while not state.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert state.exists(), "the run wrote no state before the deadline"

    starting_weights.unlink()
    again = run_training(resumed)
    assert 2 <= again.started_at_iteration < ITERATIONS, "the kill must land mid-run"
    assert_same_final_weights(again, summary)


def test_a_killed_worker_costs_a_new_worker_group_from_the_last_state(trained, reference, tmp_path, caplog):
    """SIGKILL one training worker after the first checkpoint: a new worker group resumes from
    state.pt, and the run ends with the uninterrupted run's weights."""
    spec, summary = trained
    again = train_spec(reference, Path(spec.data.url), tmp_path / "out")
    thread, outcome = run_in_thread(run_training, again)
    state = tmp_path / "out" / STATE_FILE
    wait_for(lambda: state.exists() or not thread.is_alive(), "the first state", timeout=300)
    victims = pids_titled(b"ray::RayTrainWorker", raylets={local_raylet_pid()})
    assert state.exists() and victims, outcome.get("error", "the run ended before its first state")
    os.kill(victims[0], signal.SIGKILL)
    thread.join(timeout=600)
    assert "error" not in outcome, outcome.get("error")
    assert "starting them again from the last state (1 of 3)" in caplog.text, "the kill must land mid-run"
    assert_same_final_weights(outcome["result"], summary)


def assert_same_final_weights(summary, expected_summary) -> None:
    expected, _ = sed_model.read_checkpoint(expected_summary.checkpoints[-1])
    actual, _ = sed_model.read_checkpoint(summary.checkpoints[-1])
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=1e-6, msg=name)


def test_checkpoints_state_and_tensorboard_round_trip_through_s3(s3_server, reference):
    """What rank 0 writes (checkpoint, metrics, state, event files) on S3, and a restart reading it back."""
    import s3fs

    bucket = f"train-{time.monotonic_ns()}"
    s3fs.S3FileSystem(**s3_server).mkdir(bucket)
    store = OutputStore(f"s3://{bucket}/run/", s3_server)

    recipe = sed_model.Recipe(lr=1e-3, iterations=10, precision="float16")  # float16: the loss scale is state too

    spec = train_spec(reference, Path("unused"), Path("unused"))

    def fresh(state: dict | None) -> tuple:
        torch.manual_seed(0)
        model = model_to_train(spec, state)
        optimizer = sed_model.build_optimizer(model, recipe)
        return model, optimizer, sed_model.build_schedule(optimizer, recipe), sed_model.build_grad_scaler(recipe, "cpu")

    model, optimizer, schedule, scaler = fresh(None)
    images, targets, text = torch.stack(reference["train_images"]), reference["train_target"], reference["text_features"]
    board = TensorBoardLog(store, enabled=True)
    metrics = []
    for iteration in range(2):
        record = sed_model.train_step(model, images, targets, text, optimizer, schedule, recipe, scaler=scaler)
        metrics.append(record | {"iteration": iteration})
        board.add(metrics[-1])
    save_training_state(store, model, optimizer, schedule, scaler, 2, metrics)
    board.upload()
    board.close()

    state = read_training_state(store)
    restored, restored_optimizer, restored_schedule, restored_scaler = fresh(state)
    start, restored_metrics = restore_training_state(store, state, restored_optimizer, restored_schedule, restored_scaler)
    assert start == 2 and restored_metrics == metrics
    for name, value in model.state_dict().items():
        assert torch.equal(restored.state_dict()[name], value), name
    assert restored_schedule.last_epoch == 2 and restored_scaler.get_scale() == scaler.get_scale()
    assert restored_optimizer.state_dict()["state"].keys() == optimizer.state_dict()["state"].keys()
    checkpoint, _ = sed_model.read_checkpoint(store.url_of(checkpoint_name(2)), storage_options=s3_server)
    assert checkpoint.keys() == model.state_dict().keys()
    assert store.fs.glob(store.path("tensorboard", "events.out.tfevents.*"))


def test_unreadable_training_data_stops_the_run_at_once(reference, tmp_path, local_ray, caplog):
    """An error every attempt would meet again is not retried: the run stops with it, naming the file."""
    write_pairs(tmp_path / "data")
    (tmp_path / "data" / "images" / "img1.jpg").write_bytes(b"not a JPEG")
    spec = train_spec(reference, tmp_path / "data", tmp_path / "out").model_copy(update={"validation": None})
    with pytest.raises(TrainDataError, match=r"cannot read image .*img1\.jpg"):
        run_training(spec)
    assert "starting them again" not in caplog.text


def test_a_grouped_taxonomy_trains_the_classes_its_prompts_form(reference, tmp_path, local_ray):
    """The workers' loss is on the classes: a group's logit is its best prompt's, the distractor is
    left out; the logged first loss equals that loss computed here with the initial weights."""
    write_pairs(tmp_path / "data")
    spec = train_spec(reference, tmp_path / "data", tmp_path / "out", iterations=2)
    grouped = TaxonomySpec(classes=["sky", {"name": "tree", "prompts": ["tree", "bush"]}, "road"], distractors=["wall"])
    spec = spec.model_copy(update={"taxonomy": grouped, "scaling": spec.scaling.model_copy(update={"num_workers": 1})})
    summary = run_training(spec)
    metrics = [json.loads(line) for line in Path(spec.output.url, "metrics.jsonl").read_text().splitlines()]
    model, _ = load_model(spec.model)
    text, _ = encode_taxonomy(spec.model, ["sky", "tree", "bush", "road", "wall"], list(sed_model.IMAGENET_TEMPLATES))
    images, targets = load_batch(spec, labelled_data(spec.data), iteration=0, rank=0, world=1)
    model.train()
    with torch.no_grad():
        logits = [sed_model.class_logits(output, torch.tensor([0, 1, 1, 2, -1]), 3) for output in model(images, text)]
        expected = float(sum(sed_model.sed_loss(logits, targets).values()))
    assert metrics[0]["loss"] == pytest.approx(expected, rel=2e-5)
    assert summary.validation["val_images"] == 2 and 0 <= summary.validation["val_mIoU"] <= 100

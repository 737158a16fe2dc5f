"""`sed-label`: run, validate and submit labelling jobs."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import typer

import sed_model

from pipeline.benchmark import BenchmarkError, BenchmarkSettings, model_from_argument, run_benchmark, save_result, summary_lines
from pipeline.datasets import DATASETS, DatasetError, prepare_dataset
from pipeline.preflight import PreflightError, preflight, preflight_training
from pipeline.report import build_report
from pipeline.report.build import REPORT_HTML, ReportError
from pipeline.run import JobSummary, run_job
from pipeline.storage import StorageError
from pipeline.train import run_training
from pipeline.train_data import TrainDataError, training_inputs
from schemas import ModelSpec, RaySpec

from .spec import SpecError, is_train_spec, load_job_spec, load_train_spec
from .submit import submit_job

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Semantic-segmentation pseudo-labels with SED on Ray.")


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def _print_summary(summary: JobSummary) -> None:
    typer.echo(
        f"{summary.images} images: {summary.ok} ok, {summary.errors} errors; "
        f"{summary.shards_committed} shards committed now, {summary.shards_done_before} before; "
        f"{summary.seconds:.1f} s, {summary.images_per_second:.2f} images/s"
    )
    for reason, count in summary.errors_by_reason.items():
        typer.echo(f"  {count} x {reason}")
    typer.echo(f"outputs: {summary.output_url} (labels/*.parquet, coco/, labels.coco.json, summary.json)")


@app.command()
def run(
    job: Path = typer.Argument(..., help="job spec (YAML)"),
    overwrite: bool = typer.Option(False, help="delete the results already in the output folder and label everything again"),
) -> None:
    """Label every image of the job's input; rerun to finish an interrupted job."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        spec = load_job_spec(job)
        preflight(spec)
        if spec.model.weights is None:
            typer.secho("note: model.weights is null: random weights, so the labels are meaningless (demo)", fg=typer.colors.YELLOW)
        summary = run_job(spec, overwrite=overwrite, progress=typer.echo)
    except (SpecError, PreflightError) as exc:
        _fail(str(exc))
    except Exception as exc:  # the job's own errors (conflicts, storage) end the command with their message
        _fail(f"{type(exc).__name__}: {exc}")
    _print_summary(summary)


@app.command()
def validate(job: Path = typer.Argument(..., help="job spec or training spec (YAML)")) -> None:
    """Check a job spec (or a training spec) and what it points at, without running it."""
    try:
        if is_train_spec(job):
            _validate_training(job)
            return
        spec = load_job_spec(job)
        taxonomy = preflight(spec)
    except (SpecError, PreflightError) as exc:
        _fail(str(exc))
    typer.echo(f"{job}: valid ({len(taxonomy.classes)} classes, model {json.dumps(spec.model.clip_model)[:60]})")


def _validate_training(path: Path) -> None:
    try:
        spec = load_train_spec(path)
        inputs = training_inputs(spec)
        preflight_training(spec, inputs.taxonomy)
    except (TrainDataError, PreflightError, StorageError, sed_model.TaxonomyError) as exc:
        _fail(str(exc))
    validation = f", {len(inputs.validation.items)} validation images" if inputs.validation else ""
    typer.echo(
        f"{path}: valid training spec ({len(inputs.data.items)} training images{validation}, "
        f"{len(inputs.taxonomy.classes)} classes, model {json.dumps(spec.model.clip_model)[:60]})"
    )


@app.command()
def submit(
    job: Path = typer.Argument(..., help="job spec or training spec (YAML)"),
    address: str = typer.Option(..., help="Ray job server, e.g. http://HEAD:8265"),
    wait: bool = typer.Option(False, help="follow the job's logs until it ends"),
    agent_wait: float = typer.Option(120.0, help="seconds to retry while a starting head has no job agent yet"),
) -> None:
    """Submit a labelling job (or a training run: a spec with `data:`) to a Ray cluster through Ray's job submission API."""
    try:
        spec = load_train_spec(job) if is_train_spec(job) else load_job_spec(job)
    except SpecError as exc:
        _fail(str(exc))
    submission_id, status = submit_job(spec, address, wait=wait, echo=typer.echo, agent_wait_seconds=agent_wait)
    typer.echo(f"submitted {submission_id} to {address}: {status}")
    if wait and status != "SUCCEEDED":
        raise typer.Exit(code=1)


def _options(text: str | None, name: str) -> dict:
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        _fail(f"{name} must be a JSON object: {exc}")
    if not isinstance(value, dict):
        _fail(f"{name} must be a JSON object")
    return value


@app.command()
def report(
    output_url: str = typer.Argument(..., help="a job's output folder (any fsspec URL)"),
    ground_truth: str = typer.Option(None, help="folder of label maps named like the images (a/b.jpg -> a/b.png)"),
    legacy_miou: bool = typer.Option(False, help="count classes predicted but absent from the ground truth (IoU 0)"),
    gallery: int = typer.Option(8, min=0, help="images in each gallery"),
    storage_options: str = typer.Option(None, help="fsspec options for the output, as JSON"),
    input_storage_options: str = typer.Option(None, help="fsspec options for re-reading the source images, as JSON"),
    ground_truth_storage_options: str = typer.Option(None, help="fsspec options for the ground truth, as JSON"),
) -> None:
    """Write report.json and a self-contained report.html beside a job's outputs."""
    try:
        result = build_report(
            output_url,
            storage_options=_options(storage_options, "--storage-options"),
            input_storage_options=_options(input_storage_options, "--input-storage-options"),
            ground_truth=ground_truth,
            ground_truth_options=_options(ground_truth_storage_options, "--ground-truth-storage-options"),
            semantics="legacy" if legacy_miou else "detectron2",
            gallery_size=gallery,
        )
    except ReportError as exc:
        _fail(str(exc))
    labels = result["labels"]
    typer.echo(f"{labels['images']} images ({labels['ok']} ok, {labels['errors']} errors) in {result['shards_committed']} shards")
    if "ground_truth" in result and result["ground_truth"].get("metrics"):
        metrics = result["ground_truth"]["metrics"]
        typer.echo(f"ground truth ({result['ground_truth']['images']} images): mIoU {metrics['mIoU']:.2f}, pACC {metrics['pACC']:.2f}")
    typer.echo(f"report: {output_url.rstrip('/')}/{REPORT_HTML}")


@app.command()
def prepare(
    name: str = typer.Argument(..., help=f"the dataset: {', '.join(DATASETS)}"),
    raw_root: str = typer.Argument(..., help="the official download's folder (any fsspec URL); README lists which one"),
    output: str = typer.Option(None, help="where the prepared dataset goes (default: datasets/NAME)"),
    split: str = typer.Option(None, help="coco-stuff-171 only: val2017 (default) or train2017"),
    storage_options: str = typer.Option(None, help="fsspec options for RAW_ROOT, as JSON"),
    output_storage_options: str = typer.Option(None, help="fsspec options for --output, as JSON"),
    limit: int = typer.Option(None, min=1, help="convert only the first N images (a quick check of a download)"),
) -> None:
    """Turn an official benchmark download into label maps exactly as the SED paper prepared them."""
    try:
        prepare_dataset(
            name,
            raw_root,
            output or f"datasets/{name}",
            split=split,
            storage_options=_options(storage_options, "--storage-options"),
            output_storage_options=_options(output_storage_options, "--output-storage-options"),
            limit=limit,
            progress=typer.echo,
        )
    except (DatasetError, StorageError) as exc:
        _fail(str(exc))


@app.command()
def train(spec_file: Path = typer.Argument(..., help="training spec (YAML)")) -> None:
    """Train or fine-tune SED with the paper's recipe on Ray Train; rerun to resume an interrupted run."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        spec = load_train_spec(spec_file)
        summary = run_training(spec)
    except (SpecError, TrainDataError, PreflightError, StorageError) as exc:
        _fail(str(exc))
    except Exception as exc:  # model, checkpoint or Ray failures end the command with their message
        _fail(f"{type(exc).__name__}: {exc}")
    resumed = f" (resumed at iteration {summary.started_at_iteration})" if summary.started_at_iteration else ""
    typer.echo(
        f"trained {summary.iterations} iterations{resumed} in {summary.seconds:.1f} s; "
        f"loss {summary.first_loss:.4f} -> {summary.last_loss:.4f}"
    )
    if summary.validation is not None:
        v = summary.validation
        history = ", ".join(f"{miou:.1f} ({done})" for done, miou in summary.validation_miou)
        typer.echo(f"validation mIoU (after iterations): {history}")
        typer.echo(
            f"last validation, after iteration {v['iteration'] + 1} ({v['val_images']} images): "
            f"mIoU {v['val_mIoU']:.2f}, pACC {v['val_pACC']:.2f}, mACC {v['val_mACC']:.2f}"
        )
    typer.echo(f"checkpoints: {', '.join(summary.checkpoints)}")
    typer.echo(f"metrics: {summary.output_url}/metrics.jsonl")


@app.command("eval")
def evaluate_benchmark(
    dataset: str = typer.Option(..., help=f"the dataset: {', '.join(DATASETS)}"),
    root: str = typer.Option(..., help="the folder `sed-label prepare` wrote (any fsspec URL)"),
    weights: str = typer.Option(..., help="SED checkpoint: the paper's .pth or a .safetensors (any fsspec URL)"),
    model: str = typer.Option("convnext_b", help="convnext_b, convnext_l, or a path to a JSON OpenCLIP config"),
    top_k: int = typer.Option(None, min=1, help="category early rejection (8: the paper's fast rows); default exact"),
    limit: int = typer.Option(None, min=1, help="evaluate only the first N images"),
    output: str = typer.Option(None, help="also write the metrics as JSON here"),
    batch_size: int = typer.Option(4, min=1, help="images per model call"),
    num_actors: int = typer.Option(1, min=1, help="model actors (one SED each)"),
    gpus_per_actor: float = typer.Option(0, min=0),
    device: str = typer.Option("auto", help="auto, cpu or cuda"),
    address: str = typer.Option(None, help="a Ray cluster ('auto', ray://HOST:PORT); default: an embedded local Ray"),
    storage_options: str = typer.Option(None, help="fsspec options for --root, as JSON"),
) -> None:
    """Evaluate SED on a prepared benchmark under the paper's protocol; print mIoU beside the paper's."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        settings = BenchmarkSettings(
            dataset=dataset,
            root=root,
            # Actors may run in another directory: a relative local path means "from here".
            model=ModelSpec(clip_model=model_from_argument(model), weights=weights if "://" in weights else os.path.abspath(weights)),
            top_k=top_k,
            batch_size=batch_size,
            limit=limit,
            device=device,
            ray=RaySpec(address=address, num_actors=num_actors, gpus_per_actor=gpus_per_actor),
            storage_options=_options(storage_options, "--storage-options"),
        )
        result = run_benchmark(settings, progress=typer.echo)
        if output is not None:
            save_result(result, output)
    except (BenchmarkError, DatasetError, StorageError) as exc:
        _fail(str(exc))
    except Exception as exc:  # model, checkpoint or Ray failures end the command with their message
        _fail(f"{type(exc).__name__}: {exc}")
    for line in summary_lines(result):
        typer.echo(line)
    if output is not None:
        typer.echo(f"metrics: {output}")
    if result["errors"]:
        raise typer.Exit(code=1)


if __name__ == "__main__":
    app()

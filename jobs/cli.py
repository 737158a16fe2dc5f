"""`sed-label`: run, validate and submit labelling jobs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import typer

from pipeline.preflight import PreflightError, preflight
from pipeline.report import build_report
from pipeline.report.build import REPORT_HTML, ReportError
from pipeline.run import JobSummary, run_job

from .spec import SpecError, load_job_spec
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
def validate(job: Path = typer.Argument(..., help="job spec (YAML)")) -> None:
    """Check a job spec and what it points at, without running it."""
    try:
        spec = load_job_spec(job)
        taxonomy = preflight(spec)
    except (SpecError, PreflightError) as exc:
        _fail(str(exc))
    typer.echo(f"{job}: valid ({len(taxonomy.classes)} classes, model {json.dumps(spec.model.clip_model)[:60]})")


@app.command()
def submit(
    job: Path = typer.Argument(..., help="job spec (YAML)"),
    address: str = typer.Option(..., help="Ray job server, e.g. http://HEAD:8265"),
    wait: bool = typer.Option(False, help="follow the job's logs until it ends"),
    agent_wait: float = typer.Option(120.0, help="seconds to retry while a starting head has no job agent yet"),
) -> None:
    """Submit the job to a Ray cluster through Ray's job submission API."""
    try:
        spec = load_job_spec(job)
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


if __name__ == "__main__":
    app()

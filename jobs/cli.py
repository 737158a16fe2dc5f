"""`sed-label`: label, evaluate, train, report; validate and submit specs; prepare benchmarks.

Every command prints its reason on one line when it fails (`--debug`: with the traceback); the Ray
commands (`run`, `eval`, `train`) show a progress bar and keep Ray's own output in a log file
(`jobs/console.py`; `--verbose` shows it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

import sed_model
from pipeline.datasets import DATASETS, DatasetError, prepare_dataset
from pipeline.evaluate import BenchmarkError, BenchmarkSettings, model_from_argument, run_benchmark, save_result, summary_lines
from pipeline.label import ErrorRateExceeded, JobConflictError, JobSummary, run_job
from pipeline.preflight import PreflightError, check_writable, preflight, preflight_training
from pipeline.preview import PREVIEW_HTML, PreviewSettings, run_preview
from pipeline.preview.run import DEFAULT_SAMPLE, DEFAULT_SIMILARITY, duration
from pipeline.process import prepare_process
from pipeline.report import REPORT_HTML, ReportError, build_report
from pipeline.review import GROUND_TRUTH_MANIFEST, TRAIN_SPEC, ExportSettings, ImportSettings, ReviewError, Selection, export_review, import_review
from pipeline.sources import InputError
from pipeline.storage import StorageError, filesystem
from pipeline.taxonomy import Taxonomy
from pipeline.train import TrainDataError, run_training, training_inputs
from schemas import JobSpec, ModelSpec, RaySpec

from .console import LIBRARY_LOG_LEVELS, Session, session
from .spec import SpecError, is_train_spec, load_job_spec, load_train_spec
from .submit import submit_job

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Semantic-segmentation pseudo-labels with SED on Ray.")
review_app = typer.Typer(
    no_args_is_help=True, help="Review a job's least certain images in Label Studio or CVAT; bring the corrections back as ground truth."
)
app.add_typer(review_app, name="review")

# Errors of the user's input or environment whose message says everything: no traceback needed.
EXPECTED_ERRORS = (
    SpecError,
    PreflightError,
    JobConflictError,
    ErrorRateExceeded,
    StorageError,
    InputError,
    TrainDataError,
    DatasetError,
    BenchmarkError,
    ReportError,
    ReviewError,
    sed_model.TaxonomyError,
    sed_model.CheckpointError,
)

Debug = Annotated[bool, typer.Option("--debug", help="on failure, print the traceback too")]
Verbose = Annotated[bool, typer.Option("--verbose", help="show Ray's and the libraries' own output on the console")]
LogLevel = Annotated[str, typer.Option(help=f"what the log file keeps: {', '.join(LIBRARY_LOG_LEVELS)}")]


def _check_log_level(level: str) -> None:
    if level.lower() not in LIBRARY_LOG_LEVELS:
        raise typer.BadParameter(f"--log-level must be one of {', '.join(LIBRARY_LOG_LEVELS)}, got {level!r}")


def _load(load: Any, path: Path) -> Any:
    """A spec read and validated, or the command ends with the reason (`SpecError` names the fields)."""
    try:
        return load(path)
    except SpecError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2) from None


def _fail(current: Session, exc: BaseException) -> NoReturn:
    current.fail(exc, expected=isinstance(exc, EXPECTED_ERRORS))
    raise typer.Exit(code=2)


def _options(text: str | None, name: str) -> dict[str, Any]:
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"{name} must be a JSON object: {exc}") from None
    if not isinstance(value, dict):
        raise typer.BadParameter(f"{name} must be a JSON object")
    return value


def _prepare_job(current: Session, spec: JobSpec, check_output: bool = True) -> None:
    """This process's settings, and the job spec checked before any work (`preflight`)."""
    prepare_process()
    preflight(spec, check_output=check_output)
    if spec.model.weights is None:
        current.say("note: model.weights is null: random weights, so the labels are meaningless (demo)")


def _print_summary(summary: JobSummary, log_path: str) -> None:
    typer.echo(
        f"{summary.images} images: {summary.ok} ok, {summary.errors} errors"
        + (f", {summary.duplicates} duplicates (labels reused)" if summary.duplicates else "")
        + "; "
        f"{summary.shards_committed} shards committed now, {summary.shards_done_before} before; "
        f"{summary.seconds:.1f} s, {summary.images_per_second:.2f} images/s"
    )
    for reason, count in summary.errors_by_reason.items():
        typer.echo(f"  {count} x {reason}")
    typer.echo(f"outputs: {summary.output_url} (labels/*.parquet, coco/, labels.coco.json, summary.json)")
    typer.echo(f"log: {log_path}")


@app.command()
def run(
    job: Path = typer.Argument(..., help="job spec (YAML)"),
    overwrite: bool = typer.Option(False, help="delete the results already in the output folder and label everything again"),
    debug: Debug = False,
    verbose: Verbose = False,
    log_level: LogLevel = "info",
) -> None:
    """Label every image of the job's input; rerun to finish an interrupted job."""
    _check_log_level(log_level)
    spec = _load(load_job_spec, job)
    with session("run", spec.output.url, spec.output.storage_options, verbose, debug, log_level) as current:
        try:
            _prepare_job(current, spec)
            summary = run_job(spec, overwrite=overwrite, progress=current.progress)
        except Exception as exc:
            _fail(current, exc)
        current.progress.close()
        _print_summary(summary, current.log_path)


@app.command()
def preview(
    job: Path = typer.Argument(..., help="job spec (YAML)"),
    sample: int = typer.Option(DEFAULT_SAMPLE, min=1, help="images to label, spread evenly over the input's listing"),
    output: str = typer.Option("preview", help="folder (any fsspec URL) for preview.json and preview.html; never the job's output"),
    gpu_hour_cost: float = typer.Option(None, min=0, help="price of one GPU hour, for the cost of the whole job"),
    similarity: float = typer.Option(DEFAULT_SIMILARITY, min=0, max=1, help="flag prompts of different classes whose text embeddings' cosine is at least this"),
    debug: Debug = False,
    verbose: Verbose = False,
    log_level: LogLevel = "info",
) -> None:
    """Label a sample of a job's input on its model and hardware: classes, confusable prompts, early
    rejection, speed and cost of the whole job. Nothing is written to the job's output."""
    _check_log_level(log_level)
    spec = _load(load_job_spec, job)
    output_url = output if "://" in output else str(Path(output).resolve())
    if _overlaps(output_url, spec.output.url, spec.output.storage_options):
        raise typer.BadParameter(f"--output {output!r} is inside the job's output folder or holds it: a preview never writes there")
    with session("preview", output_url, {}, verbose, debug, log_level) as current:
        try:
            _prepare_job(current, spec, check_output=False)
            check_writable("--output", output_url, {})
            settings = PreviewSettings(sample=sample, similarity=similarity, gpu_hour_cost=gpu_hour_cost)
            result = run_preview(spec, output_url, settings, progress=current.progress)
        except Exception as exc:
            _fail(current, exc)
        current.progress.close()
    for line in preview_lines(result):
        typer.echo(line)
    typer.echo(f"preview: {output_url.rstrip('/')}/{PREVIEW_HTML}")
    typer.echo(f"log: {current.log_path}")


def _overlaps(url: str, other: str, other_options: dict[str, Any]) -> bool:
    """Whether two folders are the same storage's and one holds the other (or they are one)."""
    fs, path = filesystem(url, {})
    other_fs, other_path = filesystem(other, other_options)
    if fs.protocol != other_fs.protocol:
        return False
    a, b = path.rstrip("/") + "/", other_path.rstrip("/") + "/"
    return a.startswith(b) or b.startswith(a)


def preview_lines(result: dict[str, Any]) -> list[str]:
    """What a person reads first: the classes never predicted, the likely confusions, speed and cost."""
    sample = result["sample"]
    lines = [f"{sample['images']} of {sample['of']} images labelled ({sample['ok']} ok)"]
    for reason, count in sample["errors_by_reason"].items():
        lines.append(f"  {count} x {reason}")
    if result["never_predicted"]:
        lines.append(f"never predicted on the sample: {', '.join(result['never_predicted'])}")
    lines.append(f"distractor pixels {result['distractor_share'] * 100:.1f} %, below min_confidence {result['unlabeled_share'] * 100:.1f} %")
    for pair in result["similar_prompts"]["pairs"][:5]:
        lines.append(f"similar prompts: {_prompt(pair, 'a')} ~ {_prompt(pair, 'b')}, cosine {pair['cosine']:.3f}")
    for pair in result["runner_up"][:5]:
        lines.append(f"runner-up: {_prompt(pair, 'b')} second to {_prompt(pair, 'a')} on {pair['share'] * 100:.1f} % of its pixels")
    speed, estimate = result["speed"], result["estimate"]
    lines.append(f"model: {speed['images_per_second_per_actor']:.2f} images/s per actor on this hardware")
    for row in estimate["per_actors"]:
        if row["configured"] or row["actors"] in (1, 8, 64):
            cost = f", {row['gpu_hours']:.1f} GPU hours" if speed["gpus_per_actor"] and row["gpu_hours"] is not None else ""
            cost += f", cost {row['cost']:.2f}" if row["cost"] is not None and speed["gpus_per_actor"] else ""
            actors = f"{row['actors']} actor{'s' if row['actors'] > 1 else ''}{' (the spec)' if row['configured'] else ''}"
            lines.append(f"  {estimate['input_images']} images with {actors}: {duration(row['hours'])}{cost}")
    return lines


def _prompt(pair: dict[str, str], side: str) -> str:
    prompt, owner = pair[f"prompt_{side}"], pair[f"class_{side}"]
    return repr(prompt) if prompt == owner else f"{prompt!r} ({owner})"



@app.command()
def validate(job: Path = typer.Argument(..., help="job spec or training spec (YAML)"), debug: Debug = False) -> None:
    """Check a job spec (or a training spec) and what it points at, without running it."""
    with session("validate", debug=debug, log_file=False) as current:
        try:
            if is_train_spec(job):
                spec = load_train_spec(job)
                inputs = training_inputs(spec)
                preflight_training(spec, inputs.taxonomy)
                validation = f", {len(inputs.validation.items)} validation images" if inputs.validation else ""
                typer.echo(
                    f"{job}: valid training spec ({len(inputs.data.items)} training images{validation}, "
                    f"{len(inputs.taxonomy.classes)} classes, model {json.dumps(spec.model.clip_model)[:60]})"
                )
                return
            spec = load_job_spec(job)
            taxonomy = preflight(spec)
        except Exception as exc:
            _fail(current, exc)
        typer.echo(f"{job}: valid ({_taxonomy_summary(taxonomy)}, model {json.dumps(spec.model.clip_model)[:60]})")
        for line in _taxonomy_structure(taxonomy):
            typer.echo(line)


def _taxonomy_summary(taxonomy: Taxonomy) -> str:
    if taxonomy.is_flat:
        return f"{len(taxonomy.classes)} classes"
    return f"{len(taxonomy.classes)} classes from {len(taxonomy.prompts) - len(taxonomy.distractors)} prompts, {len(taxonomy.distractors)} distractors"


def _taxonomy_structure(taxonomy: Taxonomy) -> list[str]:
    """The classes with several prompts, and the distractors: what the model scores apart."""
    lines = []
    for index, name in enumerate(taxonomy.classes):
        prompts = taxonomy.class_prompts(index)
        if prompts != (name,):
            lines.append(f"  class {index} {name!r}: prompts {', '.join(repr(p) for p in prompts)}")
    if taxonomy.distractors:
        lines.append(f"  distractors (unlabeled): {', '.join(repr(p) for p in taxonomy.distractors)}")
    return lines


@app.command()
def submit(
    job: Path = typer.Argument(..., help="job spec or training spec (YAML)"),
    address: str = typer.Option(..., help="Ray job server, e.g. http://HEAD:8265"),
    wait: bool = typer.Option(False, help="follow the job's logs until it ends"),
    agent_wait: float = typer.Option(120.0, help="seconds to retry while a starting head has no job agent yet"),
    debug: Debug = False,
) -> None:
    """Submit a labelling job (or a training run: a spec with `data:`) to a Ray cluster through Ray's job submission API."""
    with session("submit", debug=debug, log_file=False) as current:
        try:
            spec = load_train_spec(job) if is_train_spec(job) else load_job_spec(job)
            submission_id, status = submit_job(spec, address, wait=wait, echo=typer.echo, agent_wait_seconds=agent_wait)
        except Exception as exc:
            _fail(current, exc)
    typer.echo(f"submitted {submission_id} to {address}: {status}")
    if wait and status != "SUCCEEDED":
        raise typer.Exit(code=1)


@app.command()
def report(
    output_url: str = typer.Argument(..., help="a job's output folder (any fsspec URL)"),
    ground_truth: str = typer.Option(None, help="folder of label maps named like the images (a/b.jpg -> a/b.png)"),
    legacy_miou: bool = typer.Option(False, help="count classes predicted but absent from the ground truth (IoU 0)"),
    gallery: int = typer.Option(8, min=0, help="images in each gallery"),
    storage_options: str = typer.Option(None, help="fsspec options for the output, as JSON"),
    input_storage_options: str = typer.Option(None, help="fsspec options for re-reading the source images, as JSON"),
    ground_truth_storage_options: str = typer.Option(None, help="fsspec options for the ground truth, as JSON"),
    debug: Debug = False,
) -> None:
    """Write report.json and a self-contained report.html beside a job's outputs."""
    options = _options(storage_options, "--storage-options")
    with session("report", output_url, options, debug=debug) as current:
        try:
            prepare_process()
            result = build_report(
                output_url,
                storage_options=options,
                input_storage_options=_options(input_storage_options, "--input-storage-options"),
                ground_truth=ground_truth,
                ground_truth_options=_options(ground_truth_storage_options, "--ground-truth-storage-options"),
                semantics="legacy" if legacy_miou else "detectron2",
                gallery_size=gallery,
            )
        except Exception as exc:
            _fail(current, exc)
    labels = result["labels"]
    typer.echo(f"{labels['images']} images ({labels['ok']} ok, {labels['errors']} errors) in {result['shards_committed']} shards")
    if "ground_truth" in result and result["ground_truth"].get("metrics"):
        metrics = result["ground_truth"]["metrics"]
        typer.echo(f"ground truth ({result['ground_truth']['images']} images): mIoU {metrics['mIoU']:.2f}, pACC {metrics['pACC']:.2f}")
    typer.echo(f"report: {output_url.rstrip('/')}/{REPORT_HTML}")


@review_app.command("export")
def review_export(
    output_url: str = typer.Argument(..., help="a finished (or partly finished) job's output folder"),
    to: str = typer.Option(..., "--to", help="label-studio or cvat"),
    select: str = typer.Option("least-confident:200", help="least-confident:N, random:N or ids:FILE (one image id per line)"),
    dest: str = typer.Option(..., help="folder (any fsspec URL) for the tool's files"),
    copy_images: bool = typer.Option(False, help="copy the chosen images into DEST/images/ (needed for images in tar or Parquet files)"),
    local_files_root: str = typer.Option(None, help="Label Studio's LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT, for local images"),
    seed: int = typer.Option(0, help="seed of random:N"),
    storage_options: str = typer.Option(None, help="fsspec options for the job's output, as JSON"),
    input_storage_options: str = typer.Option(None, help="fsspec options for reading the source images, as JSON"),
    dest_storage_options: str = typer.Option(None, help="fsspec options for DEST, as JSON"),
    debug: Debug = False,
) -> None:
    """Pre-annotations of a job's chosen images for Label Studio or CVAT (docs/review.md)."""
    options = _options(storage_options, "--storage-options")
    with session("review export", debug=debug, log_file=False) as current:
        try:
            settings = ExportSettings(
                to, Selection.parse(select, seed), dest, _options(dest_storage_options, "--dest-storage-options"),
                _options(input_storage_options, "--input-storage-options"), copy_images, local_files_root,
            )
            manifest = export_review(output_url, options, settings)
        except Exception as exc:
            _fail(current, exc)
    margins = [image["mean_margin"] for image in manifest["images"] if image["mean_margin"] is not None]
    spread = f"; mean margin {min(margins):.3f} to {max(margins):.3f}" if margins else ""
    typer.echo(f"{len(manifest['images'])} images ({manifest['selection']}) exported for {to}{spread}")
    for note in manifest["notes"]:
        typer.echo(f"note: {note}")
    files = "label_config.xml, project.json, tasks.json" if to == "label-studio" else "annotations.xml"
    typer.echo(f"files: {dest.rstrip('/')}/ ({files}, review.json); next steps: docs/review.md")


@review_app.command("import")
def review_import(
    export: str = typer.Argument(..., help="the tool's export (any fsspec URL): Label Studio's JSON export, or CVAT's Segmentation mask 1.1 zip or folder"),
    from_: str = typer.Option(..., "--from", help="label-studio or cvat"),
    job: str = typer.Option(..., help="the job's output folder the review was exported from"),
    output: str = typer.Option(..., help="folder (any fsspec URL) for the ground truth: labels/, images/, train.yaml, review.json"),
    unpainted: str = typer.Option("ignore", help="what unpainted pixels become: ignore (unlabeled) or a class name"),
    reviewer: str = typer.Option(None, help="who reviewed (CVAT's exports do not say)"),
    storage_options: str = typer.Option(None, help="fsspec options for the job's output, as JSON"),
    input_storage_options: str = typer.Option(None, help="fsspec options for reading the source images, as JSON"),
    output_storage_options: str = typer.Option(None, help="fsspec options for --output, as JSON"),
    export_storage_options: str = typer.Option(None, help="fsspec options for reading EXPORT, as JSON"),
    debug: Debug = False,
) -> None:
    """Corrections from Label Studio or CVAT -> ground-truth label maps, images and a fine-tuning spec."""
    with session("review import", debug=debug, log_file=False) as current:
        try:
            settings = ImportSettings(
                from_, job, output, _options(storage_options, "--storage-options"), _options(output_storage_options, "--output-storage-options"),
                _options(input_storage_options, "--input-storage-options"), unpainted, reviewer,
                _options(export_storage_options, "--export-storage-options"),
            )
            if _overlaps(output, job, settings.job_storage_options):
                raise ReviewError(f"--output {output} is inside the job's output {job}: give a folder of its own")
            manifest = import_review(export, settings)
        except Exception as exc:
            _fail(current, exc)
    images = manifest["images"]
    overlaps = sum(image["overlap_pixels"] for image in images)
    typer.echo(f"{len(images)} reviewed images imported from {from_}" + (f"; {overlaps} pixels painted twice (the later region kept)" if overlaps else ""))
    if manifest.get("tasks_not_annotated"):
        typer.echo(f"{len(manifest['tasks_not_annotated'])} tasks had no annotation and were left out")
    root = output.rstrip("/")
    typer.echo(f"ground truth: {root}/labels/ (with images/ and {GROUND_TRUTH_MANIFEST})")
    typer.echo(f"agreement:  sed-label report {job} --ground-truth {root}/labels")
    typer.echo(f"fine-tune:  sed-label train {root}/{TRAIN_SPEC}")


@app.command()
def prepare(
    name: str = typer.Argument(..., help=f"the dataset: {', '.join(DATASETS)}"),
    raw_root: str = typer.Argument(..., help="the official download's folder (any fsspec URL); docs/evaluation.md lists which one"),
    output: str = typer.Option(None, help="where the prepared dataset goes (default: datasets/NAME)"),
    split: str = typer.Option(None, help="coco-stuff-171 only: val2017 (default) or train2017"),
    storage_options: str = typer.Option(None, help="fsspec options for RAW_ROOT, as JSON"),
    output_storage_options: str = typer.Option(None, help="fsspec options for --output, as JSON"),
    limit: int = typer.Option(None, min=1, help="convert only the first N images (a quick check of a download)"),
    debug: Debug = False,
) -> None:
    """Turn an official benchmark download into label maps exactly as the SED paper prepared them."""
    output = output or f"datasets/{name}"
    output_options = _options(output_storage_options, "--output-storage-options")
    with session("prepare", output, output_options, debug=debug) as current:
        try:
            prepare_dataset(
                name,
                raw_root,
                output,
                split=split,
                storage_options=_options(storage_options, "--storage-options"),
                output_storage_options=output_options,
                limit=limit,
                progress=current.say,
            )
        except Exception as exc:
            _fail(current, exc)


@app.command()
def train(
    spec_file: Path = typer.Argument(..., help="training spec (YAML)"),
    debug: Debug = False,
    verbose: Verbose = False,
    log_level: LogLevel = "info",
) -> None:
    """Train or fine-tune SED with the paper's recipe on Ray Train; rerun to resume an interrupted run."""
    _check_log_level(log_level)
    spec = _load(load_train_spec, spec_file)
    with session("train", spec.output.url, spec.output.storage_options, verbose, debug, log_level) as current:
        try:
            prepare_process()
            summary = run_training(spec, progress=current.progress)
        except Exception as exc:
            _fail(current, exc)
        current.progress.close()
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
        typer.echo(f"log: {current.log_path}")


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
    debug: Debug = False,
    verbose: Verbose = False,
    log_level: LogLevel = "info",
) -> None:
    """Evaluate SED on a prepared benchmark under the paper's protocol; print mIoU beside the paper's."""
    _check_log_level(log_level)
    options = _options(storage_options, "--storage-options")
    with session("eval", verbose=verbose, debug=debug, log_level=log_level) as current:
        try:
            prepare_process()
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
                storage_options=options,
            )
            result = run_benchmark(settings, progress=current.progress)
            if output is not None:
                save_result(result, output)
        except Exception as exc:
            _fail(current, exc)
        current.progress.close()
    for line in summary_lines(result):
        typer.echo(line)
    if output is not None:
        typer.echo(f"metrics: {output}")
    if result["errors"]:
        raise typer.Exit(code=1)


if __name__ == "__main__":
    app()

"""`sed-label report` over a real small job: statistics, agreement with ground truth, escaping."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from jobs.cli import app
from pipeline.label import JobOutput, run_job

from .helpers import assert_self_contained_without_script, image_bytes, label_map_of, read_rows, render_in_chromium, tiny_job

pytestmark = pytest.mark.usefixtures("local_ray")
HOSTILE = "<img src=x onerror=alert(1)>.png"


@pytest.fixture(scope="module")
def job_with_truth(tmp_path_factory, reference, local_ray):
    root = tmp_path_factory.mktemp("report")
    images = root / "images"
    images.mkdir()
    for i in range(5):
        (images / f"street_{i}.png").write_bytes(image_bytes(96 + 8 * i, 72, 20 + i))
    (images / HOSTILE).write_bytes(image_bytes(64, 64, 30))
    (images / "<svg onload=alert('x')>.jpg").write_bytes(b"not an image at all")
    spec = tiny_job(reference, str(images), str(root / "out"), input__shard_size=3)
    run_job(spec)
    rows = read_rows(JobOutput(spec.output.url))
    # Ground truth: the labels themselves for two images, a constant map for one; none for the rest.
    truth = root / "truth"
    truth.mkdir()
    by_id = {r["image_id"]: r for r in rows}
    for name in ("street_0.png", "street_1.png"):
        Image.fromarray(label_map_of(by_id[name]).astype(np.uint8)).save(truth / name)
    constant = np.zeros((by_id["street_2.png"]["height"], by_id["street_2.png"]["width"]), np.uint8)
    Image.fromarray(constant).save(truth / "street_2.png")
    return spec, rows, truth


def test_report_statistics_and_ground_truth(job_with_truth):
    spec, rows, truth = job_with_truth
    result = CliRunner().invoke(app, ["report", spec.output.url, "--ground-truth", str(truth)])
    assert result.exit_code == 0, result.output
    report = json.loads(Path(spec.output.url, "report.json").read_text())
    labels = report["labels"]
    assert labels["images"] == 7 and labels["ok"] == 6 and labels["errors_by_reason"] == {"not an image": 1}
    assert report["complete"] and sum(c["images"] for c in labels["classes"]) == sum(len(r["labels"] or []) for r in rows)
    assert sum(sum(c["mean_prob_histogram"]) for c in labels["classes"]) == sum(len(r["labels"] or []) for r in rows)
    assert sum(labels["kept_classes_per_image"].values()) == 6
    assert abs(sum(c["pixel_share"] for c in labels["classes"]) + labels["unlabeled_share"] - 1) < 1e-9
    gt = report["ground_truth"]
    assert gt["images"] == 3 and len(gt["missing_examples"]) == 3
    # Class 0 is the only ground truth of street_2: its IoU is below 100, every other present class is 100.
    metrics = gt["metrics"]
    assert metrics["pACC"] < 100 and metrics["IoU-" + spec.taxonomy.classes[0]] < 100
    assert "mIoU" in result.output


def test_html_is_self_contained_and_escapes_data(job_with_truth):
    spec, _, truth = job_with_truth
    CliRunner().invoke(app, ["report", spec.output.url])
    html = Path(spec.output.url, "report.html").read_text()
    assert assert_self_contained_without_script(html) >= 6  # the galleries
    assert "&lt;img src=x onerror=alert(1)&gt;.png" in html
    assert "&lt;svg onload=alert(&#39;x&#39;)&gt;.jpg" in html  # in the error table


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_report_renders_in_headless_chromium_without_console_errors(job_with_truth, tmp_path):
    spec, _, _ = job_with_truth
    CliRunner().invoke(app, ["report", spec.output.url])
    dom, console_errors = render_in_chromium(Path(spec.output.url, "report.html"), tmp_path)
    assert "Pseudo-label report" in dom
    assert not console_errors, console_errors

"""`sed-label preview` on the demo job (the module's real local Ray): every section, an estimate
that follows the measured rate, the job's output untouched, a duplicated prompt flagged, and a page
that escapes every string and renders in headless Chromium."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from jobs.cli import app
from tests.helpers import REPO

from .helpers import assert_self_contained_without_script, render_in_chromium

pytestmark = pytest.mark.usefixtures("local_ray")
HOSTILE = "<img src=x onerror=alert(1)>"


@pytest.fixture(scope="module")
def preview(tmp_path_factory):
    root = tmp_path_factory.mktemp("preview")
    spec = yaml.safe_load((REPO / "jobs" / "demo.yaml").read_text())
    spec["input"]["url"] = str(REPO / "jobs" / "demo_images")
    spec["output"]["url"] = str(root / "job-output")
    # "car " is "car" to the tokenizer: the same prompt under two class names.
    spec["taxonomy"] = {"classes": ["sky", "car", {"name": "automobile", "prompts": ["car "]}, HOSTILE], "distractors": ["road, street"]}
    (root / "job.yaml").write_text(yaml.safe_dump(spec))
    command = ["preview", str(root / "job.yaml"), "--output", str(root / "preview"), "--sample", "4", "--gpu-hour-cost", "3", "--similarity", "0.999"]
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 0, result.output
    return root, result.output, json.loads((root / "preview" / "preview.json").read_text())


def test_every_section_and_the_jobs_output_untouched(preview):
    root, output, report = preview
    assert not (root / "job-output").exists()
    assert report["sample"]["images"] == 4 and report["sample"]["of"] == 6 and report["sample"]["ok"] == 4
    assert [c["name"] for c in report["classes"]] == ["sky", "car", "automobile", HOSTILE]
    assert report["classes"][2]["prompts"] == ["car "]
    predicted = [c for c in report["classes"] if c["images"]]
    assert predicted and all(0 < c["mean_confidence"] <= 1 and c["pixel_share"] > 0 for c in predicted)
    assert report["never_predicted"] == [c["name"] for c in report["classes"] if not c["images"]]
    assert sum(c["pixel_share"] for c in report["classes"]) + report["distractor_share"] + report["unlabeled_share"] == pytest.approx(1)
    assert report["runner_up"] and all(p["pixels"] > 0 and 0 < p["share"] <= 1 for p in report["runner_up"])
    rejection = report["early_rejection"]
    assert rejection["top_k"] == 3 and rejection["prompts"] == 5
    assert sum(rejection["kept_per_image"].values()) == 4 == sum(rejection["prompts_winning_pixels_per_image"].values())
    assert "never predicted on the sample" in output or not report["never_predicted"]
    assert "images/s per actor on this hardware" in output and "preview.html" in output


def test_the_estimate_follows_the_measured_rate(preview):
    _, _, report = preview
    rate = report["speed"]["images_per_second_per_actor"]
    assert rate > 0 and report["speed"]["model_seconds"] > 0
    rows = {row["actors"]: row for row in report["estimate"]["per_actors"]}
    assert rows[1]["configured"] and rows[1]["hours"] == pytest.approx(6 / rate / 3600, rel=1e-2)
    assert rows[8]["hours"] == pytest.approx(rows[1]["hours"] / 8)
    assert rows[1]["gpu_hours"] == 0 and rows[1]["cost"] == 0  # the demo's actors use no GPU


def test_a_prompt_under_two_names_is_flagged(preview):
    _, output, report = preview
    pairs = report["similar_prompts"]["pairs"]
    assert report["similar_prompts"]["threshold"] == 0.999
    assert [(p["prompt_a"], p["class_a"], p["prompt_b"], p["class_b"]) for p in pairs] == [("car", "car", "car ", "automobile")]
    assert pairs[0]["cosine"] >= 0.9999
    assert "similar prompts: 'car' ~ 'car ' (automobile)" in output


def test_the_page_escapes_every_string(preview):
    root, _, _ = preview
    html = (root / "preview" / "preview.html").read_text()
    assert assert_self_contained_without_script(html) == 4  # the gallery: the sample's images
    assert "&lt;img src=x onerror=alert(1)&gt;" in html


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_the_page_renders_in_headless_chromium(preview, tmp_path):
    root, _, _ = preview
    dom, console_errors = render_in_chromium(Path(root / "preview" / "preview.html"), tmp_path)
    assert "Preview before the job" in dom and "Runner-up at the sample" in dom
    assert not console_errors, console_errors

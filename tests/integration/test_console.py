"""What a person sees of `sed-label run jobs/demo.yaml`: our lines and a progress bar, no library
noise; Ray's own notices in the job's log file instead."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

from tests.helpers import REPO


def run_demo(tmp_path: Path, *options: str) -> subprocess.CompletedProcess:
    spec = yaml.safe_load((REPO / "jobs" / "demo.yaml").read_text())
    spec["input"]["url"] = str(REPO / "jobs" / "demo_images")
    spec["output"]["url"] = str(tmp_path / "out")
    (tmp_path / "demo.yaml").write_text(yaml.safe_dump(spec))
    command = [sys.executable, "-m", "jobs.cli", "run", str(tmp_path / "demo.yaml"), *options]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)


def test_the_demo_shows_a_progress_bar_and_no_library_noise(tmp_path):
    result = run_demo(tmp_path)
    console = result.stdout + result.stderr
    assert result.returncode == 0, console
    for noise in ("ERROR", "WARNING", "Token authentication", "core_worker", "Progress bars disabled", "Traceback"):
        assert noise not in console, f"{noise!r} on the console:\n{console}"
    # The bar's last frame (a terminal sees it move): count, rate, elapsed and time left.
    assert re.search(r"labelling .*6/6 images \d+\.\d\d images/s \d:\d\d:\d\d left \d:\d\d:\d\d", console), console
    assert "shard 000000 committed: 4 ok, 0 errors" in console
    assert "text embeddings of 6 prompts x 80 templates, on 1 CPU task" in console
    # Ray's own lines went to the log file, which the summary names, inside the output folder.
    log = Path(re.search(r"^log: (.+)$", result.stdout, re.MULTILINE).group(1))
    assert log.parent == tmp_path / "out" / "logs"
    text = log.read_text()
    assert "core_worker" in text or "streaming_executor" in text, text[:2000]


def test_verbose_shows_the_libraries_output(tmp_path):
    result = run_demo(tmp_path, "--verbose")
    assert result.returncode == 0, result.stderr
    assert "streaming_executor" in result.stderr or "core_worker" in result.stderr

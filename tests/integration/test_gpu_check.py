"""`bench/gpu_check.py` keeps working where there is no GPU: `--device cpu` runs every section at
small sizes (the fixtures' parity, the model's speed per batch size, a labelling job against the
bare model loop) and writes its figures."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO


@pytest.mark.slow
def test_gpu_check_runs_on_the_cpu(tmp_path):
    figures = tmp_path / "gpu_check.json"
    command = [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--device", "cpu", "--images", "6", "--repeats", "1", "--json", str(figures)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    report = json.loads(figures.read_text())
    assert report["parity"]["ok"] and report["parity"]["max_abs_diff"] <= 1e-4 and 0.9 < report["parity"]["bfloat16_agreement"] <= 1
    settings = {(row["precision"], row["top_k"], row["batch"]) for row in report["model"]}
    assert settings == {(p, k, b) for p in ("float32", "bfloat16") for k in (None, 8) for b in (1, 2)}
    assert all(row["images_per_second"] > 0 for row in report["model"])
    assert report["job"]["images"] == 6 and report["job"]["job_images_per_second"] > 0 and report["job"]["model_images_per_second"] > 0
    assert "parity: ok" in result.stdout and "job/model" in result.stdout

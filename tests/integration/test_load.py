"""The load benchmark's short version: it runs, loses no row, and reports memory at two sizes.

The full load (5,000 and 20,000 images, about half an hour on 2 cores) is `python bench/job_load.py`.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.helpers import REPO


@pytest.mark.slow
def test_short_load_run_labels_every_image_once_and_reports_memory():
    command = [sys.executable, str(REPO / "bench" / "job_load.py"), "--sizes", "60", "180", "--shard-size", "32", "--batch-size", "8"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]  # non-zero when a row is lost or duplicated
    rows = re.findall(r"^\s+(\d+)\s+([\d.]+)\s+(\d+) \(\s*(\d+)\)\s+(\d+) \(\s*(\d+)\)\s+(\d+)$", result.stdout, re.MULTILINE)
    assert [int(r[0]) for r in rows] == [60, 180], result.stdout
    for images, rate, driver, driver_rss, worker, worker_rss, workers in rows:
        assert float(rate) > 0, result.stdout
        assert 0 < int(driver) <= int(driver_rss) and 0 < int(worker) <= int(worker_rss) and int(worker) <= int(workers), result.stdout
    assert "private memory growth from 60 to 180 images" in result.stdout

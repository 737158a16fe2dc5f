"""Exact duplicates labelled once and near-duplicates reported, in real jobs on a real local Ray.

Every image the model labels is counted by a hook in the Ray workers (`model_calls.py`): across a
job and two resumes, the model sees each distinct content once; every copy has its own row with
its original's labels and `duplicate_of`.
"""

from __future__ import annotations

import io
import json
import os
import signal
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from jobs.cli import app
from pipeline.label import JobOutput, run_job
from pipeline.label.commit import COMMITTED_DIR
from pipeline.label.registry import start_registry
from tests.helpers import REPO

from .helpers import image_bytes, read_rows, tiny_job
from .inference_faults import POISONED_WIDTH
from .model_calls import MODEL_CALLS_ENV
from .processes import local_raylet_pid, pids_titled

MODEL_CALLS = Path(tempfile.gettempdir()) / f"sed-label-test-model-calls-{os.getpid()}.txt"
RAY_CPUS = 4  # two model actors, reads and encoding beside them
RAY_RUNTIME_ENV = {
    "worker_process_setup_hook": "tests.integration.model_calls.count_model_calls",
    "env_vars": {MODEL_CALLS_ENV: str(MODEL_CALLS), "PYTHONPATH": str(REPO)},
}
pytestmark = pytest.mark.usefixtures("local_ray")
LABEL_COLUMNS = ("status", "width", "height", "labels", "unlabeled_area", "distractor_area", "mean_margin", "low_margin_share", "kept_classes")


def reencoded_jpeg(data: bytes) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").save(buffer, format="JPEG", quality=70)
    return buffer.getvalue()


def half_size(data: bytes) -> bytes:
    image = Image.open(io.BytesIO(data))
    buffer = io.BytesIO()
    image.resize((image.width // 2, image.height // 2), Image.LANCZOS).save(buffer, format="PNG")
    return buffer.getvalue()


# Shards of 3 in listing order: 000000 a*, 000001 b*, 000002 c*, 000003 d*. D0..D3 are distinct
# images; every a* image has a byte-identical copy in another shard; d* are near-duplicates.
def collection() -> dict[str, bytes]:
    d0, d1, d2, d3 = (image_bytes(160 + 8 * i, 120, 40 + i) for i in range(4))
    return {
        "a0.png": d0, "a1.png": d1, "a2.png": d2,
        "b0.png": d0, "b1.png": d3, "b2.png": d1,
        "c0.png": d2, "c1.png": d3, "c2.png": d0,
        "d0_reencoded.jpg": reencoded_jpeg(d1), "d1_half.png": half_size(d2),
    }


def model_calls() -> Counter:
    return Counter(MODEL_CALLS.read_text().split()) if MODEL_CALLS.exists() else Counter()


@pytest.fixture(scope="module")
def job(tmp_path_factory, reference, local_ray):
    root = tmp_path_factory.mktemp("duplicates")
    images = root / "images"
    images.mkdir()
    for name, data in collection().items():
        (images / name).write_bytes(data)
    MODEL_CALLS.unlink(missing_ok=True)
    spec = tiny_job(reference, str(images), str(root / "out"), input__shard_size=3, ray={"num_actors": 2, "cpus_per_actor": 0.5})
    summary = run_job(spec)
    yield spec, summary, JobOutput(spec.output.url)
    MODEL_CALLS.unlink(missing_ok=True)


def rows_by_id(store: JobOutput) -> dict[str, dict]:
    return {row["image_id"]: row for row in read_rows(store)}


def assert_copies_carry_their_originals_labels(rows: dict[str, dict]) -> None:
    by_index = {row["image_index"]: row for row in rows.values()}
    by_content: dict[str, list[dict]] = {}
    for row in rows.values():
        assert row["status"] == "ok", row
        by_content.setdefault(row["content_hash"], []).append(row)
    for copies in by_content.values():
        originals = [row for row in copies if row["duplicate_of"] is None]
        assert len(originals) == 1, [row["image_id"] for row in copies]  # one original per content
        for row in copies:
            if row is not originals[0]:
                assert row["duplicate_of"] == originals[0]["image_index"] and by_index[row["duplicate_of"]] is originals[0]
                assert {c: row[c] for c in LABEL_COLUMNS} == {c: originals[0][c] for c in LABEL_COLUMNS}, row["image_id"]
                assert row["model_seconds"] == originals[0]["model_seconds"] > 0  # the time it saved


def test_the_model_labels_each_distinct_content_once(job):
    spec, summary, store = job
    rows = rows_by_id(store)
    assert sorted(rows) == sorted(collection()) and summary.images == 11 and summary.ok == 11
    contents = {row["content_hash"] for row in rows.values()}
    assert len(contents) == 6  # D0..D3, the re-encoded JPEG and the half-size copy
    assert model_calls() == Counter(dict.fromkeys(contents, 1))
    assert summary.duplicates == 5 == sum(row["duplicate_of"] is not None for row in rows.values())
    assert {rows[name]["duplicate_of"] for name in ("b0.png", "c2.png")} == {rows["a0.png"]["image_index"]}
    assert_copies_carry_their_originals_labels(rows)
    png = {p.name.split("_", 1)[1] for p in Path(store.path("png")).rglob("*.png")}
    assert png == {"a0.png", "a1.png", "a2.png", "b1.png", "d0_reencoded.png", "d1_half.png"}  # originals only


def test_a_resume_takes_committed_labels_instead_of_the_model(job):
    spec, _, store = job
    before = rows_by_id(store)
    # Interrupted before the copies' shard committed: its originals are in committed shards.
    os.remove(store.path(COMMITTED_DIR, "000002.json"))
    os.remove(store.path("labels", "000002.parquet"))
    summary = run_job(spec)
    assert summary.shards_committed == 1 and summary.duplicates == 5
    # Interrupted after the copies' shards but before the originals' (its files stay, its marker not):
    # the originals take their labels back from their committed copies.
    os.remove(store.path(COMMITTED_DIR, "000000.json"))
    summary = run_job(spec)
    assert summary.shards_committed == 1 and summary.duplicates == 5
    after = rows_by_id(store)
    assert set(model_calls().values()) == {1} and len(model_calls()) == 6  # no call in either resume
    assert_copies_carry_their_originals_labels(after)
    for name, row in after.items():
        assert {c: row[c] for c in (*LABEL_COLUMNS, "duplicate_of")} == {c: before[name][c] for c in (*LABEL_COLUMNS, "duplicate_of")}, name


def test_the_report_counts_duplicates_and_groups_near_duplicates(job):
    spec, _, store = job
    result = CliRunner().invoke(app, ["report", spec.output.url])
    assert result.exit_code == 0, result.output
    report = json.loads(Path(spec.output.url, "report.json").read_text())
    rows = rows_by_id(store)
    labels = report["labels"]
    assert labels["duplicates"] == 5
    originals = {row["image_index"]: row for row in rows.values() if row["duplicate_of"] is None}
    saved = sum(originals[row["duplicate_of"]]["model_seconds"] for row in rows.values() if row["duplicate_of"] is not None)
    assert labels["model_seconds_saved"] == pytest.approx(saved, abs=1e-3) and saved > 0
    assert labels["model_seconds"] == pytest.approx(sum(row["model_seconds"] for row in originals.values()), abs=1e-3)
    near = report["near_duplicates"]
    members = pd.read_parquet(store.path(near["file"]))
    groups = {frozenset(g.image_id) for _, g in members.groupby("group")}
    assert groups == {
        frozenset({"a0.png", "b0.png", "c2.png"}),
        frozenset({"a1.png", "b2.png", "d0_reencoded.jpg"}),  # with its re-encoded JPEG
        frozenset({"a2.png", "c0.png", "d1_half.png"}),  # with its half-size copy
        frozenset({"b1.png", "c1.png"}),
    }
    assert near["groups"] == 4 and near["images"] == 11 and near["max_hamming_distance"] == 4
    assert sorted(g["images"] for g in near["largest_groups"]) == [2, 3, 3, 3]
    assert "near-duplicate groups" in Path(spec.output.url, "report.html").read_text()


def test_reuse_can_be_turned_off(tmp_path, reference):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a0.png", "b0.png", "c2.png"):
        (images / name).write_bytes(collection()[name])
    calls = sum(model_calls().values())
    spec = tiny_job(reference, str(images), str(tmp_path / "out"), duplicates={"reuse_labels": False})
    summary = run_job(spec)
    rows = read_rows(JobOutput(spec.output.url))
    assert summary.duplicates == 0 and all(row["duplicate_of"] is None for row in rows)
    assert len({row["content_hash"] for row in rows}) == 1 and sum(model_calls().values()) == calls + 3


def test_copies_of_an_image_the_model_fails_on_get_its_error_row(tmp_path, reference):
    """No copy waits forever on an original that fails: it is committed as an error row with the reason."""
    images = tmp_path / "images"
    images.mkdir()
    poisoned = image_bytes(POISONED_WIDTH, 60, 50)
    (images / "a.png").write_bytes(poisoned)
    (images / "b.png").write_bytes(image_bytes(90, 60, 51))
    (images / "c.png").write_bytes(poisoned)
    spec = tiny_job(reference, str(images), str(tmp_path / "out"), input__shard_size=1)
    summary = run_job(spec)
    rows = {row["image_id"]: row for row in read_rows(JobOutput(spec.output.url))}
    assert summary.images == 3 and summary.ok == 1 and summary.duplicates == 1
    assert rows["a.png"]["status"] == "error" and rows["a.png"]["error"].startswith("inference failed")
    copy = rows["c.png"]
    assert copy["status"] == "error" and copy["duplicate_of"] == rows["a.png"]["image_index"]
    assert copy["error"].startswith(rows["a.png"]["error"]) and "(the labelling of image 0, with the same pixels)" in copy["error"]


def test_a_lost_registry_actor_restarts_empty_and_the_claim_in_its_way_is_answered(tmp_path):
    """A registry actor's process killed: Ray restarts it and retries the claim it was sent, and the
    restarted actor knows no hash, so a later copy is its own owner: model time spent again, no row
    lost (a copy already waiting on an owner that then turns out a copy follows it:
    tests/pipeline/label/test_duplicates.py)."""
    client = start_registry(1, 3, JobOutput(str(tmp_path)), [])
    hash_ = "ab" * 16

    def claim(*indices: int) -> list[int]:
        batch = {"image_index": np.array(indices), "content_hash": np.array([hash_] * len(indices), dtype=object)}
        batch["image"] = np.array([b"pixels"] * len(indices), dtype=object)
        return client.claim(batch)["duplicate_of"].tolist()

    try:
        assert claim(0, 5) == [-1, 0]
        (pid,) = pids_titled(b"ray::ContentRegistry", raylets={local_raylet_pid()})
        os.kill(pid, signal.SIGKILL)
        assert claim(9) == [-1]  # answered by the restarted actor, which knows no hash
        assert claim(10) == [9]
    finally:
        client.close()

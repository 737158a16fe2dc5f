"""The job against a real S3-compatible server on loopback (moto server mode, through s3fs)."""

from __future__ import annotations

import json

import pytest

from pipeline.label import JobOutput, run_job
from pipeline.label.commit import JOB_FILE, MERGED_COCO_FILE
from tests.helpers import TINY_CHECKPOINT

from .helpers import read_rows, tiny_job, write_inputs

s3fs = pytest.importorskip("s3fs")
pytestmark = pytest.mark.usefixtures("local_ray")


def test_images_and_weights_from_s3_labels_to_s3(s3_server, tmp_path, reference):
    fs = s3fs.S3FileSystem(**s3_server)
    fs.mkdir("sed-bucket")
    inputs = write_inputs(tmp_path / "images")
    fs.put(str(tmp_path / "images") + "/", "sed-bucket/images/", recursive=True)
    fs.put_file(str(TINY_CHECKPOINT), "sed-bucket/checkpoints/sed_tiny.pth")
    spec = tiny_job(
        reference,
        "s3://sed-bucket/images/",
        "s3://sed-bucket/labels/job-1/",
        input__storage_options=s3_server,
        model__weights="s3://sed-bucket/checkpoints/sed_tiny.pth",
        model__storage_options=s3_server,
        output__storage_options=s3_server,
    )
    summary = run_job(spec)
    assert summary.images == len(inputs) and summary.errors == 4

    store = JobOutput(spec.output.url, spec.output.storage_options)
    rows = read_rows(store)
    assert sorted(r["image_id"] for r in rows) == sorted(inputs)
    assert all(r["source"].startswith("s3://sed-bucket/images/") for r in rows)
    merged = json.loads(store.fs.cat_file(store.path(MERGED_COCO_FILE)))
    assert len(merged["images"]) == summary.ok

    # Credentials from storage_options never reach the outputs.
    secret = s3_server["secret"]
    for path in store.fs.find(store.root):
        assert secret.encode() not in store.fs.cat_file(path), path
    assert set(store.read_json(JOB_FILE)["spec"]["input"]["storage_options"].values()) == {"***"}

    again = run_job(spec)
    assert again.nothing_to_do

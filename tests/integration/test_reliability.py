"""Faults injected into real jobs: a model actor or the driver killed, storage refusing, stalling and denying.

Each job runs on the module's real local Ray; S3 is moto's server behind `FaultProxy`. "Identical
labels" compares every Parquet column but the labelling time and the source URL.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import yaml

from pipeline.label import JobOutput, run_job
from pipeline.label.commit import COMMITTED_DIR
from pipeline.storage import StorageError
from tests.helpers import TINY_CHECKPOINT

from .helpers import free_port, huge_declared_png, image_bytes, label_map_of, read_rows, tiny_job, write_inputs
from .fault_proxy import FaultProxy
from .processes import local_raylet_pid, pids_titled, run_in_thread, wait_for

pytestmark = pytest.mark.usefixtures("local_ray")

VOLATILE_COLUMNS = ("labeled_at", "source", "model_seconds")  # when, from where, how long: not the labels
# The input sorted last, so the last read task's: its held read keeps the job from finishing early.
HELD_IMAGE = b"l_nested.png"
# A held read keeps its task's CPU; with 2 CPUs (one the model actor's) the first read task's rows
# could then not be encoded, and no shard would commit while the read is held.
RAY_CPUS = 4


def comparable(rows: list[dict]) -> dict[str, dict]:
    return {r["image_id"]: {k: v for k, v in r.items() if k not in VOLATILE_COLUMNS} for r in rows}


@pytest.fixture(scope="module")
def undisturbed(tmp_path_factory, reference):
    """The reference run: the module's inputs, one image per shard and per batch, no faults."""
    root = tmp_path_factory.mktemp("undisturbed")
    inputs = write_inputs(root / "images")
    spec = tiny_job(reference, str(root / "images"), str(root / "out"), input__shard_size=1, inference__batch_size=1)
    run_job(spec)
    return inputs, comparable(read_rows(JobOutput(spec.output.url)))


def committed_markers(direct, bucket: str) -> list[str]:
    direct.invalidate_cache()
    return direct.glob(f"{bucket}/out/{COMMITTED_DIR}/*.json")


@pytest.fixture
def s3_job(s3_server, tmp_path, reference):
    """An S3 job whose every request (reads in Ray workers, writes in the driver) goes through a FaultProxy."""
    import s3fs

    endpoint = s3_server["client_kwargs"]["endpoint_url"]
    proxy = FaultProxy(int(endpoint.rsplit(":", 1)[1]))
    direct = s3fs.S3FileSystem(**s3_server)
    bucket = f"faults-{free_port()}"
    direct.mkdir(bucket)
    write_inputs(tmp_path / "images")
    direct.put(str(tmp_path / "images") + "/", f"{bucket}/images/", recursive=True)
    direct.put_file(str(TINY_CHECKPOINT), f"{bucket}/sed_tiny.pth")
    options = {**s3_server, "client_kwargs": {"endpoint_url": proxy.endpoint}}
    spec = tiny_job(
        reference,
        f"s3://{bucket}/images/",
        f"s3://{bucket}/out/",
        input__storage_options=options,
        model__weights=f"s3://{bucket}/sed_tiny.pth",
        model__storage_options=options,
        output__storage_options=options,
        input__shard_size=1,
        inference__batch_size=1,
        ray__num_cpus=RAY_CPUS,  # for a job run by the CLI, which starts its own Ray
    )
    yield spec, proxy, direct, bucket
    proxy.close()


def test_killed_model_actor_costs_a_retry_not_a_row(s3_job, undisturbed, s3_server):
    """SIGKILL the model actor while it holds unfinished rows: Ray restarts it and reruns them.

    The last read task waits on the held image until the actor is frozen (SIGSTOP), so the job is
    mid-way however fast the first shards ran; released, that task's rows go to the frozen actor,
    which is then killed with them in hand.
    """
    spec, proxy, direct, bucket = s3_job
    inputs, expected = undisturbed
    proxy.hold(HELD_IMAGE)
    thread, outcome = run_in_thread(run_job, spec)
    wait_for(lambda: committed_markers(direct, bucket), "the first committed shard")
    wait_for(lambda: proxy.requests_held > 0, "the held image's read")
    victims = pids_titled(b"MapWorker", raylets={local_raylet_pid()})
    assert victims, "no model actor process found"
    try:
        for pid in victims:
            os.kill(pid, signal.SIGSTOP)
        proxy.release()
        # The held read finishes and its task's rows are handed to the frozen actor: about 50 ms
        # when measured here; this leaves a slow machine ample time.
        time.sleep(5)
        assert len(committed_markers(direct, bucket)) < len(inputs), "the kill must land mid-job"
    finally:  # never leave a stopped actor behind
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
    thread.join(timeout=600)
    assert "error" not in outcome, outcome.get("error")
    rows = read_rows(JobOutput(spec.output.url, s3_server))
    assert len(rows) == len(inputs)  # exactly one row per image: nothing lost, nothing twice
    assert comparable(rows) == expected
    assert outcome["result"].images == len(inputs)


@pytest.mark.slow
def test_killed_driver_costs_a_rerun(s3_job, undisturbed, s3_server, tmp_path):
    """Kill the CLI mid-job (SIGKILL to its whole process group, no cleanup), rerun: the same outputs."""
    spec, proxy, direct, bucket = s3_job
    inputs, expected = undisturbed
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    command = [sys.executable, "-m", "jobs.cli", "run", str(spec_file)]
    proxy.hold(HELD_IMAGE)  # the job cannot finish before the kill
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for(lambda: committed_markers(direct, bucket), "the first committed shard")
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    committed_at_kill = len(committed_markers(direct, bucket))
    assert 1 <= committed_at_kill < len(inputs), "the job should have been killed mid-way"

    proxy.release()
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"{len(inputs) - committed_at_kill} shards committed now, {committed_at_kill} before" in result.stdout
    rows = read_rows(JobOutput(spec.output.url, s3_server))
    assert len(rows) == len(inputs) and comparable(rows) == expected
    summary = json.loads(direct.cat_file(f"{bucket}/out/summary.json"))
    assert summary["images"] == len(inputs)


def test_refused_and_stalled_storage_is_retried_and_the_job_completes(s3_job, undisturbed, s3_server, caplog):
    spec, proxy, direct, bucket = s3_job
    inputs, expected = undisturbed
    proxy.hold(HELD_IMAGE)  # the job cannot finish before it has met both faults
    thread, outcome = run_in_thread(run_job, spec)
    wait_for(lambda: committed_markers(direct, bucket), "the first committed shard")
    for fault in ("stall", "refuse"):  # each held for 3 s once the job has met it
        proxy.set(fault)
        wait_for(lambda: proxy.seen[fault] > 0, f"a request meeting {fault!r}")
        time.sleep(3)
    proxy.set("pass")
    proxy.release()
    thread.join(timeout=600)
    assert "error" not in outcome, outcome.get("error")
    assert proxy.seen["refuse"] > 0 and proxy.seen["stall"] > 0, proxy.seen
    rows = read_rows(JobOutput(spec.output.url, s3_server))
    assert len(rows) == len(inputs)
    assert comparable(rows) == expected  # no transient fault became an error row
    # Credentials never reach logs: the driver's, and every Ray process's log files.
    secret = s3_server["secret"]
    assert secret not in caplog.text
    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    for path in logs.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_denied_output_stops_the_job_and_committed_shards_stay(s3_job, undisturbed, s3_server):
    """Writes denied: the next commit fails and the job stops at once. (Denied input reads are
    the error breaker's: `test_error_breaker.py`.)"""
    spec, proxy, direct, bucket = s3_job
    inputs, expected = undisturbed
    endpoint = s3_server["client_kwargs"]["endpoint_url"]
    output_proxy = FaultProxy(int(endpoint.rsplit(":", 1)[1]))
    output_options = {**s3_server, "client_kwargs": {"endpoint_url": output_proxy.endpoint}}
    spec = spec.model_copy(update={"output": spec.output.model_copy(update={"storage_options": output_options})})
    proxy.hold(HELD_IMAGE)  # the held image's shard commits after access is denied
    thread, outcome = run_in_thread(run_job, spec)
    wait_for(lambda: committed_markers(direct, bucket), "the first committed shard")
    output_proxy.set("deny")
    proxy.release()
    thread.join(timeout=300)
    output_proxy.set("pass")
    assert not thread.is_alive(), "the job did not stop within 300 s of access being denied"
    error = outcome.get("error")
    assert isinstance(error, StorageError), outcome
    assert "AccessDenied" in str(error) or "Access Denied" in str(error) or "PermissionError" in str(error), error
    assert f"s3://{bucket}/out/" in str(error)  # names what could not be written

    store = JobOutput(spec.output.url, s3_server)
    committed = store.committed_shards()
    assert 1 <= len(committed) < len(inputs)
    kept = comparable(read_rows(store))
    assert kept and all(kept[image] == expected[image] for image in kept)  # committed shards intact

    summary = run_job(spec)  # access restored: the rerun finishes the job
    output_proxy.close()
    assert summary.shards_done_before == len(committed)
    rows = read_rows(store)
    assert len(rows) == len(inputs) and comparable(rows) == expected


def animated_gif() -> bytes:
    from PIL import Image

    frames = [Image.new("RGB", (40, 30), colour) for colour in ("red", "green", "blue")]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buffer.getvalue()


def test_hostile_inputs_each_get_their_row_and_names_stay_inside_the_output(tmp_path, reference):
    images = tmp_path / "images"
    images.mkdir()
    plain = image_bytes(64, 48, 11)
    hostile = {
        "bomb.png": (huge_declared_png(), "error", "over the limit"),
        "zero.png": (b"", "error", "empty file"),
        "truncated.png": (plain[: len(plain) // 3], "error", "truncated"),
        "notes.jpg": (b"%PDF-1.4 not an image at all", "error", "not an image"),
        "animated.gif": (animated_gif(), "ok", ""),
        "png-named.jpg": (plain, "ok", ""),
        "copy-of-png-named.png": (plain, "ok", ""),
        "ünïcødé 图像 (1).png": (image_bytes(50, 40, 12), "ok", ""),
        "n" * 200 + ".png": (image_bytes(30, 60, 13), "ok", ""),
    }
    for name, (data, _, _) in hostile.items():
        (images / name).write_bytes(data)
    # Parquet ids are free text: path tricks must not leak into output object names.
    ids = ["../../escape", "/etc/passwd", "a/b\\c"]
    table = pa.table({"name": ids, "image": [image_bytes(32, 32, 20 + i) for i in range(3)]})
    pq.write_table(table, images / "table.parquet")
    spec = tiny_job(reference, str(images), str(tmp_path / "out"), input__id_column="name", input__max_pixels=10_000_000)
    summary = run_job(spec)

    rows = {r["image_id"]: r for r in read_rows(JobOutput(spec.output.url))}
    assert sorted(rows) == sorted([*hostile, *ids])
    for name, (_, status, reason) in hostile.items():
        assert rows[name]["status"] == status and reason in (rows[name]["error"] or ""), (name, rows[name]["error"])
    assert all(rows[i]["status"] == "ok" for i in ids)
    # Duplicates: the same labels, up to near-ties that batch neighbours may round differently.
    assert (label_map_of(rows["png-named.jpg"]) == label_map_of(rows["copy-of-png-named.png"])).mean() > 0.999
    assert summary.images == len(rows) and summary.errors == 4
    out = (tmp_path / "out").resolve()
    for path in out.rglob("*"):
        assert path.resolve().is_relative_to(out), path
        assert len(path.name.encode()) <= 255
    assert not (tmp_path / "escape").exists() and not any(out.rglob("passwd*"))

"""The dataset's first stage: plan rows read lazily by Ray tasks, each image decoded exactly once."""

from __future__ import annotations

import fsspec
import pytest

from pipeline.ray_stages import DECODE_BATCH_ROWS, READ_TASK_MAX_ROWS, read_stage, rows_per_read_task
from pipeline.sources import list_images, plan_shards
from schemas import STATUS_ERROR, STATUS_OK, InputSpec
from tests.integration.helpers import image_bytes


def test_read_tasks_are_small_for_small_jobs_and_bounded_for_large_ones():
    assert rows_per_read_task(6, cpus=2) == DECODE_BATCH_ROWS
    assert rows_per_read_task(400, cpus=2) == 50
    assert rows_per_read_task(5_000_000, cpus=2) == READ_TASK_MAX_ROWS
    assert rows_per_read_task(100_000, cpus=10_000) == DECODE_BATCH_ROWS


@pytest.mark.parametrize("url", ["file", "memory"])
def test_every_planned_image_is_decoded_once(local_ray, tmp_path, url):
    root = f"{tmp_path}/images" if url == "file" else "memory://read-stage/images"
    fs = fsspec.filesystem(url)
    fs.makedirs(root, exist_ok=True)
    for i in range(150):
        fs.pipe(f"{root}/{i:04d}.png", image_bytes(16 + i % 7, 12, i))
    fs.pipe(f"{root}/broken.png", b"not an image")
    source = InputSpec(url=root)
    plan = plan_shards(list_images(source), shard_size=40)

    rows = read_stage(plan, source).take_all()

    assert sorted(row["image_index"] for row in rows) == list(range(151))
    by_id = {row["image_id"]: row for row in rows}
    assert by_id["broken.png"]["status"] == STATUS_ERROR
    ok = [row for row in rows if row["status"] == STATUS_OK]
    assert len(ok) == 150
    assert all(row["image"].shape == (12, 16 + int(row["image_id"][:4]) % 7, 3) for row in ok)


def test_each_read_task_streams_its_own_rows(local_ray, tmp_path):
    """One Ray task per read task: never several read tasks' rows in one block (Ray Data once
    fused the stages and bundled 8 read tasks per task, so a small job's images arrived in one
    block and its shards all committed at the end). A task's decoded batches leave it together,
    as one block up to Ray Data's target block size (128 MiB)."""
    for i in range(96):
        (tmp_path / f"{i:04d}.png").write_bytes(image_bytes(8, 8, i))
    source = InputSpec(url=str(tmp_path))
    plan = plan_shards(list_images(source), shard_size=8)
    per_task = rows_per_read_task(plan.num_rows, cpus=2)

    blocks = [block.num_rows for block in read_stage(plan, source).iter_batches(batch_size=None, batch_format="pyarrow")]

    assert sum(blocks) == 96
    assert max(blocks) <= per_task
    assert len(blocks) >= 96 // per_task

"""pipeline.label.registry and pipeline.label.duplicates without Ray: who owns a content, and how
copies get their originals' labels (in the encode task or in the driver)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.label.commit import JobOutput
from pipeline.label.duplicates import DuplicateResolver, copy_labels
from pipeline.label.encode import encode_labels
from pipeline.label.registry import NOT_A_COPY, ContentRegistry
from pipeline.label.writers import ShardWriter
from schemas import STATUS_ERROR, STATUS_OK

CLASSES = ["sky", "tree", "road"]
SHARD_SIZE = 4
H1, H2 = "11" * 16, "22" * 16

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")


# ContentRegistry --------------------------------------------------------------------------------------------


def test_the_first_claim_owns_a_content_and_later_ones_are_its_copies():
    registry = ContentRegistry(SHARD_SIZE)
    assert registry.claim([H1, H1, H2], [5, 9, 6]) == [(NOT_A_COPY, NOT_A_COPY, False), (5, 5, False), (NOT_A_COPY, NOT_A_COPY, False)]
    assert registry.claim([H1], [5]) == [(NOT_A_COPY, NOT_A_COPY, False)]  # a retried read claims the same
    registry.mark_committed([1])  # images 4-7
    assert registry.claim([H1, H2], [12, 13]) == [(5, 5, True), (6, 6, True)]
    assert registry.size() == 2


def test_a_rebuilt_registry_sends_an_uncommitted_original_to_its_committed_copy():
    registry = ContentRegistry(SHARD_SIZE)
    registry.mark_committed([1, 2])  # shard 0 (images 0-3) was not committed: a crash before its marker
    registry.load([H1, H2, H1], [5, 8, 9], [2, None, 2])  # 5 and 9 copy image 2; 8 is an original
    assert registry.claim([H1], [2]) == [(NOT_A_COPY, 5, True)]  # the owner takes its copy's labels back
    assert registry.claim([H1, H2], [14, 15]) == [(2, 5, True), (8, 8, True)]


# copies' labels ---------------------------------------------------------------------------------------------


def objects(*values):
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array


def encoded(indices, statuses, label_source, source_committed=None, hashes=None, **options):
    """Rows as the encode task makes them: `label_source` -1 = labelled by the model (a 2x3 image,
    class `index % 3` everywhere), else a copy of that image."""
    n = len(indices)
    maps = [np.full((2, 3), i % 3, np.uint16) for i in indices]
    ok = [s == STATUS_OK and source < 0 for s, source in zip(statuses, label_source)]
    batch = {
        "image_index": np.array(indices, np.int64),
        "image_id": objects(*[f"img{i}.png" for i in indices]),
        "shard_id": objects(*[f"{i // SHARD_SIZE:06d}" for i in indices]),
        "source": objects(*[f"/in/img{i}.png" for i in indices]),
        "status": objects(*statuses),
        "error": objects(*["" if s == STATUS_OK else "inference failed: RuntimeError: boom" for s in statuses]),
        "width": np.full(n, 3, np.int32),
        "height": np.full(n, 2, np.int32),
        "label_map": objects(*maps),
        "class_ids": objects(*[np.array([i % 3], np.int32) if k else np.zeros(0, np.int32) for i, k in zip(indices, ok)]),
        "mean_probs": objects(*[np.array([0.5], np.float32) if k else np.zeros(0, np.float32) for k in ok]),
        "max_probs": objects(*[np.array([0.9], np.float32) if k else np.zeros(0, np.float32) for k in ok]),
        "kept_classes": objects(*[np.array([0, 1, 2], np.int32) if k else np.zeros(0, np.int32) for k in ok]),
        "top_prompts": objects(*['[null]' if k else "[]" for k in ok]),
        "unlabeled_area": np.zeros(n, np.int64),
        "distractor_area": np.zeros(n, np.int64),
        "mean_margin": np.full(n, 0.25, np.float32),
        "low_margin_share": np.zeros(n, np.float32),
        "model_seconds": np.array([0.5 if k else 0.0 for k in ok]),
        "content_hash": objects(*(hashes or [H1] * n)),
        "phash": objects(*["0" * 16] * n),
        "duplicate_of": np.array(label_source, np.int64),
        "label_source": np.array(label_source, np.int64),
        "source_committed": np.array(source_committed or [False] * n),
    }
    return encode_labels(batch, len(CLASSES), "tax", "ckpt", **options)


def test_a_copy_takes_its_originals_labels_and_keeps_its_own_identity():
    original = encoded([2], [STATUS_OK], [-1])
    copy = encoded([9], [STATUS_OK], [2])
    assert copy.column("awaiting_labels").to_pylist() == [True] and copy.column("labels").to_pylist() == [None]
    row = copy_labels(copy, original, len(CLASSES)).to_pylist()[0]
    source = original.to_pylist()[0]
    assert row["labels"] == source["labels"] and row["model_seconds"] == source["model_seconds"] == 0.5
    assert (row["image_index"], row["image_id"], row["duplicate_of"], row["awaiting_labels"]) == (9, "img9.png", 2, False)
    assert '"id": 9' in row["coco_image"] and '"image_id": 9' in row["coco_annotations"]


def test_a_copy_of_a_failed_original_is_an_error_row_with_its_reason():
    failed = encoded([2], [STATUS_ERROR], [-1])
    row = copy_labels(encoded([9], [STATUS_OK], [2]), failed, len(CLASSES)).to_pylist()[0]
    assert row["status"] == STATUS_ERROR and row["error"].startswith("inference failed: RuntimeError: boom")
    assert "image 2" in row["error"] and row["labels"] is None and row["coco_image"] is None


def test_the_encode_task_copies_labels_from_a_committed_shard(tmp_path):
    store = JobOutput(str(tmp_path))
    writer = ShardWriter(store, "000000", 1, ["parquet"], CLASSES, {})
    writer.add(encoded([2], [STATUS_OK], [-1]))
    writer.commit()
    output = {"url": str(tmp_path), "storage_options": {}}
    table = encoded([9, 10], [STATUS_OK, STATUS_OK], [2, -1], source_committed=[True, False], hashes=[H1, H2], output=output, shard_size=SHARD_SIZE)
    copy, other = sorted(table.to_pylist(), key=lambda row: row["image_index"])
    assert copy["awaiting_labels"] is False and copy["duplicate_of"] == 2 and [l["class_id"] for l in copy["labels"]] == [2]
    assert other["duplicate_of"] is None and [l["class_id"] for l in other["labels"]] == [1]


def test_the_driver_parks_a_copy_until_its_original_comes(tmp_path):
    store = JobOutput(str(tmp_path))
    live: dict[str, ShardWriter] = {}
    resolver = DuplicateResolver(store, SHARD_SIZE, len(CLASSES), live, set())
    ready = resolver.resolve(encoded([9], [STATUS_OK], [2]))
    assert ready.num_rows == 0 and resolver.parked == 1
    ready = resolver.resolve(encoded([2, 3], [STATUS_OK, STATUS_OK], [-1, -1], hashes=[H1, H2]))
    assert sorted(ready.column("image_index").to_pylist()) == [2, 3, 9] and resolver.parked == 0
    copy = next(row for row in ready.to_pylist() if row["image_index"] == 9)
    assert [l["class_id"] for l in copy["labels"]] == [2] and copy["coco_image"] is not None


def test_the_driver_finds_an_original_in_a_live_shard_or_in_a_shard_committed_meanwhile(tmp_path):
    store = JobOutput(str(tmp_path))
    live: dict[str, ShardWriter] = {}
    committed: set[str] = set()
    resolver = DuplicateResolver(store, SHARD_SIZE, len(CLASSES), live, committed)
    writer = live["000000"] = ShardWriter(store, "000000", 2, ["parquet"], CLASSES, {})
    writer.add(resolver.resolve(encoded([2], [STATUS_OK], [-1])))
    ready = resolver.resolve(encoded([9], [STATUS_OK], [2]))  # its original waits in a live shard
    assert ready.column("labels").to_pylist()[0][0]["class_id"] == 2
    writer.add(resolver.resolve(encoded([1], [STATUS_OK], [-1], hashes=[H2])))
    writer.commit()
    committed.add("000000")
    del live["000000"]
    ready = resolver.resolve(encoded([10], [STATUS_OK], [2]))  # committed between its claim and now
    assert ready.column("labels").to_pylist()[0][0]["class_id"] == 2 and resolver.parked == 0


def test_a_parked_copy_follows_its_source_when_that_turns_out_a_copy_too(tmp_path):
    """A registry actor lost mid-job restarts empty: an original whose read is retried may then
    claim its hash as a copy of a third image. A copy parked on it gets the third image's labels
    when they come, and names it as its original (the one with a PNG)."""
    registry = ContentRegistry(SHARD_SIZE)
    assert registry.claim([H1, H1], [2, 9]) == [(NOT_A_COPY, NOT_A_COPY, False), (2, 2, False)]
    restarted = ContentRegistry(SHARD_SIZE)  # image 5 claims first after the restart, then 2 again
    assert restarted.claim([H1, H1], [5, 2]) == [(NOT_A_COPY, NOT_A_COPY, False), (5, 5, False)]
    resolver = DuplicateResolver(JobOutput(str(tmp_path)), SHARD_SIZE, len(CLASSES), {}, set())
    assert resolver.resolve(encoded([9], [STATUS_OK], [2])).num_rows == 0
    assert resolver.resolve(encoded([2], [STATUS_OK], [5])).num_rows == 0 and resolver.parked == 2
    ready = resolver.resolve(encoded([5], [STATUS_OK], [-1]))
    assert resolver.parked == 0
    rows = {row["image_index"]: row for row in ready.to_pylist()}
    assert sorted(rows) == [2, 5, 9]
    assert [l["class_id"] for l in rows[9]["labels"]] == [l["class_id"] for l in rows[5]["labels"]] == [5 % 3]
    assert (rows[2]["duplicate_of"], rows[9]["duplicate_of"], rows[5]["duplicate_of"]) == (5, 5, None)

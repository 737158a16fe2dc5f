"""Exact duplicates: rows that reuse the labels of an image with the same pixels (`registry.py`).

Such a row reaches the encode step without labels; it gets them from the row named by its
`label_source`:

- where that row was already committed when the copy was claimed (an original from an earlier
  shard, or from before a resume), the encode task reads it from the committed Parquet file;
- otherwise the original is still in flight, and the driver, which receives every row, gives the
  copy its labels when both have arrived (`DuplicateResolver`): it never waits, it parks the copy
  until its original's row comes (the copy's shard commits after that), or reads the original's
  committed shard if it was committed meanwhile.

A copy keeps its own identity (index, id, source, shard, hashes) and takes the original's status,
error, labels and scores, and its `model_seconds` (the model time it saved). If the original's
labelling failed, its copies get its error row: the model is not run for them in this job (a
rerun does not redo committed rows either; a new job labels them). PNG label maps and margin maps
are written for originals only; a copy's are its original's (`duplicate_of`).
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from schemas import STATUS_OK, read_labels_parquet

from ..sources import shard_id
from .coco import coco_fragments
from .commit import LABELS_DIR, JobOutput

# What a copy takes from its original.
COPIED_COLUMNS = (
    "status", "error", "labels", "unlabeled_area", "distractor_area", "mean_margin", "low_margin_share", "kept_classes", "model_seconds",
    "tiled_windows",
)
SOURCE_COLUMNS = ["image_index", "duplicate_of", *COPIED_COLUMNS]


def copy_labels(copies: pa.Table, sources: pa.Table, num_classes: int) -> pa.Table:
    """`copies` (rows with `label_source`) with the labels of their sources (rows with those
    `image_index`es); their COCO fragments remade when the table has them."""
    by_index = {row["image_index"]: row for row in sources.select(SOURCE_COLUMNS).to_pylist()}
    rows = copies.to_pylist()
    for row in rows:
        source = by_index[row["label_source"]]
        row.update({name: source[name] for name in COPIED_COLUMNS})
        if row["duplicate_of"] is not None and source["duplicate_of"] is not None:
            row["duplicate_of"] = source["duplicate_of"]  # a copy of a copy names the original (see `DuplicateResolver`)
        if source["status"] != STATUS_OK:
            row["error"] = f"{source['error']} (the labelling of image {source['image_index']}, with the same pixels)"
            row["width"] = row["height"] = None  # as on every error row
        row["awaiting_labels"] = False
        if "coco_image" in row:
            row["coco_image"], row["coco_annotations"] = coco_fragments(row, num_classes)
    return pa.Table.from_pylist(rows, schema=copies.schema)


def read_committed_rows(store: JobOutput, indices: list[int], shard_size: int) -> pa.Table:
    """The committed rows with these image indices (`SOURCE_COLUMNS`): one read per shard."""
    wanted = pa.array(sorted(set(indices)), pa.int64())
    shards = sorted({shard_id(index // shard_size) for index in indices})
    tables = [
        read_labels_parquet(data, columns=SOURCE_COLUMNS)
        for data in store.read_many([f"{LABELS_DIR}/{shard}.parquet" for shard in shards])
    ]
    table = pa.concat_tables(tables)
    return table.filter(pc.is_in(table.column("image_index"), wanted))


class DuplicateResolver:
    """The driver's part: copies whose original was in flight when they were claimed.

    `live` maps the shards whose rows the driver still holds to their writers (`writers.ShardWriter`:
    its `tables`), `committed` holds the shards committed so far; a shard is added to `committed`
    before it leaves `live`, so a source that has come is always in one of them.
    """

    def __init__(self, store: JobOutput, shard_size: int, num_classes: int, live: dict[str, Any], committed: set[str]) -> None:
        self.store = store
        self.shard_size = shard_size
        self.num_classes = num_classes
        self.live = live
        self.committed = committed
        self.waiting: dict[int, list[pa.Table]] = {}  # source index -> copies parked until it arrives

    @property
    def parked(self) -> int:
        return sum(table.num_rows for tables in self.waiting.values() for table in tables)

    def resolve(self, batch: pa.Table) -> pa.Table:
        """The batch's rows that are ready for their shards, with any parked copies whose sources
        came in this batch; the batch's copies whose sources have not come yet are parked.

        A source may be a copy itself: a registry actor that was lost restarts empty, and an
        original whose read is retried then may claim its hash as a copy of a third image. Copies
        parked on it take its labels once it has them, and name the third image as their original.
        """
        awaiting = batch.column("awaiting_labels")
        if not self.waiting and not pc.any(awaiting).as_py():
            return batch
        ready = batch.filter(pc.invert(awaiting))
        copies = batch.filter(awaiting)
        out = [ready]
        if copies.num_rows:
            out.append(self._resolve_now_or_park(copies, ready))
        arrivals = out
        while self.waiting and arrivals:
            released = []
            for table in arrivals:
                came = table.filter(pc.is_in(table.column("image_index"), pa.array(list(self.waiting), pa.int64())))
                released += [copy_labels(parked, came, self.num_classes) for index in came.column("image_index").to_pylist() for parked in self.waiting.pop(index)]
            arrivals = released
            out += released
        return pa.concat_tables([ready, *(table for table in out[1:] if table.num_rows)])

    def _resolve_now_or_park(self, copies: pa.Table, batch: pa.Table) -> pa.Table:
        found, from_storage = [batch], []
        for index in pc.unique(copies.column("label_source")).to_pylist():
            shard = shard_id(index // self.shard_size)
            writer = self.live.get(shard)
            if writer is not None:
                found.extend(writer.tables)
            elif shard in self.committed:  # committed between the copy's claim and now: rare
                from_storage.append(index)
        if from_storage:
            found.append(read_committed_rows(self.store, from_storage, self.shard_size))
        sources = pa.concat_tables([table.select(SOURCE_COLUMNS) for table in found])
        sources = sources.filter(pc.is_in(sources.column("image_index"), copies.column("label_source")))
        has_source = pc.is_in(copies.column("label_source"), sources.column("image_index"))
        for row in range(copies.num_rows):
            if not has_source[row].as_py():
                self.waiting.setdefault(copies.column("label_source")[row].as_py(), []).append(copies.slice(row, 1))
        return copy_labels(copies.filter(has_source), sources, self.num_classes)

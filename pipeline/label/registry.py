"""The job's registry of image contents: for each content hash, the image whose labels every copy reuses.

Read tasks claim their images' hashes (`fingerprints.content_hash`) as soon as they are decoded,
before the model: the first image to claim a hash owns it and is labelled by the model; a later
image with that hash is a duplicate and skips the model (`duplicates.py` gives it the owner's
labels). The registry is split by hash prefix over a few actors, and each read task makes one call
per actor per batch of decoded images, never one per image, so no single process sees every image.

A claim is idempotent: an image that claims again (its read task retried) gets the same answer. An
image that owns its hash but whose labels already lie in a committed copy (a crash committed the
copy's shard but not the owner's) reuses the copy's labels. After a resume the registry is rebuilt
from the committed shards' `content_hash` column, read by tasks, and it knows which shards are
committed, so each answer says whether the labels to reuse can already be read from storage.

Memory: about 130 bytes per distinct image over the actors (measured: a 16-byte key, an index and
the dict's slot; 25 million images: 3.3 GB in all). A registry actor that is lost restarts empty:
copies of the images it knew are then labelled by the model again (correct labels, model time spent
twice), never lost; an original whose read is retried after the restart may learn it is a copy of an
image claimed since, and copies already waiting on it follow it there (`DuplicateResolver`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from schemas import STATUS_OK, read_labels_parquet

from ..read import NO_IMAGE
from ..storage import is_process_local
from .commit import LABELS_DIR, JobOutput

NOT_A_COPY = -1  # `duplicate_of` / `label_source` of an image the model labels
REGISTRY_LOAD_SHARDS_PER_TASK = 64  # committed shards whose hashes one task reads on a resume
REGISTRY_COLUMNS = ["image_index", "status", "content_hash", "duplicate_of"]


class ContentRegistry:
    """One actor's part of the registry (the hashes whose prefix maps to it)."""

    def __init__(self, shard_size: int) -> None:
        self.shard_size = shard_size
        self.owners: dict[bytes, int] = {}  # hash -> the image_index that owns it
        self.copies: dict[bytes, int] = {}  # hash -> a committed row holding its labels, where the owner is not committed
        self.committed: set[int] = set()  # shard numbers (image_index // shard_size)

    def mark_committed(self, shard_numbers: list[int]) -> None:
        self.committed.update(shard_numbers)

    def load(self, hashes: list[str], indices: list[int], duplicate_of: list[int | None]) -> None:
        """Committed `ok` rows: their hashes are owned by their originals (themselves, or `duplicate_of`)."""
        for hash_, index, original in zip(hashes, indices, duplicate_of):
            key = bytes.fromhex(hash_)
            owner = index if original is None else original
            self.owners[key] = owner
            if owner // self.shard_size not in self.committed:
                self.copies.setdefault(key, index)

    def claim(self, hashes: list[str], indices: list[int]) -> list[tuple[int, int, bool]]:
        """Per image: (the index it duplicates or `NOT_A_COPY`, the index whose labels it reuses or
        `NOT_A_COPY` if the model must label it, whether that row is committed)."""
        answers = []
        for hash_, index in zip(hashes, indices):
            key = bytes.fromhex(hash_)
            owner = self.owners.setdefault(key, index)
            source = self.copies.get(key, owner)
            if source == index:
                answers.append((NOT_A_COPY, NOT_A_COPY, False))
            else:
                answers.append((NOT_A_COPY if owner == index else owner, source, source // self.shard_size in self.committed))
        return answers

    def size(self) -> int:
        return len(self.owners)


@dataclass
class RegistryClient:
    """The registry's actors, and the calls a read task or the driver makes to them (one per actor touched)."""

    actors: list[Any]

    def actor_of(self, content_hash: str) -> int:
        return int(content_hash[:8], 16) % len(self.actors)

    def claim(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A decoded batch with `duplicate_of`, `label_source` and `source_committed` (see
        `ContentRegistry.claim`); the pixels of images that reuse labels are dropped."""
        n = len(batch["image_index"])
        duplicate_of, label_source = np.full(n, NOT_A_COPY, np.int64), np.full(n, NOT_A_COPY, np.int64)
        committed = np.zeros(n, bool)
        groups: dict[int, list[int]] = {}
        for i, content_hash in enumerate(batch["content_hash"]):
            if content_hash is not None:
                groups.setdefault(self.actor_of(content_hash), []).append(i)
        calls = {
            actor: self.actors[actor].claim.remote([batch["content_hash"][i] for i in rows], [int(batch["image_index"][i]) for i in rows])
            for actor, rows in groups.items()
        }
        for actor, answers in zip(calls, ray.get(list(calls.values()))):
            for i, (original, source, source_committed) in zip(groups[actor], answers):
                duplicate_of[i], label_source[i], committed[i] = original, source, source_committed
        images = batch["image"].copy()
        for i in np.flatnonzero(label_source != NOT_A_COPY):
            images[i] = NO_IMAGE  # no pixels travel to the model for an image it will not see
        return {**batch, "image": images, "duplicate_of": duplicate_of, "label_source": label_source, "source_committed": committed}

    def mark_committed(self, shard_ids: list[str]) -> list[Any]:
        """Tell every actor that these shards are committed; returns the calls' references (a job
        need not wait for them: a claim that misses the news is resolved by the driver instead)."""
        numbers = [int(shard) for shard in shard_ids]
        return [actor.mark_committed.remote(numbers) for actor in self.actors]

    def load(self, rows: pa.Table) -> None:
        """Committed rows (`image_index`, `status`, `content_hash`, `duplicate_of`) into the actors."""
        rows = rows.filter(pc.and_(pc.equal(rows.column("status"), STATUS_OK), pc.is_valid(rows.column("content_hash"))))
        groups: dict[int, list[dict[str, Any]]] = {}
        for row in rows.to_pylist():
            groups.setdefault(self.actor_of(row["content_hash"]), []).append(row)
        ray.get(
            [
                self.actors[actor].load.remote([r["content_hash"] for r in part], [r["image_index"] for r in part], [r["duplicate_of"] for r in part])
                for actor, part in groups.items()
            ]
        )

    def close(self) -> None:
        # An actor runs one caller's calls in order: once this empty call returns, the driver's
        # earlier `mark_committed` calls have too, and killing it leaves none failing on the console.
        ray.get([actor.mark_committed.remote([]) for actor in self.actors])
        for actor in self.actors:
            ray.kill(actor)


def start_registry(actors: int, shard_size: int, store: JobOutput, committed_shards: list[str]) -> RegistryClient:
    """Start the registry's actors and fill them from the committed shards (a resume)."""
    remote = ray.remote(ContentRegistry).options(num_cpus=0, max_restarts=-1, max_task_retries=-1)
    client = RegistryClient([remote.remote(shard_size) for _ in range(actors)])
    ray.get(client.mark_committed(committed_shards))  # before any load: `load` asks which owners are committed
    chunks = [committed_shards[i : i + REGISTRY_LOAD_SHARDS_PER_TASK] for i in range(0, len(committed_shards), REGISTRY_LOAD_SHARDS_PER_TASK)]
    if is_process_local(store.fs):  # only this process sees the files
        for chunk in chunks:
            _load_shards(store.url, {}, chunk, client, store)
    else:
        load = ray.remote(_load_shards).options(num_cpus=1)
        ray.get([load.remote(store.url, store.storage_options, chunk, client) for chunk in chunks])
    return client



def _load_shards(url: str, storage_options: dict[str, Any], shard_ids: list[str], client: RegistryClient, store: JobOutput | None = None) -> None:
    """Read the committed shards' hash columns (many files at once) and load them into the registry."""
    store = store or JobOutput(url, storage_options)
    files = store.read_many([f"{LABELS_DIR}/{shard}.parquet" for shard in shard_ids])
    client.load(pa.concat_tables([read_labels_parquet(data, columns=REGISTRY_COLUMNS) for data in files]))

"""A finished job as a review sees it: its record, its committed rows, which of them to review.

Rows are read shard by shard, a few shards' files at a time (`SHARDS_PER_READ`), only the columns
asked for, so a job of millions of images is scanned in bounded memory; the full rows (masks
included) are read only for the images chosen.
"""

from __future__ import annotations

import io
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from schemas import STATUS_OK, read_labels_parquet

from ..label.commit import JOB_FILE, JobOutput, redact_url
from ..sources import IMAGE_EXTENSIONS, read_images
from ..storage import StorageError, filesystem

SHARDS_PER_READ = 32
SCORE_COLUMNS = ["image_index", "image_id", "shard_id", "status", "mean_margin"]
ROW_COLUMNS = ["image_index", "image_id", "source", "shard_id", "status", "width", "height", "labels", "mean_margin", "low_margin_share"]
SELECTIONS = ("least-confident", "random", "ids")


class ReviewError(ValueError):
    """A review that cannot be exported or imported as asked; the message names the input."""


@dataclass(frozen=True)
class Selection:
    """Which committed images to review: `least-confident:N` (lowest mean margin first),
    `random:N` (seeded), or `ids:FILE` (one image id per line)."""

    kind: str
    count: int | None = None
    ids_url: str | None = None
    seed: int = 0

    @classmethod
    def parse(cls, text: str, seed: int = 0) -> Selection:
        kind, _, argument = text.partition(":")
        if kind not in SELECTIONS or not argument:
            raise ReviewError(f"--select {text!r}: expected least-confident:N, random:N or ids:FILE")
        if kind == "ids":
            return cls(kind, ids_url=argument, seed=seed)
        if not (argument.isascii() and argument.isdigit()) or int(argument) < 1:
            raise ReviewError(f"--select {text!r}: N must be a positive whole number")
        return cls(kind, count=int(argument), seed=seed)

    def __str__(self) -> str:
        return f"{self.kind}:{self.ids_url if self.kind == 'ids' else self.count}"


class ReviewedJob:
    """A labelling job's output folder, read for a review (never written)."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = url
        self.store = JobOutput(url, storage_options)
        record = self.store.read_json(JOB_FILE)
        if record is None:
            raise ReviewError(f"{redact_url(url)} holds no sed-label job (no {JOB_FILE})")
        self.record = record
        self.classes: list[str] = list(record["classes"])
        self.markers = self.store.committed_shards()
        if not self.markers:
            raise ReviewError(f"{redact_url(url)} has no committed shards yet: nothing to review")

    def tables(self, columns: list[str], shard_ids: list[str] | None = None) -> Iterator[pa.Table]:
        """The committed shards' rows (only `columns`), a few shards at a time."""
        shards = sorted(self.markers) if shard_ids is None else shard_ids
        for start in range(0, len(shards), SHARDS_PER_READ):
            names = [self.markers[shard]["files"][0] for shard in shards[start : start + SHARDS_PER_READ]]
            for data in self.store.read_many(names):
                yield read_labels_parquet(data, columns=columns)

    def scores(self) -> pa.Table:
        """Every committed row's index, id, shard, status and mean margin."""
        return pa.concat_tables(list(self.tables(SCORE_COLUMNS)))

    def rows(self, chosen: pa.Table) -> list[dict[str, Any]]:
        """The full rows of `chosen` (a table with image_index and shard_id), in its order."""
        wanted = pc.cast(chosen.column("image_index"), pa.int64())
        found: dict[int, dict[str, Any]] = {}
        for table in self.tables(ROW_COLUMNS, sorted(set(chosen.column("shard_id").to_pylist()))):
            for row in table.filter(pc.is_in(table.column("image_index"), wanted)).to_pylist():
                found[row["image_index"]] = row
        return [found[index] for index in chosen.column("image_index").to_pylist()]

    def planned(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The plan's entries of `rows` (where and how each image is stored), in their order."""
        plan = self.store.read_plan()
        indices = pa.array([row["image_index"] for row in rows], pa.int64())
        planned = {r["image_index"]: r for r in plan.filter(pc.is_in(plan.column("image_index"), indices)).to_pylist()}
        return [dict(planned[row["image_index"]], inline=None) for row in rows]

    def image_bytes(self, rows: list[dict[str, Any]], storage_options: dict[str, Any], planned: list[dict[str, Any]] | None = None) -> list[bytes]:
        """The source images of `rows`, read as the job read them (files, tar members, Parquet
        cells); `planned`: their plan entries, if already read (`planned`)."""
        spec = self.record["spec"]["input"]
        data = read_images(planned or self.planned(rows), spec.get("image_column", "image"), storage_options)
        for row, value in zip(rows, data):
            if isinstance(value, Exception):
                raise ReviewError(f"image {row['image_id']} ({redact_url(row['source'])}): cannot read it: {value}")
        return data


def select(job: ReviewedJob, selection: Selection) -> pa.Table:
    """The chosen rows' image_index and shard_id (and score), in review order; deterministic."""
    scores = job.scores()
    ok = scores.filter(pc.equal(scores.column("status"), STATUS_OK))
    if selection.kind == "ids":
        return _by_ids(ok, scores, _read_ids(selection.ids_url))
    if selection.kind == "least-confident":
        measured = ok.filter(pc.is_valid(ok.column("mean_margin")))
        if measured.num_rows == 0 and ok.num_rows:
            raise ReviewError(
                "least-confident: this job's rows have no uncertainty scores (labelled before labels schema 3); "
                "use random:N or ids:FILE, or label again into a new output"
            )
        order = pc.sort_indices(measured, [("mean_margin", "ascending"), ("image_index", "ascending")])
        return measured.take(order[: selection.count])
    order = np.argsort(ok.column("image_index").to_numpy(), kind="stable")
    permutation = np.random.default_rng(selection.seed).permutation(order)
    return ok.take(pa.array(permutation[: selection.count]))


def _read_ids(url: str) -> list[str]:
    try:
        fs, path = filesystem(url)
        text = fs.cat_file(path).decode("utf-8")
    except (OSError, UnicodeDecodeError, StorageError) as exc:
        raise ReviewError(f"ids:{url}: cannot read it: {type(exc).__name__}: {exc}") from exc
    ids = list(dict.fromkeys(line.strip() for line in text.splitlines() if line.strip()))
    if not ids:
        raise ReviewError(f"ids:{url} names no image ids (one per line)")
    return ids


def _by_ids(ok: pa.Table, scores: pa.Table, ids: list[str]) -> pa.Table:
    position = {image_id: i for i, image_id in enumerate(ok.column("image_id").to_pylist())}
    unknown = [image_id for image_id in ids if image_id not in position]
    if unknown:
        failed = set(scores.filter(pc.not_equal(scores.column("status"), STATUS_OK)).column("image_id").to_pylist())
        errors = [i for i in unknown if i in failed]
        missing = [i for i in unknown if i not in failed]
        problems = []
        if missing:
            problems.append(f"{len(missing)} not in the job's committed rows ({', '.join(missing[:5])})")
        if errors:
            problems.append(f"{len(errors)} whose rows are errors, without labels ({', '.join(errors[:5])})")
        raise ReviewError("ids: " + "; ".join(problems))
    return ok.take(pa.array([position[image_id] for image_id in ids], pa.int64()))


def relative_name(image_id: str) -> str:
    """An image id as a relative path: folders kept, never absolute or above its root."""
    parts = [part for part in image_id.replace("\\", "/").split("/") if part not in ("", ".", "..")]
    if not parts:
        raise ReviewError(f"image id {image_id!r} makes no file name")
    return "/".join(parts)


def image_name(image_id: str, data: bytes) -> str:
    """A file name for a copied image: its id, with an image extension (from its bytes if it has none)."""
    name = relative_name(image_id)
    if posixpath.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
        return name
    with Image.open(io.BytesIO(data)) as image:
        return f"{name}.{(image.format or 'png').lower()}"


def label_name(image_id: str) -> str:
    """The ground-truth label map of an image: named like it (`a/b.jpg` -> `a/b.png`), as
    `sed-label report --ground-truth` and training folders find them."""
    return posixpath.splitext(relative_name(image_id))[0] + ".png"

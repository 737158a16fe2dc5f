"""Deterministic listing of a job's input and its cut into shards (the plan).

Inputs: a prefix of image files (recursive), a glob, `.tar` shards (each image member), or Parquet
files with an image-bytes column. The listing is sorted, so the same input gives the same plan;
the plan is saved with the job's outputs and reused on resume rather than listed again.
Tar members are recorded with their byte offsets, so a worker reads one image with one ranged read.
"""

from __future__ import annotations

import bisect
import itertools
import posixpath
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from schemas import InputSpec

from .decode import DecodeError
from .retry import with_retries
from .storage import CONCURRENT_REQUESTS, StorageError, filesystem, is_process_local, to_url

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".jfif"})
KIND_FILE, KIND_TAR, KIND_PARQUET = "file", "tar", "parquet"

PLAN_SCHEMA = pa.schema(
    [
        pa.field("image_index", pa.int64(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("shard_id", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),  # URL of the object holding the image
        pa.field("offset", pa.int64()),  # tar: data offset; parquet: row index in the file
        pa.field("length", pa.int64()),  # tar: data length
        pa.field("inline", pa.binary()),  # bytes read by the driver (process-local inputs only)
    ]
)


class InputError(ValueError):
    """An input URL that lists nothing or cannot be listed."""


@dataclass(frozen=True)
class ImageRef:
    image_id: str
    kind: str
    source: str
    offset: int | None = None
    length: int | None = None


def _has_glob(path: str) -> bool:
    return any(ch in path for ch in "*?[")


def _is_hidden(relative: str) -> bool:
    return any(part.startswith((".", "_")) for part in relative.split("/"))


def list_images(spec: InputSpec) -> list[ImageRef]:
    """Every image of the input, in a deterministic order."""
    fs, path = filesystem(spec.url, spec.storage_options)

    def list_paths() -> tuple[str, list[str]]:
        if _has_glob(path):
            root = path[: min(path.index(ch) for ch in "*?[" if ch in path)].rsplit("/", 1)[0]
            return root, sorted(p for p in fs.glob(path) if fs.isfile(p))
        if fs.isdir(path):
            return path.rstrip("/"), sorted(fs.find(path.rstrip("/")))
        if fs.isfile(path):
            return posixpath.dirname(path), [path]
        raise InputError(f"input {spec.url!r} does not exist")

    try:
        root, paths = with_retries(list_paths, f"listing {spec.url}")
    except (OSError, PermissionError) as exc:
        raise StorageError(f"cannot list input {spec.url!r}: {type(exc).__name__}: {exc}") from exc
    refs: list[ImageRef] = []
    for p in paths:
        relative = posixpath.relpath(p, root) if root else p
        if _is_hidden(relative):
            continue
        extension = posixpath.splitext(p)[1].lower()
        if extension == ".tar":
            refs.extend(with_retries(lambda: _tar_members(fs, p, relative), f"reading {to_url(fs, p)}"))
        elif extension == ".parquet":
            refs.extend(with_retries(lambda: _parquet_rows(fs, p, relative, spec), f"reading {to_url(fs, p)}"))
        elif extension in IMAGE_EXTENSIONS:
            refs.append(ImageRef(relative, KIND_FILE, to_url(fs, p)))
    if not refs:
        raise InputError(f"input {spec.url!r} holds no images (extensions {sorted(IMAGE_EXTENSIONS)}, .tar, .parquet)")
    return _unique_ids(refs)


def _tar_members(fs: Any, path: str, relative: str) -> list[ImageRef]:
    refs = []
    with fs.open(path, "rb") as f:
        try:
            with tarfile.open(fileobj=f, mode="r:") as archive:
                for member in archive:
                    extension = posixpath.splitext(member.name)[1].lower()
                    if member.isfile() and extension in IMAGE_EXTENSIONS and not _is_hidden(member.name):
                        refs.append(
                            ImageRef(f"{relative}/{member.name}", KIND_TAR, to_url(fs, path), member.offset_data, member.size)
                        )
        except tarfile.TarError as exc:
            raise InputError(f"input shard {to_url(fs, path)!r} is not a readable tar: {exc}") from exc
    return refs


def _parquet_rows(fs: Any, path: str, relative: str, spec: InputSpec) -> list[ImageRef]:
    with fs.open(path, "rb") as f:
        parquet = pq.ParquetFile(f)
        names = parquet.schema_arrow.names
        if spec.image_column not in names:
            raise InputError(f"Parquet input {to_url(fs, path)!r} has no column {spec.image_column!r} (columns: {names})")
        if spec.id_column is not None:
            if spec.id_column not in names:
                raise InputError(f"Parquet input {to_url(fs, path)!r} has no id column {spec.id_column!r}")
            ids = [str(v) for v in parquet.read(columns=[spec.id_column]).column(0).to_pylist()]
        else:
            ids = [f"{relative}#{row}" for row in range(parquet.metadata.num_rows)]
    return [ImageRef(image_id, KIND_PARQUET, to_url(fs, path), row) for row, image_id in enumerate(ids)]


def _unique_ids(refs: list[ImageRef]) -> list[ImageRef]:
    """Suffix repeated ids with `#1`, `#2`... never producing an id that is already taken."""
    taken = {ref.image_id for ref in refs}
    seen: set[str] = set()
    unique = []
    for ref in refs:
        image_id, count = ref.image_id, 0
        while image_id in seen or (count and image_id in taken):
            count += 1
            image_id = f"{ref.image_id}#{count}"
        seen.add(image_id)
        unique.append(ref if image_id == ref.image_id else ImageRef(image_id, ref.kind, ref.source, ref.offset, ref.length))
    return unique


def shard_id(index: int) -> str:
    return f"{index:06d}"


def plan_shards(refs: list[ImageRef], shard_size: int) -> pa.Table:
    """The job's plan: one row per image with its global index and zero-padded shard id."""
    return pa.table(
        {
            "image_index": list(range(len(refs))),
            "image_id": [r.image_id for r in refs],
            "shard_id": [shard_id(i // shard_size) for i in range(len(refs))],
            "kind": [r.kind for r in refs],
            "source": [r.source for r in refs],
            "offset": [r.offset for r in refs],
            "length": [r.length for r in refs],
            "inline": [None] * len(refs),
        },
        schema=PLAN_SCHEMA,
    )


def read_images(rows: list[dict[str, Any]], image_column: str, storage_options: dict[str, Any]) -> list[bytes | Exception]:
    """The bytes of each planned image, or the exception that reading it raised (after retries,
    for transient errors), or a `DecodeError` for a Parquet cell that holds no bytes.

    Files are read whole and tar members with one ranged read, `CONCURRENT_REQUESTS` at a time
    (an object store's latency is paid once per batch, not once per image); Parquet rows are
    grouped per file so that each row group is read once per batch.
    """
    results: list[bytes | Exception] = [b""] * len(rows)
    parquet_rows: dict[str, list[int]] = {}
    file_rows: list[int] = []
    for i, row in enumerate(rows):
        if row.get("inline") is not None:
            results[i] = row["inline"]
        elif row["kind"] == KIND_PARQUET:
            parquet_rows.setdefault(row["source"], []).append(i)
        else:
            file_rows.append(i)

    def read(row: dict[str, Any]) -> bytes | Exception:
        try:
            return with_retries(lambda: _read_file(row, storage_options), f"reading {row['source']}")
        except Exception as exc:  # a permanent or persisting error becomes this image's error row
            return exc

    if file_rows:
        with ThreadPoolExecutor(min(CONCURRENT_REQUESTS, len(file_rows))) as pool:
            for i, value in zip(file_rows, pool.map(read, [rows[i] for i in file_rows])):
                results[i] = value
    for source, indices in parquet_rows.items():
        try:
            offsets = [rows[i]["offset"] for i in indices]
            values = with_retries(lambda: _read_parquet_cells(source, offsets, image_column, storage_options), f"reading {source}")
        except Exception as exc:  # the whole file failed: every image in it gets the reason
            values = [exc] * len(indices)
        for i, value in zip(indices, values):
            results[i] = value
    return results


def _read_file(row: dict[str, Any], storage_options: dict[str, Any]) -> bytes:
    fs, path = filesystem(row["source"], storage_options)
    if row["kind"] == KIND_TAR:
        return fs.cat_file(path, start=row["offset"], end=row["offset"] + row["length"])
    return fs.cat_file(path)


def _read_parquet_cells(source: str, row_numbers: list[int], column: str, storage_options: dict[str, Any]) -> list[bytes | Exception]:
    fs, path = filesystem(source, storage_options)
    with fs.open(path, "rb") as f:
        parquet = pq.ParquetFile(f)
        sizes = (parquet.metadata.row_group(g).num_rows for g in range(parquet.metadata.num_row_groups))
        group_starts = list(itertools.accumulate(sizes, initial=0))
        groups = {bisect.bisect_right(group_starts, r) - 1 for r in row_numbers}
        columns = {g: parquet.read_row_group(g, columns=[column]).column(0) for g in sorted(groups)}
    cells: list[bytes | Exception] = []
    for r in row_numbers:
        group = bisect.bisect_right(group_starts, r) - 1
        value = columns[group][r - group_starts[group]].as_py()
        if isinstance(value, dict):  # HuggingFace-style {"bytes": ..., "path": ...}
            value = value.get("bytes")
        cells.append(value if isinstance(value, bytes) else DecodeError(f"not image bytes: column {column!r} holds {type(value).__name__}"))
    return cells


def inline_process_local_bytes(plan: pa.Table, spec: InputSpec) -> pa.Table:
    """For inputs only this process can see (`memory://`), read the bytes here into the plan."""
    fs, _ = filesystem(spec.url, spec.storage_options)
    if not is_process_local(fs):
        return plan
    data = read_images(plan.to_pylist(), spec.image_column, spec.storage_options)
    inline = [value if isinstance(value, bytes) else None for value in data]
    return plan.set_column(plan.schema.get_field_index("inline"), "inline", pa.array(inline, pa.binary()))

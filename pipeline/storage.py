"""Storage through fsspec, shared by every job: URLs to filesystems, atomic writes, and
`OutputStore`, the retried reads and writes of one output folder."""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from .retry import is_storage_error, with_retries

T = TypeVar("T")

# Requests in flight per `write_many` / `read_many` call: object stores answer each in 20-50 ms
# whatever its size, so one process keeps many going rather than waiting on each in turn.
CONCURRENT_REQUESTS = 16


class StorageError(RuntimeError):
    """Storage that cannot be reached, read or written; the message names the URL."""


def filesystem(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """`url` -> (filesystem, path within it)."""
    try:
        return url_to_fs(url, **(storage_options or {}))
    except (ImportError, ValueError) as exc:
        raise StorageError(f"cannot open storage for {url!r}: {exc}") from exc


def join(*parts: str) -> str:
    return posixpath.join(*parts)


def to_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A URL for `path` that `filesystem()` maps back to the same place."""
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def is_process_local(fs: fsspec.AbstractFileSystem) -> bool:
    """True for storage that other processes (Ray workers) cannot see, like `memory://`."""
    return isinstance(fs, MemoryFileSystem)


def write_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write a whole object so that readers never see a partial one.

    Object stores make a single put atomic (and have no folders to make: asking s3fs to make one
    costs a request per write); on a local disk the data goes to a temporary name in the same
    folder and is renamed over the target.
    """
    _make_parent(fs, path)
    if isinstance(fs, LocalFileSystem):
        temporary = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(temporary, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    else:
        fs.pipe_file(path, data)


def _make_parent(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Make the parent folder, except on object stores (fsspec's async ones: s3, gcs, azure)."""
    parent = posixpath.dirname(path)
    if parent and not getattr(fs, "async_impl", False):
        fs.makedirs(parent, exist_ok=True)


def upload_file(fs: fsspec.AbstractFileSystem, local_path: str, path: str) -> None:
    """Copy a local file to `path` as one object (atomically, as `write_bytes` does)."""
    _make_parent(fs, path)
    if isinstance(fs, LocalFileSystem):
        temporary = f"{path}.tmp-{uuid.uuid4().hex}"
        shutil.copyfile(local_path, temporary)
        os.replace(temporary, path)
    else:
        fs.put_file(local_path, path)


class OutputStore:
    """Reads and writes the files of one output folder (a job's, a training run's), through fsspec.

    Every call is retried on transient storage faults (`retry.py`); a storage error that persists
    or cannot be retried raises `StorageError` naming the file. Other errors (bugs) propagate as
    they are, with their traceback.
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = url
        self.storage_options = storage_options or {}
        self.fs, self.root = filesystem(url, storage_options)
        self.root = self.root.rstrip("/")

    def path(self, *parts: str) -> str:
        return join(self.root, *parts)

    def url_of(self, *parts: str) -> str:
        return to_url(self.fs, self.path(*parts))

    def _io(self, action: str, relative: str, call: Callable[[], T]) -> T:
        url = self.url_of(relative) if relative else self.url
        try:
            return with_retries(call, f"{action} {url}")
        except Exception as exc:
            if not is_storage_error(exc):
                raise
            raise StorageError(f"cannot {action} {url}: {type(exc).__name__}: {exc}") from exc

    def write(self, relative: str, data: bytes) -> None:
        self._io("write", relative, lambda: write_bytes(self.fs, self.path(relative), data))

    def upload(self, relative: str, local_path: str) -> None:
        self._io("write", relative, lambda: upload_file(self.fs, local_path, self.path(relative)))

    def write_many(self, files: dict[str, bytes]) -> None:
        """Write several files with `CONCURRENT_REQUESTS` in flight; each write is retried on its own."""
        self._each(lambda item: self.write(*item), list(files.items()))

    def read_bytes(self, relative: str) -> bytes:
        return self._io("read", relative, lambda: self.fs.cat_file(self.path(relative)))

    def read_many(self, relatives: Sequence[str]) -> list[bytes]:
        """Several files' bytes, in the order asked, with `CONCURRENT_REQUESTS` in flight."""
        return self._each(self.read_bytes, list(relatives))

    def _each(self, call: Callable[[T], Any], items: list[T]) -> list[Any]:
        if len(items) <= 1:
            return [call(item) for item in items]
        with ThreadPoolExecutor(min(CONCURRENT_REQUESTS, len(items))) as pool:
            return list(pool.map(call, items))

    def exists(self, relative: str) -> bool:
        return self._io("check", relative, lambda: self.fs.exists(self.path(relative)))

    def list(self, relative: str) -> list[str]:
        """The files below `relative` (full paths within the filesystem), fresh from the storage."""
        # Other processes write too: a listing cached by this filesystem object may be stale.
        self.fs.invalidate_cache(self.path(relative))
        if not self.exists(relative):
            return []
        return sorted(self._io("list", relative, lambda: self.fs.find(self.path(relative))))

    def remove(self, relative: str) -> None:
        if self.exists(relative):
            self._io("remove", relative, lambda: self.fs.rm(self.path(relative), recursive=True))

    def read_json(self, relative: str) -> dict[str, Any] | None:
        if not self.exists(relative):
            return None
        return json.loads(self.read_bytes(relative))

    def write_json(self, relative: str, record: dict[str, Any]) -> None:
        self.write(relative, json.dumps(record, indent=2, sort_keys=True).encode())

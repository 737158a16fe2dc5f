"""fsspec helpers shared by the pipeline's readers and writers."""

from __future__ import annotations

import os
import posixpath
import shutil
import uuid
from typing import Any

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem


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

    Object stores make a single put atomic; on a local disk the data goes to a temporary name in
    the same folder and is renamed over the target.
    """
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if isinstance(fs, LocalFileSystem):
        temporary = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(temporary, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    else:
        fs.pipe_file(path, data)


def read_bytes(fs: fsspec.AbstractFileSystem, path: str, start: int | None = None, end: int | None = None) -> bytes:
    return fs.cat_file(path, start=start, end=end)


def upload_file(fs: fsspec.AbstractFileSystem, local_path: str, path: str) -> None:
    """Copy a local file to `path` as one object (atomically, as `write_bytes` does)."""
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if isinstance(fs, LocalFileSystem):
        temporary = f"{path}.tmp-{uuid.uuid4().hex}"
        shutil.copyfile(local_path, temporary)
        os.replace(temporary, path)
    else:
        fs.put_file(local_path, path)

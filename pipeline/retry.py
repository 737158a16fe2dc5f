"""Storage calls with retries: a transient fault costs time, never an image or a shard.

Object stores refuse connections, reset them and stall under load; each such call is retried
with exponential backoff (and jitter, so a pool of workers does not retry in lockstep) for up to
`STORAGE_RETRY_SECONDS`. Errors that retrying cannot fix (a missing object or bucket, access
denied) are raised at once, so the job stops with their message instead of waiting.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger("sed_label")

T = TypeVar("T")

# How long one storage call keeps retrying a transient fault; SED_LABEL_STORAGE_RETRY_SECONDS overrides.
STORAGE_RETRY_SECONDS = float(os.environ.get("SED_LABEL_STORAGE_RETRY_SECONDS", "120"))
FIRST_DELAY_SECONDS = 0.25
MAX_DELAY_SECONDS = 8.0

# fsspec backends map "no such key/bucket" to FileNotFoundError and "access denied" to PermissionError.
PERMANENT_ERRORS: tuple[type[BaseException], ...] = (
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    FileExistsError,
    ValueError,
    TypeError,
    NotImplementedError,
)


def is_permanent(exc: BaseException) -> bool:
    """True for errors that the same call would raise again however often it is retried."""
    return isinstance(exc, PERMANENT_ERRORS)


def with_retries(call: Callable[[], T], what: str, deadline_seconds: float | None = None) -> T:
    """`call()`, retried on transient errors with backoff until `deadline_seconds` have passed.

    The last error is raised as it is (permanent ones at once), so callers keep its type.
    """
    deadline = time.monotonic() + (STORAGE_RETRY_SECONDS if deadline_seconds is None else deadline_seconds)
    delay = FIRST_DELAY_SECONDS
    attempt = 1
    while True:
        try:
            return call()
        except Exception as exc:
            if is_permanent(exc) or time.monotonic() + delay > deadline:
                raise
            log.warning("%s failed (attempt %d: %s: %s); retrying in %.1f s", what, attempt, type(exc).__name__, exc, delay)
            time.sleep(delay * random.uniform(0.75, 1.25))
            delay = min(delay * 2, MAX_DELAY_SECONDS)
            attempt += 1

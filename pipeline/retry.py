"""Storage calls with retries: a transient fault costs time, never an image or a shard.

Object stores refuse connections, reset them, time out and throttle under load; each such call is
retried with exponential backoff (and jitter, so a pool of workers does not retry in lockstep) for
up to `STORAGE_RETRY_SECONDS`. Only errors that can pass are retried (`is_transient`): I/O and
connection errors, timeouts, throttling. What retrying cannot fix is raised at once: a missing
object or bucket and access denied stop the job with their message, and a programming error (a
`KeyError`, a `TypeError`) shows its traceback instead of being retried for two minutes.
"""

from __future__ import annotations

import asyncio
import functools
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

# fsspec backends map "no such key/bucket" to FileNotFoundError and "access denied" to PermissionError:
# OSError subclasses that the same call raises again however often it is retried.
PERMANENT_STORAGE_ERRORS: tuple[type[BaseException], ...] = (
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    FileExistsError,
)


@functools.cache
def _client_library_errors() -> tuple[type[BaseException], ...]:
    """Transient errors that object-store clients raise without turning them into OSError:
    connection and timeout errors of botocore (s3fs passes non-HTTP errors on as they are) and
    aiohttp (the HTTP client of s3fs, gcsfs and adlfs)."""
    errors: list[type[BaseException]] = []
    try:
        from botocore import exceptions as boto
        from botocore.parsers import ResponseParserError  # throttled responses can carry broken XML

        errors += [boto.HTTPClientError, boto.ConnectionError, boto.IncompleteReadError, ResponseParserError]
    except ImportError:
        pass
    try:
        import aiohttp

        errors.append(aiohttp.ClientError)
    except ImportError:
        pass
    return tuple(errors)


def is_transient(exc: BaseException) -> bool:
    """True for storage errors that may pass: I/O and connection errors, timeouts, throttling
    (s3fs raises `SlowDown` as an OSError)."""
    if isinstance(exc, PERMANENT_STORAGE_ERRORS):
        return False
    return isinstance(exc, (OSError, TimeoutError, asyncio.TimeoutError) + _client_library_errors())


def is_storage_error(exc: BaseException) -> bool:
    """True for errors that come from the storage itself (transient or not), not from our code."""
    return isinstance(exc, OSError) or is_transient(exc)


def with_retries(call: Callable[[], T], what: str, deadline_seconds: float | None = None) -> T:
    """`call()`, retried on transient errors with backoff until `deadline_seconds` have passed.

    The last error is raised as it is (anything not transient at once), so callers keep its type.
    """
    deadline = time.monotonic() + (STORAGE_RETRY_SECONDS if deadline_seconds is None else deadline_seconds)
    delay = FIRST_DELAY_SECONDS
    attempt = 1
    while True:
        try:
            return call()
        except Exception as exc:
            if not is_transient(exc) or time.monotonic() + delay > deadline:
                raise
            log.warning("%s failed (attempt %d: %s: %s); retrying in %.1f s", what, attempt, type(exc).__name__, exc, delay)
            time.sleep(delay * random.uniform(0.75, 1.25))
            delay = min(delay * 2, MAX_DELAY_SECONDS)
            attempt += 1

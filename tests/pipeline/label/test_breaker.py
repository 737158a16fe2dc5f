"""The error breaker's judgment over rows as they arrive."""

from __future__ import annotations

import pyarrow as pa
import pytest

from pipeline.label.breaker import ErrorBreaker, is_watched
from schemas import ErrorBreakerSpec, JobSpec

NOT_FOUND = "not found: s3://in/{}: FileNotFoundError: gone"


def rows(start: int, count: int, error: str | None = None) -> pa.Table:
    ids = [f"img{i:04d}.jpg" for i in range(start, start + count)]
    return pa.table(
        {
            "image_id": ids,
            "status": ["ok" if error is None else "error"] * count,
            "error": pa.array([None if error is None else error.format(i) for i in ids], pa.string()),
        }
    )


def test_a_cause_outside_the_images_trips_once_enough_rows_are_seen():
    breaker = ErrorBreaker(ErrorBreakerSpec())
    breaker.observe(rows(0, 31, NOT_FOUND))
    assert breaker.tripped() is None  # 31 < min_images: not judged yet
    breaker.observe(rows(31, 1, NOT_FOUND))
    why = breaker.tripped()
    assert why is not None
    assert '"not found" on 32 of the last 32 images (100%; the limit is 50% of at least 32)' in why
    # The two latest examples, each with its message (the object and the exception).
    assert "img0031.jpg (not found: s3://in/img0031.jpg: FileNotFoundError: gone) and img0030.jpg" in why


def test_half_is_not_more_than_half():
    breaker = ErrorBreaker(ErrorBreakerSpec())
    breaker.observe(rows(0, 16))
    breaker.observe(rows(16, 16, "access denied: s3://in/{}: PermissionError: Access Denied"))
    assert breaker.tripped() is None
    breaker.observe(rows(32, 1, "access denied: s3://in/{}: PermissionError: Access Denied"))
    assert '"access denied" on 17 of the last 33 images' in breaker.tripped()


@pytest.mark.parametrize(
    "message",
    [
        "not an image: no known image format matches these bytes",
        "corrupt or truncated: a PNG image that fails to decode: image file is truncated",
        "too many pixels: 12000x12000 = 144000000 pixels, over the limit of 100000000",
        "empty file: 0 bytes",
    ],
)
def test_failures_of_the_images_own_bytes_never_trip(message):
    breaker = ErrorBreaker(ErrorBreakerSpec())
    breaker.observe(rows(0, 100, message))
    assert breaker.tripped() is None and breaker.tripped(final=True) is None


def test_the_window_forgets_old_rows():
    settings = ErrorBreakerSpec(window=256)
    breaker = ErrorBreaker(settings)
    breaker.observe(rows(0, 1000))
    breaker.observe(rows(1000, 128, "inference failed: RuntimeError: {}"))
    assert breaker.tripped() is None  # 128 of the last 256: not more than half
    breaker.observe(rows(1128, 1, "inference failed: RuntimeError: {}"))
    assert '"inference failed" on 129 of the last 256 images (50%' in breaker.tripped()


def test_errors_that_scroll_out_of_the_window_no_longer_count():
    breaker = ErrorBreaker(ErrorBreakerSpec(window=64))
    for start in (0, 200):
        breaker.observe(rows(start, 64))
        breaker.observe(rows(start + 64, 30, NOT_FOUND))  # 30 of the last 64, twice: 60 in all
    assert breaker.tripped() is None and breaker.tripped(final=True) is None


def test_rows_are_judged_one_by_one_even_in_a_batch_longer_than_the_window():
    breaker = ErrorBreaker(ErrorBreakerSpec(window=64))
    batch = pa.concat_tables([rows(0, 100), rows(100, 40, NOT_FOUND), rows(140, 200)])
    breaker.observe(batch)  # 40 of 64 at row 140; the batch ends with 64 ok rows in the window
    assert '"not found" on 33 of the last 64 images' in breaker.tripped()


def test_a_run_shorter_than_min_images_is_judged_at_its_end():
    breaker = ErrorBreaker(ErrorBreakerSpec())
    breaker.observe(rows(0, 2))
    breaker.observe(rows(2, 3, NOT_FOUND))
    assert breaker.tripped() is None
    assert '"not found" on 3 of the last 5 images (60%; the limit is 50% of at least 5)' in breaker.tripped(final=True)


def test_each_reason_is_judged_on_its_own_and_the_tripping_one_is_named():
    breaker = ErrorBreaker(ErrorBreakerSpec())
    denied = "access denied: s3://in/{}: PermissionError: no"
    for i in range(0, 60, 3):  # two thirds of the rows fail, but no one reason takes more than half
        breaker.observe(pa.concat_tables([rows(i, 1, NOT_FOUND), rows(i + 1, 1, denied), rows(i + 2, 1)]))
    assert breaker.tripped() is None
    breaker.observe(rows(60, 30, denied))
    assert breaker.tripped().startswith('"access denied" on 41 of the last 81')


def test_off_when_the_spec_says_null():
    breaker = ErrorBreaker(None)
    breaker.observe(rows(0, 100, NOT_FOUND))
    assert not breaker.enabled and breaker.tripped(final=True) is None and breaker.rows_seen == 100


def test_watched_reasons():
    assert is_watched("not found") and is_watched("access denied") and is_watched("read failed")
    assert is_watched("out of memory") and is_watched("inference failed") and is_watched("unknown")
    assert not is_watched("not an image") and not is_watched("corrupt or truncated")


def test_spec_defaults_and_validation():
    spec = JobSpec(input={"url": "x"}, taxonomy={"classes": ["a"]}, model={"weights": None}, output={"url": "y"})
    assert spec.error_breaker == ErrorBreakerSpec(max_share=0.5, min_images=32, window=256)
    off = JobSpec(input={"url": "x"}, taxonomy={"classes": ["a"]}, model={"weights": None}, output={"url": "y"}, error_breaker=None)
    assert off.error_breaker is None
    with pytest.raises(ValueError, match="window .* is below min_images"):
        ErrorBreakerSpec(min_images=64, window=32)
    with pytest.raises(ValueError):
        ErrorBreakerSpec(max_share=0)

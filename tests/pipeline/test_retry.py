"""Storage retries: transient faults are retried with backoff, permanent ones raise at once."""

import pytest

from pipeline import retry
from pipeline.commit import OutputStore
from pipeline.storage import StorageError


@pytest.fixture(autouse=True)
def no_sleep(monkeypatch):
    slept = []
    monkeypatch.setattr(retry.time, "sleep", slept.append)
    return slept


class Flaky:
    def __init__(self, failures: list[BaseException], result: str = "done") -> None:
        self.failures = list(failures)
        self.calls = 0
        self.result = result

    def __call__(self) -> str:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return self.result


def test_transient_errors_are_retried_with_growing_delays(no_sleep):
    call = Flaky([ConnectionResetError("reset"), TimeoutError("stalled"), OSError("503 Slow Down")])
    assert retry.with_retries(call, "reading x", deadline_seconds=60) == "done"
    assert call.calls == 4
    assert len(no_sleep) == 3 and no_sleep[0] < no_sleep[1] < no_sleep[2]


@pytest.mark.parametrize("error", [FileNotFoundError("no such bucket"), PermissionError("Access Denied"), ValueError("bad")])
def test_permanent_errors_raise_at_once(error, no_sleep):
    call = Flaky([error])
    with pytest.raises(type(error)):
        retry.with_retries(call, "reading x", deadline_seconds=60)
    assert call.calls == 1 and no_sleep == []


def test_a_fault_that_outlasts_the_deadline_raises_the_last_error(monkeypatch):
    clock = iter(range(0, 1000, 5))
    monkeypatch.setattr(retry.time, "monotonic", lambda: next(clock))
    call = Flaky([ConnectionRefusedError(f"refused {i}") for i in range(100)])
    with pytest.raises(ConnectionRefusedError):
        retry.with_retries(call, "reading x", deadline_seconds=20)
    assert 1 < call.calls < 10


def test_output_store_names_the_file_of_a_permanent_error(tmp_path):
    (tmp_path / "file").write_text("x")
    store = OutputStore(str(tmp_path / "file" / "out"))  # a folder under a file: cannot be written
    with pytest.raises(StorageError, match=r"cannot write .*file/out/job.json"):
        store.write_json("job.json", {})

"""Storage retries: transient faults are retried with backoff; permanent ones and programming
errors raise at once."""

import pytest

from pipeline import retry
from pipeline.storage import OutputStore, StorageError


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


def test_client_library_connection_errors_are_transient():
    from botocore.exceptions import EndpointConnectionError, ReadTimeoutError

    assert retry.is_transient(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))
    assert retry.is_transient(ReadTimeoutError(endpoint_url="http://127.0.0.1:1"))


@pytest.mark.parametrize(
    "error",
    [
        FileNotFoundError("no such bucket"),
        PermissionError("Access Denied"),
        ValueError("bad"),
        KeyError("Contents"),  # a bug, not the storage: its traceback must show at once
        TypeError("unexpected keyword"),
        RuntimeError("anything else"),
    ],
)
def test_permanent_and_programming_errors_raise_at_once(error, no_sleep):
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


def test_a_key_error_inside_a_storage_call_is_neither_retried_nor_relabelled(tmp_path, no_sleep):
    store = OutputStore(str(tmp_path))
    calls = []

    def broken() -> None:
        calls.append(1)
        raise KeyError("ETag")

    with pytest.raises(KeyError, match="ETag"):
        store._io("read", "x.json", broken)
    assert calls == [1] and no_sleep == []

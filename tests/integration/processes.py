"""Jobs and training runs in a background thread, and the Ray processes a test kills under them."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def run_in_thread(function: Callable[..., Any], *args: Any) -> tuple[threading.Thread, dict[str, Any]]:
    """Start `function(*args)`; the dict gets its "result", or the "error" it raised."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = function(*args)
        except Exception as exc:  # handed to the test
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def parent_of(pid: int) -> int | None:
    """A process's parent, or None if it has ended."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except OSError:
        return None


def local_raylet_pid() -> int:
    """The raylet of the Ray this process started (`ray.init()` without an address)."""
    import ray

    return ray._private.worker._global_node.all_processes["raylet"][0].process.pid


def pids_titled(fragment: bytes, raylets: set[int] | None = None) -> list[int]:
    """Processes whose command line holds `fragment`: Ray titles its workers by what they host
    (`ray::RayTrainWorker`, Ray Data's actor pool `MapWorker(...)`). With `raylets`, only the
    workers those raylets started (a raylet forks its workers), not another Ray's or the leftovers
    of an earlier run."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if fragment in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids if raylets is None else [pid for pid in pids if parent_of(pid) in raylets]

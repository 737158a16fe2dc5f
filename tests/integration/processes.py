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


def pids_titled(fragment: bytes) -> list[int]:
    """Processes whose command line holds `fragment`: Ray titles its workers by what they host
    (`ray::RayTrainWorker`, Ray Data's actor pool `MapWorker(...)`)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if fragment in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids

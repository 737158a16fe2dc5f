"""How a running job tells a person how far it is: a total, the steps done, and lines worth reading.

The jobs report through a `Progress`; the CLI gives them a progress bar with the rate and the time
left (`jobs/console.py`), a library caller gets `LogProgress` (lines through `logging`).
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

log = logging.getLogger("sed_label")


class Progress(Protocol):
    def start(self, total: int, unit: str, description: str) -> None:
        """A new measure of work: `total` steps of `unit` (images, iterations)."""

    def advance(self, steps: int = 1) -> None:
        """`steps` more are done."""

    def note(self, message: str) -> None:
        """A line worth keeping (a shard committed, a restart): printed above the bar."""


class LogProgress:
    """`Progress` as log lines: notes as they come, and the count with its rate every `every` seconds."""

    def __init__(self, logger: logging.Logger = log, every: float = 10.0) -> None:
        self.logger = logger
        self.every = every
        self.total = self.done = 0
        self.unit = "steps"
        self.description = ""
        self.started = self.last = time.monotonic()

    def start(self, total: int, unit: str, description: str) -> None:
        self.total, self.unit, self.description, self.done = total, unit, description, 0
        self.started = self.last = time.monotonic()

    def advance(self, steps: int = 1) -> None:
        self.done += steps
        now = time.monotonic()
        if now - self.last >= self.every or self.done == self.total:
            self.last = now
            rate = self.done / max(now - self.started, 1e-9)
            self.logger.info("%s: %d/%d %s, %.2f %s/s", self.description, self.done, self.total, self.unit, rate, self.unit)

    def note(self, message: str) -> None:
        self.logger.info("%s", message)

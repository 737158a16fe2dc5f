"""What a person sees of a command: a progress bar with the rate and the time left, our own lines
above it, the reason when it fails; and a log file that takes everything else.

Ray, its raylet and its C++ core worker, PyTorch's extension builder and Python's warnings all
write to the process's standard error. While a command runs, file descriptor 2 points at a log
file, so their notices land there whatever wrote them; the console writes to the terminal's
original descriptor. `--verbose` leaves standard error as it is, so everything shows; so does a
harness that captures `sys.stderr` as a Python object (click's test runner, a notebook).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, ProgressColumn, Task, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichBar
from rich.text import Text

from pipeline.storage import OutputStore

LOG_DIR = "logs"
FAILURE_LOGGER = "sed_label.failure"  # the failed command's traceback: to the log file, not the console
LIBRARY_LOG_LEVELS = ("debug", "info", "warning", "error")


class RateColumn(ProgressColumn):
    """Steps per second over the run so far (rich's own speed column is a short moving window)."""

    def render(self, task: Task) -> Text:
        elapsed = task.elapsed or 0.0
        rate = task.completed / elapsed if elapsed > 0 and task.completed else None
        unit = task.fields.get("unit", "steps")
        return Text("-" if rate is None else f"{rate:.2f} {unit}/s", style="progress.data.speed")


class BarProgress:
    """The jobs' `pipeline.progress.Progress` as one rich progress bar; notes print above it."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.bar: RichBar | None = None
        self.task: Any = None

    def start(self, total: int, unit: str, description: str) -> None:
        self.close()
        self.bar = RichBar(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(unit),
            RateColumn(),
            TimeElapsedColumn(),
            TextColumn("left"),
            TimeRemainingColumn(),
            console=self.console,
        )
        self.bar.start()
        self.task = self.bar.add_task(description, total=total, unit=unit)

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.advance(self.task, steps)

    def note(self, message: str) -> None:
        self.console.print(message, markup=False, highlight=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


class Session:
    """One command's console and log file (`session`)."""

    def __init__(self, console: Console, local_log: str | None, output: OutputStore | None, debug: bool) -> None:
        self.console = console
        self.local_log = local_log
        self.output = output
        self.debug = debug
        self.progress = BarProgress(console)

    @property
    def log_path(self) -> str | None:
        """Where the log ends up: in the output folder once the command has written there, else locally."""
        if self.local_log is not None and self.output is not None and self.output.exists(""):
            return self.output.url_of(LOG_DIR, os.path.basename(self.local_log))
        return self.local_log

    def say(self, message: str) -> None:
        self.progress.note(message)

    def fail(self, exc: BaseException, expected: bool) -> None:
        """One line with the reason; the traceback with --debug (and in the log file, if there is one).

        `expected`: an error of the input or the environment (a bad spec, a conflict, storage
        denied) whose message says everything; otherwise the error's type is named too.
        """
        self.progress.close()
        logging.getLogger(FAILURE_LOGGER).error("command failed", exc_info=exc)
        if self.debug:
            self.console.print("".join(traceback.format_exception(exc)), markup=False, highlight=False)
        reason = str(exc) if expected else f"{type(exc).__name__}: {exc}"
        self.console.print(f"error: {reason}", style="red", markup=False, highlight=False)
        if not self.debug and not expected:
            where = f"the log {self.log_path} has it; " if self.local_log else ""
            self.console.print(f"({where}--debug prints the traceback here)", style="dim", markup=False)

    def keep_log(self) -> None:
        """Copy the log into the output folder's `logs/`, if the command wrote there."""
        destination = self.log_path
        if self.local_log is None or self.output is None or destination == self.local_log:
            return
        try:
            self.output.upload(f"{LOG_DIR}/{os.path.basename(self.local_log)}", self.local_log)
        except Exception as exc:  # the command's own outcome matters more than its log's copy
            logging.getLogger("sed_label").warning("the log stays at %s: cannot copy it to %s: %s", self.local_log, destination, exc)
            return
        os.unlink(self.local_log)


@contextlib.contextmanager
def session(
    command: str,
    output_url: str | None = None,
    storage_options: dict[str, Any] | None = None,
    verbose: bool = False,
    debug: bool = False,
    log_level: str = "info",
    log_file: bool = True,
) -> Iterator[Session]:
    """The console, and unless `log_file` is False the log file, of one command.

    The log is written to a local temporary file and, when the command ends, moved to
    `OUTPUT/logs/COMMAND-TIME-PID.log` if the command wrote to its output folder (a command refused
    before any work leaves the output untouched, and its log where it was written).
    """
    name = f"sed-label-{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    log_path = os.path.join(tempfile.gettempdir(), name) if log_file else None
    output = OutputStore(output_url, storage_options) if output_url is not None else None
    # Redirect only a real standard error: under a harness that captures sys.stderr as an object
    # (click's CliRunner, a notebook) the console writes to that object and nothing is redirected.
    redirect = log_path is not None and not verbose and _writes_to_fd2(sys.stderr)
    if redirect:
        sys.stderr.flush()
        terminal = os.fdopen(os.dup(2), "w", buffering=1)
        redirected = open(log_path, "a", buffering=1)
        os.dup2(redirected.fileno(), 2)
    console = Console(file=terminal if redirect else sys.stderr, soft_wrap=True)
    root = logging.getLogger()
    handlers = _logging_handlers(log_path, log_level, console, verbose)
    for handler in handlers:
        root.addHandler(handler)
    previous_level = root.level
    root.setLevel(min(logging.getLevelName(log_level.upper()), logging.WARNING))
    current = Session(console, log_path, output, debug)
    try:
        yield current
    finally:
        current.progress.close()
        for handler in handlers:
            root.removeHandler(handler)
            handler.close()
        root.setLevel(previous_level)
        if redirect:
            sys.stderr.flush()
            os.dup2(terminal.fileno(), 2)
            redirected.close()
            terminal.close()
        current.keep_log()


def _writes_to_fd2(stream: Any) -> bool:
    try:
        return stream.fileno() == 2
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both of the last two
        return False


def _logging_handlers(log_path: str | None, log_level: str, console: Console, verbose: bool) -> list[logging.Handler]:
    """Everything at `log_level` into the log file; our own warnings (a retried storage call) on the
    console too, or with `verbose` everything at `log_level`."""
    handlers: list[logging.Handler] = []
    if log_path is not None:
        to_file = logging.FileHandler(log_path)
        to_file.setLevel(log_level.upper())
        to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handlers.append(to_file)
    to_console = RichHandler(console=console, show_time=False, show_path=False, markup=False)
    to_console.setLevel(log_level.upper() if verbose else logging.WARNING)
    if not verbose:
        to_console.addFilter(lambda r: (r.name == "sed_label" or r.name.startswith("sed_label.")) and r.name != FAILURE_LOGGER)
    return [*handlers, to_console]

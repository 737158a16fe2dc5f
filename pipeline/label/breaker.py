"""The error breaker: a job stops when its images fail for a cause that is not theirs.

One unreadable image is that image's error row. When a cause outside the images takes many rows
(the input deleted, credentials revoked, a model that fails on everything), committing their error
rows would lose those images to the job, since a rerun skips committed shards. So the driver judges
the rows as they arrive: once it has seen `min_images` of them (a smaller run: at its end, on all
it saw), one reason outside `IMAGE_ERROR_REASONS` that takes more than `max_share` of the last
`window` rows stops the job. A shard holding such rows waits `window` more rows before its commit,
so that a stop leaves it uncommitted for the rerun that follows the fix.
"""

from __future__ import annotations

from collections import Counter, deque

import pyarrow as pa
import pyarrow.compute as pc

from schemas import IMAGE_ERROR_REASONS, STATUS_OK, ErrorBreakerSpec, error_reason

EXAMPLES_KEPT = 2


class ErrorRateExceeded(RuntimeError):
    """The job stopped: one error reason that is not about the images' own bytes took too many rows."""


def is_watched(reason: str) -> bool:
    """A reason the breaker counts: any but the ones about an image's own bytes."""
    return reason not in IMAGE_ERROR_REASONS


class ErrorBreaker:
    def __init__(self, settings: ErrorBreakerSpec | None) -> None:
        self.settings = settings
        self.rows_seen = 0
        self._window: deque[str | None] = deque()  # per row in arrival order: its watched reason, or None
        self._counts: Counter[str] = Counter()  # watched reasons in the window
        self._examples: dict[str, deque[tuple[str, str]]] = {}  # reason -> its latest (image id, message)
        self._trip: str | None = None  # why the job must stop, from the first row that tripped

    @property
    def enabled(self) -> bool:
        return self.settings is not None

    def observe(self, batch: pa.Table) -> None:
        """Take a batch of rows (columns `status`, `error`, `image_id`) into the window, judging
        after every row (a batch may be longer than the window)."""
        self.rows_seen += batch.num_rows
        if self.settings is None:
            return
        reasons: list[str | None] = [None] * batch.num_rows
        failed = pc.indices_nonzero(pc.not_equal(batch.column("status"), STATUS_OK)).to_pylist()
        if failed:
            rows = batch.select(["image_id", "error"]).take(failed).to_pylist()
            for position, row in zip(failed, rows):
                reason = error_reason(row["error"])
                if is_watched(reason):
                    reasons[position] = reason
                    self._examples.setdefault(reason, deque(maxlen=EXAMPLES_KEPT)).append((row["image_id"], row["error"]))
        for reason in reasons:
            self._window.append(reason)
            if reason is not None:
                self._counts[reason] += 1
            if len(self._window) > self.settings.window:
                dropped = self._window.popleft()
                if dropped is not None:
                    self._counts[dropped] -= 1
            # A share rises only when its reason arrives; the first judgment looks at every reason.
            if self._trip is None and len(self._window) >= self.settings.min_images:
                self._trip = self._judge(reason if len(self._window) > self.settings.min_images else None)

    def tripped(self, final: bool = False) -> str | None:
        """Why the job must stop, or None. `final`: no more rows will come (judge even a short run)."""
        if self._trip is None and final and self.settings is not None and self._window:
            self._trip = self._judge(None)
        return self._trip

    def _judge(self, reason: str | None) -> str | None:
        """The stop message if `reason` (None: the largest reason) takes more than its share."""
        if reason is None:
            reason, _ = max(self._counts.items(), key=lambda item: item[1], default=("", 0))
        seen, count = len(self._window), self._counts.get(reason, 0)
        if not reason or count <= self.settings.max_share * seen:
            return None
        examples = list(self._examples[reason])[::-1]
        named = " and ".join(f"{image_id} ({message})" for image_id, message in examples)
        return (
            f'"{reason}" on {count} of the last {seen} images ({count / seen:.0%}; the limit is {self.settings.max_share:.0%} '
            f"of at least {min(self.settings.min_images, seen)}), e.g. {named}"
        )

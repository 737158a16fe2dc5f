"""TensorBoard event files for a training run, when the `tensorboard` package is installed.

Written locally by rank 0 and uploaded to `output.url/tensorboard/` with every checkpoint, so they
reach object storage too. A resumed run starts a new event file; the steps after the last
checkpoint were never uploaded, so no step appears twice.
"""

from __future__ import annotations

import logging
import os
import tempfile
from numbers import Real
from typing import Any

from ..storage import OutputStore

log = logging.getLogger("sed_label")

TENSORBOARD_DIR = "tensorboard"


def _tag(name: str) -> str:
    """`val_mIoU` -> `val/mIoU`, `loss_sem_seg_0` -> `train/loss_sem_seg_0`."""
    return "val/" + name[len("val_") :] if name.startswith("val_") else "train/" + name


class TensorBoardLog:
    def __init__(self, store: OutputStore, enabled: bool) -> None:
        self.store = store
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch's writer needs the tensorboard package, an optional extra
            log.warning("output.tensorboard: the tensorboard package is not installed; metrics go to metrics.jsonl only")
            return
        self.local = tempfile.TemporaryDirectory(prefix="sed-tensorboard-")
        self.writer = SummaryWriter(self.local.name)

    def add(self, record: dict[str, Any]) -> None:
        """One iteration's record: every number but the iteration itself, at step `iteration`."""
        if self.writer is None:
            return
        for name, value in record.items():
            if name != "iteration" and isinstance(value, Real):
                self.writer.add_scalar(_tag(name), float(value), record["iteration"])

    def upload(self) -> None:
        if self.writer is None:
            return
        self.writer.flush()
        for name in sorted(os.listdir(self.local.name)):
            self.store.upload(f"{TENSORBOARD_DIR}/{name}", os.path.join(self.local.name, name))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.local.cleanup()

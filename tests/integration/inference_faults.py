"""A model that fails on marked images, installed in every Ray worker by Ray's `worker_process_setup_hook`.

Images `POISONED_WIDTH` pixels wide make `SEDPredictor.label_batch` raise, as a model that runs out
of memory or meets a kernel bug on them would: a job of only such images fails on every image, a
job with a few of them on those few.
"""

from __future__ import annotations

POISONED_WIDTH = 77


def fail_on_poisoned_images() -> None:
    import sed_model

    label_batch = sed_model.SEDPredictor.label_batch

    def failing_label_batch(self, images, **options):
        if any(image.shape[-1] == POISONED_WIDTH for image in images):
            raise RuntimeError(f"the model fails on {POISONED_WIDTH}-pixel-wide images")
        return label_batch(self, images, **options)

    sed_model.SEDPredictor.label_batch = failing_label_batch

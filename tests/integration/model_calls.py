"""Counts the images the model labels, installed in every Ray worker by Ray's `worker_process_setup_hook`.

The real `SEDPredictor.label_batch` runs (failing on `inference_faults.POISONED_WIDTH`-wide images
as there); after a call that succeeds, each of its images is appended to the file named by
`$SED_LABEL_TEST_MODEL_CALLS` as its content hash (`pipeline.fingerprints.content_hash`, the rows'
`content_hash`), one line per image, so a test counts the model's work per content.
"""

from __future__ import annotations

import os

MODEL_CALLS_ENV = "SED_LABEL_TEST_MODEL_CALLS"


def count_model_calls() -> None:
    import sed_model
    from pipeline.fingerprints import content_hash

    from .inference_faults import fail_on_poisoned_images

    fail_on_poisoned_images()
    label_batch = sed_model.SEDPredictor.label_batch

    def counting_label_batch(self, images, **options):
        results = label_batch(self, images, **options)
        lines = "".join(content_hash(image.permute(1, 2, 0).cpu().numpy()) + "\n" for image in images)
        with open(os.environ[MODEL_CALLS_ENV], "a") as calls:  # one short append per call: whole lines
            calls.write(lines)
        return results

    sed_model.SEDPredictor.label_batch = counting_label_batch

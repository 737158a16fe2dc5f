"""The process-wide settings of a worker or CLI process, applied by one explicit call.

Each is global to the process, so no constructor or import changes it behind a caller's back:
- PIL's decompression-bomb limit is lifted: `decode.decode_image` refuses images over the job's
  own `input.max_pixels` from their header, a limit that may be above PIL's;
- for CPU inference, the allocator and the decoder's fused kernels (`sed_model.prepare_cpu_inference`).
"""

from __future__ import annotations

import torch
from PIL import Image

import sed_model


def prepare_process(inference_device: torch.device | None = None) -> None:
    """Apply the settings; with `inference_device` on CPU, also those of CPU inference. Idempotent."""
    Image.MAX_IMAGE_PIXELS = None
    if inference_device is not None and inference_device.type == "cpu":
        sed_model.prepare_cpu_inference()

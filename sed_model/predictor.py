"""Label many images against one taxonomy, in the style of segment-anything's predictor.

Set the expensive context once (the taxonomy's text embeddings), then predict many images. By
default images go through the paper's evaluation protocol: resized to short side 640 (long side at
most 2560) with PIL, labelled with class-attention pooling from the model's eval setting, and the
192x192 probabilities resized in one step to the original size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import ops
from .cpu import kernels as cpu_kernels
from .cpu.allocator import keep_freed_memory
from .model import PRECISIONS, SED, Labeling, Prediction
from .text import IMAGENET_TEMPLATES, taxonomy_hash
from .tiling import Tiling, label_tiled
from .transforms import EVAL_MAX_SIZE, EVAL_SHORT_EDGE, resize_shortest_edge


def prepare_cpu_inference() -> bool:
    """Set this process up for fast CPU inference; call it once, before the first image.

    Two process-wide effects, so they are an explicit call rather than a side effect of building
    a predictor: the C library's allocator keeps freed memory for reuse (`allocator.py`: the
    model's large temporaries then cost no fresh page faults at every call), and the decoder's
    fused kernels (`cpu_kernels.py`) are built or loaded now, so a fresh machine's one-time build
    (about 20 s) happens here rather than inside the first batch. Returns whether the kernels are
    usable; without this call they are built at the first inference and the allocator is left as
    it is.
    """
    keep_freed_memory()
    return cpu_kernels.prepare()


def inference_precision(requested: str, device: torch.device) -> tuple[str, str]:
    """`requested` ("auto", "float32" or "bfloat16") on `device` -> (precision, why). "auto" is
    bfloat16 where it runs natively (GPUs of compute capability 8.0 on; CPUs with AVX512-BF16 or
    AMX, where oneDNN's bfloat16 products run at 2-10x float32's rate), float32 elsewhere (emulated
    bfloat16 is several times slower than float32)."""
    if requested != "auto":
        if requested not in PRECISIONS:
            raise ValueError(f"precision must be auto or one of {PRECISIONS}, got {requested!r}")
        return requested, "as asked"
    if ops.native_bfloat16(device):
        return "bfloat16", f"auto: this {device.type.upper()} runs bfloat16 natively"
    if device.type == "cpu":
        return "float32", "auto: this CPU has neither AVX512-BF16 nor AMX, so bfloat16 would be emulated (slower than float32)"
    return "float32", f"auto: this {device.type.upper()} has no native bfloat16"


class SEDPredictor:
    """`set_taxonomy` once, then `predict` / `predict_batch` many times.

    For CPU inference call `prepare_cpu_inference()` once per process first (the labelling job's
    actors do).
    """

    def __init__(
        self,
        model: SED,
        top_k: int | None = None,
        short_edge: int | None = EVAL_SHORT_EDGE,
        max_size: int = EVAL_MAX_SIZE,
        precision: str = "float32",
        tiling: Tiling | None = None,
        windows_per_call: int = 4,
    ) -> None:
        """`precision`: "float32", "bfloat16", or "auto" (`inference_precision`: bfloat16 where
        the model's device runs it natively); the one it resolved to is `self.precision`, and
        why, `self.precision_reason`. `tiling`: `label_batch` labels the images it applies to by
        overlapping windows at their own resolution (`tiling.py`), `windows_per_call` per model
        call, instead of shrinking them; `predict_batch` never tiles (its `(T, H, W)` output is
        what tiling avoids)."""
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None (exact), got {top_k}")
        self.precision, self.precision_reason = inference_precision(precision, model.device)
        self.tiling = tiling
        self.windows_per_call = windows_per_call
        self.model = model.eval()
        self.top_k = top_k
        self.short_edge = short_edge
        self.max_size = max_size
        self.classes: list[str] | None = None
        self.text_features: torch.Tensor | None = None
        self.taxonomy_hash: str | None = None

    def set_taxonomy(
        self,
        classes: Sequence[str],
        templates: Sequence[str] = IMAGENET_TEMPLATES,
        text_features: torch.Tensor | None = None,
    ) -> None:
        """Encode the class names once (or adopt `text_features` computed elsewhere for them)."""
        if text_features is None:
            text_features = self.model.encode_classes(classes, templates)
        elif text_features.shape[0] != len(classes):
            raise ValueError(f"text_features hold {text_features.shape[0]} classes, the taxonomy {len(classes)}")
        self.classes = list(classes)
        self.text_features = text_features.to(self.model.device)
        self.taxonomy_hash = taxonomy_hash(classes, templates)

    def _prepare(self, image: torch.Tensor) -> torch.Tensor:
        if self.short_edge is None:
            return image
        return resize_shortest_edge(image, self.short_edge, self.max_size)

    def _inputs(self, images: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
        if self.text_features is None:
            raise RuntimeError("call set_taxonomy(...) before predict")
        if not len(images):
            raise ValueError("no images to predict")
        return [self._prepare(image) for image in images], [tuple(image.shape[-2:]) for image in images]

    @torch.inference_mode()
    def predict_batch(self, images: Sequence[torch.Tensor]) -> list[Prediction]:
        """uint8 `(3, H_i, W_i)` images -> one `Prediction` each, at each image's own size."""
        prepared, sizes = self._inputs(images)
        return self.model.predict_batch(prepared, self.text_features, self.top_k, output_sizes=sizes, precision=self.precision)

    @torch.inference_mode()
    def label_batch(
        self,
        images: Sequence[torch.Tensor],
        runner_up: bool = False,
        class_groups: torch.Tensor | None = None,
        margins: bool = False,
    ) -> list[Labeling]:
        """Label maps and confidences only (with `runner_up`, each pixel's second class; with
        `margins`, its margin over the second; of another group, with `class_groups`): memory
        bounded whatever the taxonomy size."""
        if self.text_features is None:
            raise RuntimeError("call set_taxonomy(...) before predict")
        images = list(images)
        tiled = [self.tiling is not None and self.tiling.applies(*image.shape[-2:]) for image in images]
        whole = [image for image, tile in zip(images, tiled) if not tile]
        results = iter([])
        if whole:
            prepared, sizes = self._inputs(whole)
            results = iter(
                self.model.label_batch(
                    prepared,
                    self.text_features,
                    self.top_k,
                    output_sizes=sizes,
                    precision=self.precision,
                    runner_up=runner_up,
                    class_groups=class_groups,
                    margins=margins,
                )
            )
        return [
            label_tiled(
                self.model,
                image,
                self.text_features,
                self.tiling,
                self.top_k,
                self.precision,
                self.windows_per_call,
                runner_up=runner_up,
                class_groups=class_groups,
                margins=margins,
            )
            if tile
            else next(results)
            for image, tile in zip(images, tiled)
        ]

    def predict(self, image: torch.Tensor) -> Prediction:
        return self.predict_batch([image])[0]

"""SED = CLIP backbone + cost volume + gradual-fusion decoder.

Images enter as uint8 RGB (CHW); the model normalises them with CLIP's statistics and resizes them
to `image_size` x `image_size` (768, whatever the aspect ratio), as the paper does. The device comes
from the model's parameters: nothing here calls `.cuda()`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .backbone import CLIPBackbone
from .config import SEDConfig, resolve_clip_config
from .decoder import SEDDecoder, StageLogits
from .ranking import RunningTop, margin
from .resize import RowResize, resize_probabilities
from .text import IMAGENET_TEMPLATES, TaxonomyError, encode_classes

HEAD_NAMES = ("head", "head0", "head1", "head2")
# The most memory `label_batch` gives a chunk of classes resized to an image's size: 16 classes of
# a 6000 x 4000 image would take 1.5 GB, so such an image is labelled in bands of rows.
RESIZED_BYTES = 256 * 2**20

# Inference precisions. bfloat16 runs the backbone's and decoder's convolutions and matrix products
# in bfloat16 (autocast), keeping class attention's sums over classes in float32; on a CPU with this
# package's fused kernels the decoder stays in float32 (`decoder_precision`). It is never on by
# default, and bench/model_latency.py reports how often its labels agree with float32's.
PRECISIONS = ("float32", "bfloat16")


@dataclass
class Prediction:
    """One image's result: the kept classes' probabilities, and which classes early rejection kept."""

    kept_probs: torch.Tensor  # (K, H, W) probabilities of the kept classes, in taxonomy order
    kept: torch.Tensor  # (K,) int64 class indices (all classes in exact mode)
    kept_after: dict[str, torch.Tensor]  # classes surviving the rejection after head0, head1, head2
    num_classes: int

    @property
    def probs(self) -> torch.Tensor:
        """`(T, H, W)` probabilities; rejected classes are exactly 0."""
        full = self.kept_probs.new_zeros((self.num_classes, *self.kept_probs.shape[-2:]))
        full[self.kept] = self.kept_probs
        return full

    @property
    def labels(self) -> torch.Tensor:
        """The argmax label map `(H, W)` int64."""
        return self.kept[self.kept_probs.argmax(dim=0)]


@dataclass
class Labeling:
    """One image's label map without the per-class probability maps (memory O(H*W))."""

    labels: torch.Tensor  # (H, W) int64 class indices (argmax over classes)
    confidence: torch.Tensor  # (H, W) float: the winning class's probability
    kept: torch.Tensor
    kept_after: dict[str, torch.Tensor]
    runner_up: torch.Tensor | None = None  # (H, W) int64: the second class (-1 if one was kept), when asked
    margin: torch.Tensor | None = None  # (H, W) float: best minus second-best probability, when asked (`label_batch`)
    windows: int = 0  # windows a tiled image was labelled in (`tiling.py`); 0: labelled whole


@dataclass
class LowResolution:
    """Sigmoid of the final head for one image's kept classes, at the model's output resolution."""

    probs: torch.Tensor  # (K, 192, 192)
    kept: torch.Tensor
    kept_after: dict[str, torch.Tensor]


def cost_volume(clip_dense: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of dense image features `(B, D, h, w)` with `(T, P, D)` -> `(B, T, P, h, w)`.

    No temperature is applied (the paper's code does not).
    """
    image = F.normalize(clip_dense, dim=1)
    text = F.normalize(text, dim=-1)
    return torch.einsum("bdhw,tpd->btphw", image, text)


class SED(nn.Module):
    """The SED model. Build it with `sed_model.build_sed(config)`."""

    def __init__(self, config: SEDConfig) -> None:
        super().__init__()
        self.config = config
        clip_cfg, self.open_clip_model, self.pretrained_tag = resolve_clip_config(config.clip_model)
        self.backbone = CLIPBackbone(clip_cfg)
        res2, res3, res4, _ = self.backbone.stage_channels
        self.decoder = SEDDecoder(
            appearance_channels=(res4, res3, res2),
            hidden_dim=config.hidden_dim,
            decoder_dims=config.decoder_dims,
            guidance_dims=config.guidance_dims,
            num_templates=config.num_templates,
            kernel_size=config.cnext_kernel_size,
            heads=config.attention_heads,
        )
        self.register_buffer("pixel_mean", torch.tensor(config.pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(config.pixel_std).view(1, 3, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def pooling(self) -> int:
        """Class-attention pooling: the paper trains with 2x2 and evaluates with 1x1."""
        return self.config.train_pooling if self.training else self.config.eval_pooling

    # Text ---------------------------------------------------------------------------------------
    def encode_classes(self, classes: Sequence[str], templates: Sequence[str] = IMAGENET_TEMPLATES) -> torch.Tensor:
        """Class names -> `(T, P, D)` normalised text embeddings; compute once per taxonomy."""
        if len(templates) != self.config.num_templates:
            raise TaxonomyError(
                f"this model takes exactly {self.config.num_templates} prompt templates "
                f"(its first layer has one input channel per template), got {len(templates)}"
            )
        return encode_classes(self.backbone, classes, templates)

    def drop_text_tower(self) -> None:
        """Free the CLIP text tower where text embeddings come from elsewhere (`encode_classes` then raises)."""
        self.backbone.drop_text_tower()

    # Images -------------------------------------------------------------------------------------
    def preprocess(self, images: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """uint8 `(B, 3, H, W)` or a list of `(3, H_i, W_i)` -> normalised `(B, 3, S, S)` float."""
        if isinstance(images, torch.Tensor):
            images = [images] if images.dim() == 3 else list(images)
        size = (self.config.image_size, self.config.image_size)
        batch = []
        for i, image in enumerate(images):
            if image.dim() != 3 or image.shape[0] != 3:
                raise ValueError(f"image {i} must be a (3, H, W) RGB tensor, got shape {tuple(image.shape)}")
            x = (image.to(self.device, torch.float32)[None] - self.pixel_mean) / self.pixel_std
            batch.append(F.interpolate(x, size=size, mode="bilinear", align_corners=False))
        return torch.cat(batch)

    def dense_features(self, images: torch.Tensor | Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """uint8 images -> backbone maps `res2..res5` and `clip_vis_dense`."""
        return self.backbone.dense_features(self.preprocess(images))

    def _decode(
        self,
        images: torch.Tensor | Sequence[torch.Tensor],
        text: torch.Tensor,
        top_k: int | None,
        precision: str = "float32",
    ) -> list[StageLogits]:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if text.dim() != 3 or text.shape[1] != self.config.num_templates:
            raise ValueError(
                f"text must be (T, {self.config.num_templates}, D) from encode_classes, got {tuple(text.shape)}"
            )
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None (exact), got {top_k}")
        with self.autocast(precision):
            features = self.dense_features(images)
        cost, appearance = self.decoder_inputs(features, text, precision)
        with self.decoder_autocast(precision):
            outputs = self.decoder(cost, appearance, self.pooling, top_k)
        for stage in outputs:
            stage.logits = stage.logits.float()
        return outputs

    def autocast(self, precision: str) -> contextlib.AbstractContextManager:
        """bfloat16's autocast on the model's device; for float32 none of its own, so a caller's
        (mixed-precision training) applies."""
        if precision == "bfloat16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def decoder_precision(self, precision: str) -> str:
        """The decoder's precision in inference at `precision` (`ops.decoder_precision`: on a CPU
        with the fused kernels bfloat16 decodes in float32; only the backbone runs in bfloat16)."""
        return ops.decoder_precision(self.device, precision)

    def decoder_inputs(
        self, features: dict[str, torch.Tensor], text: torch.Tensor, precision: str
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """The decoder's cost volume and appearance maps `res4, res3, res2` from the backbone's
        `features`; all float32 where `decoder_precision` lowers `precision`, a caller's autocast
        notwithstanding."""
        lowered = self.decoder_precision(precision) != precision
        with torch.autocast(self.device.type, enabled=False) if lowered else contextlib.nullcontext():
            cost = cost_volume(features["clip_vis_dense"].float(), text.to(self.device, torch.float32))
        appearance = (features["res4"], features["res3"], features["res2"])
        if lowered:
            appearance = tuple(feature.float() for feature in appearance)
        return cost, appearance

    def decoder_autocast(self, precision: str) -> contextlib.AbstractContextManager:
        """The decoder's context at `precision`; where `decoder_precision` lowers it to float32,
        autocast off, a caller's included (the kernels take float32 only)."""
        if self.decoder_precision(precision) != precision:
            return torch.autocast(self.device.type, enabled=False)
        return self.autocast(precision)

    def forward_logits(
        self, images: torch.Tensor | Sequence[torch.Tensor], text: torch.Tensor, top_k: int | None = None
    ) -> list[torch.Tensor]:
        """uint8 images -> `[head, head0, head1, head2]` logits, each `(B, T, h, w)`.

        In training mode this is the training forward (class-attention pooling `train_pooling`).
        With `top_k`, the logits of classes rejected before a head are `-inf` there.
        """
        outputs = self._decode(images, text, top_k)
        b, t = len(outputs[1].rows.counts), text.shape[0]
        dense = []
        for stage in outputs:
            full = stage.logits.new_full((b, t, *stage.logits.shape[-2:]), float("-inf"))
            full[stage.rows.image_index, stage.rows.class_index] = stage.logits
            dense.append(full)
        return dense

    def forward(self, images: torch.Tensor | Sequence[torch.Tensor], text: torch.Tensor) -> list[torch.Tensor]:
        return self.forward_logits(images, text)

    @torch.no_grad()
    def predict_low_res(
        self,
        images: torch.Tensor | Sequence[torch.Tensor],
        text: torch.Tensor,
        top_k: int | None = None,
        precision: str = "float32",
    ) -> list[LowResolution]:
        """Per image: the kept classes and their probabilities at the decoder's resolution."""
        final, _, after_head0, after_head1 = self._decode(images, text, top_k, precision)
        after = {"head0": after_head0.rows, "head1": after_head1.rows, "head2": final.rows}
        results = []
        for i, chunk in enumerate(final.logits.split(final.rows.counts)):
            kept_after = {name: rows.class_index[rows.image_index == i] for name, rows in after.items()}
            results.append(LowResolution(torch.sigmoid(chunk), kept_after["head2"], kept_after))
        return results

    @torch.no_grad()
    def predict_batch(
        self,
        images: Sequence[torch.Tensor],
        text: torch.Tensor,
        top_k: int | None = None,
        output_sizes: Sequence[tuple[int, int]] | None = None,
        precision: str = "float32",
    ) -> list[Prediction]:
        """Label a batch of uint8 `(3, H_i, W_i)` images of any sizes against one taxonomy.

        Each image gets what it would get alone: early rejection keeps its own class set. The
        192x192 probabilities are resized in one step (bilinear, `align_corners=False`) to the
        image's own size, or to `output_sizes[i]`. Only kept classes are resized; rejected ones
        are exactly 0 at any size.
        """
        images = list(images)
        sizes = _output_sizes(images, output_sizes)
        return [
            Prediction(resize_probabilities(low.probs, size), low.kept, low.kept_after, text.shape[0])
            for low, size in zip(self.predict_low_res(images, text, top_k, precision), sizes)
        ]

    @torch.no_grad()
    def label_batch(
        self,
        images: Sequence[torch.Tensor],
        text: torch.Tensor,
        top_k: int | None = None,
        output_sizes: Sequence[tuple[int, int]] | None = None,
        class_chunk: int = 16,
        precision: str = "float32",
        runner_up: bool = False,
        class_groups: torch.Tensor | None = None,
        margins: bool = False,
    ) -> list[Labeling]:
        """Like `predict_batch`, but keeps only the argmax and its probability (with `runner_up`,
        the second class too; with `margins`, each pixel's margin, `_margin`).

        `class_groups` (one id per class) makes the runner-up the best class of another group: with
        classes that are prompts of one concept, the second is the best rival concept, not a
        synonym. Classes are resized `class_chunk` at a time with a running maximum, and a large
        image a band of rows at a time (`RESIZED_BYTES`), so memory stays bounded whatever the
        taxonomy and image sizes. Ties go to the lower class index,
        as `argmax` does.
        """
        images = list(images)
        sizes = _output_sizes(images, output_sizes)
        results = []
        for low, size in zip(self.predict_low_res(images, text, top_k, precision), sizes):
            labels, confidence, second = _label_rows(low, size, class_chunk, runner_up, class_groups)
            margin = _margin(low, class_groups, size) if margins else None
            results.append(Labeling(labels, confidence, low.kept, low.kept_after, second, margin))
        return results

    @torch.no_grad()
    def predict(
        self,
        image: torch.Tensor,
        text: torch.Tensor,
        top_k: int | None = None,
        output_size: tuple[int, int] | None = None,
        precision: str = "float32",
    ) -> torch.Tensor:
        """One uint8 `(3, H, W)` image -> `(T, H, W)` probabilities (or at `output_size`)."""
        if image.dim() != 3:
            raise ValueError(f"predict takes one (3, H, W) image, got shape {tuple(image.shape)}; use predict_batch")
        sizes = None if output_size is None else [tuple(output_size)]
        return self.predict_batch([image], text, top_k, sizes, precision)[0].probs


def _label_rows(
    low: LowResolution, size: tuple[int, int], class_chunk: int, runner_up: bool, class_groups: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The labels, confidence and runner-up of `low` resized to `size`: `class_chunk` classes at a
    time, in one step where a chunk at full size fits `RESIZED_BYTES` (the protocol's resize),
    else a band of rows at a time (`RowResize`: the same within float32 rounding)."""
    height, width = size
    band = max(1, RESIZED_BYTES // (4 * min(class_chunk, low.kept.numel()) * width))
    chunks = range(0, low.kept.numel(), class_chunk)
    if band >= height:
        top = RunningTop(runner_up, class_groups)
        for start in chunks:
            top.add(resize_probabilities(low.probs[start : start + class_chunk], size), low.kept[start : start + class_chunk])
        return top.best[1], top.best[0], top.runner_up()
    rows = RowResize(height, low.probs.shape[-2], low.probs.device)
    labels = torch.empty(size, dtype=torch.long, device=low.probs.device)
    confidence = torch.empty(size, device=low.probs.device)
    second = torch.empty(size, dtype=torch.long, device=low.probs.device) if runner_up else None
    for first_row in range(0, height, band):
        out = slice(first_row, min(height, first_row + band))
        top = RunningTop(runner_up, class_groups)
        for start in chunks:
            top.add(rows.rows(low.probs[start : start + class_chunk], out, width), low.kept[start : start + class_chunk])
        labels[out], confidence[out] = top.best[1], top.best[0]
        if runner_up:
            second[out] = top.runner_up()
    return labels, confidence, second


def _margin(low: LowResolution, class_groups: torch.Tensor | None, size: tuple[int, int]) -> torch.Tensor:
    """Per pixel, the best kept class's probability minus the best of another group's (0 if none),
    at the model's output resolution, then resized to `size` as the probabilities are. (At full
    resolution it would cost a second pass over every kept class's resized map, about as much as
    the labels themselves; the margin only ranks pixels and images by doubt.)"""
    return resize_probabilities(margin(low.probs, low.kept, class_groups)[None], size)[0]


def _output_sizes(images: Sequence[torch.Tensor], output_sizes: Sequence[tuple[int, int]] | None) -> list[tuple[int, int]]:
    if output_sizes is None:
        return [tuple(image.shape[-2:]) for image in images]
    if len(output_sizes) != len(images):
        raise ValueError(f"got {len(output_sizes)} output sizes for {len(images)} images")
    return [tuple(size) for size in output_sizes]


def build_sed(config: SEDConfig | None = None) -> SED:
    """Build an SED with random weights (no download); load weights with `load_checkpoint`."""
    return SED(config or SEDConfig())

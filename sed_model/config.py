"""SED configuration: the named presets of the paper and the decoder's hyper-parameters.

A preset is data (OpenCLIP's habit): an OpenCLIP architecture name plus the pretrained tag the paper
started from. The decoder's appearance-guidance input widths are not configured here: they follow
from the backbone the config builds (see `SED.__init__`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import open_clip

# The paper's two released models (SED, CVPR 2024, Table 1).
PRESETS: dict[str, dict[str, str]] = {
    "convnext_b": {"open_clip_model": "convnext_base_w_320", "pretrained_tag": "laion_aesthetic_s13b_b82k"},
    "convnext_l": {"open_clip_model": "convnext_large_d_320", "pretrained_tag": "laion2b_s29b_b131k_ft_soup"},
}

# CLIP's pixel statistics on the 0..255 scale, as the paper's config sets them.
CLIP_PIXEL_MEAN = (122.7709383, 116.7460125, 104.09373615)
CLIP_PIXEL_STD = (68.5005327, 66.6321579, 70.3231630)


class UnknownModelError(ValueError):
    """A `clip_model` name that is neither a preset nor an OpenCLIP architecture."""


@dataclass(frozen=True)
class SEDConfig:
    """Everything needed to build an SED model (weights excluded).

    `clip_model` is a preset name (`convnext_b`, `convnext_l`), an OpenCLIP architecture name, or an
    OpenCLIP model config dict (`open_clip.model.CLIP(**cfg)`), which is how tests build tiny models.

    Class-attention pooling is a setting, not a weight: the paper trains with 2x2 and evaluates every
    benchmark with 1x1, so labelling follows the evaluation protocol by default.
    """

    clip_model: str | dict[str, Any] = "convnext_b"
    hidden_dim: int = 128
    decoder_dims: tuple[int, int, int] = (64, 32, 16)
    guidance_dims: tuple[int, int, int] = (32, 16, 8)
    num_templates: int = 80
    cnext_kernel_size: int = 9
    attention_heads: int = 4
    train_pooling: int = 2
    eval_pooling: int = 1
    image_size: int = 768
    pixel_mean: tuple[float, float, float] = CLIP_PIXEL_MEAN
    pixel_std: tuple[float, float, float] = CLIP_PIXEL_STD

    def __post_init__(self) -> None:
        if self.image_size % 32:
            raise ValueError(f"SEDConfig.image_size must be a multiple of 32, got {self.image_size}")
        for name in ("train_pooling", "eval_pooling"):
            if getattr(self, name) < 1:
                raise ValueError(f"SEDConfig.{name} must be >= 1, got {getattr(self, name)}")
        if len(self.decoder_dims) != 3 or len(self.guidance_dims) != 3:
            raise ValueError("SEDConfig.decoder_dims and guidance_dims need exactly three entries")
        # The up-stages run hidden_dim -> decoder_dims[0] -> [1] -> [2]; each `up` outputs C - g channels.
        widths = (self.hidden_dim, *self.decoder_dims[:2])
        for c, g in zip(widths, self.guidance_dims):
            if g >= c:
                raise ValueError(f"SEDConfig: guidance width {g} must be smaller than stage width {c}")
        for c in self.decoder_dims:
            if c % 16:
                raise ValueError(f"SEDConfig.decoder_dims must be multiples of 16 (GroupNorm C/16), got {c}")

    def open_clip_config(self) -> dict[str, Any]:
        """The OpenCLIP model config dict this SED is built on (a copy; safe to modify)."""
        return resolve_clip_config(self.clip_model)[0]

    def describe(self) -> dict[str, Any]:
        """A JSON-serialisable description, saved inside the project's checkpoints."""
        return {
            "clip_model": copy.deepcopy(self.clip_model),
            "hidden_dim": self.hidden_dim,
            "decoder_dims": list(self.decoder_dims),
            "guidance_dims": list(self.guidance_dims),
            "num_templates": self.num_templates,
            "cnext_kernel_size": self.cnext_kernel_size,
            "attention_heads": self.attention_heads,
            "train_pooling": self.train_pooling,
            "eval_pooling": self.eval_pooling,
            "image_size": self.image_size,
            "pixel_mean": list(self.pixel_mean),
            "pixel_std": list(self.pixel_std),
        }

    @classmethod
    def from_description(cls, desc: dict[str, Any]) -> "SEDConfig":
        tuples = {"decoder_dims", "guidance_dims", "pixel_mean", "pixel_std"}
        return cls(**{k: tuple(v) if k in tuples else v for k, v in desc.items()})


def resolve_clip_config(clip_model: str | dict[str, Any]) -> tuple[dict[str, Any], str | None, str | None]:
    """Return (OpenCLIP config dict, architecture name or None, pretrained tag or None)."""
    if isinstance(clip_model, dict):
        if "vision_cfg" not in clip_model or "embed_dim" not in clip_model:
            raise UnknownModelError("an OpenCLIP config dict needs at least 'embed_dim' and 'vision_cfg'")
        return copy.deepcopy(clip_model), None, None
    if not isinstance(clip_model, str):
        raise UnknownModelError(f"clip_model must be a preset name or a config dict, got {type(clip_model).__name__}")
    preset = PRESETS.get(clip_model)
    arch = preset["open_clip_model"] if preset else clip_model
    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise UnknownModelError(
            f"unknown clip_model {clip_model!r}: known presets are {sorted(PRESETS)}; "
            "any OpenCLIP architecture name (open_clip.list_models()) or config dict also works"
        )
    if "timm_model_name" not in cfg.get("vision_cfg", {}):
        raise UnknownModelError(
            f"clip_model {clip_model!r} is not a timm ConvNeXt image tower; SED needs a convolutional "
            "backbone with stride-4..32 features"
        )
    return copy.deepcopy(cfg), arch, preset["pretrained_tag"] if preset else None

"""The CLIP part's initial weights from OpenCLIP: where the paper's training starts.

SED trains from an OpenCLIP model (ConvNeXt-B: `laion_aesthetic_s13b_b82k`) with a freshly
initialised decoder. `clip_weights` is either an OpenCLIP pretrained tag of the model's
architecture, or `"pretrained"` for the preset's own tag (OpenCLIP downloads it into its cache:
this needs the network), or a path/URL of an OpenCLIP checkpoint file (read through fsspec; how an
offline cluster gets them). Loaded strictly with OpenCLIP's own loader into `model.backbone.clip`.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import fsspec
import open_clip

from .model import SED

PRESET_TAG = "pretrained"
CHECKPOINT_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors")


class ClipWeightsError(ValueError):
    """CLIP weights that cannot be found or do not fit the model; the message names them."""


def is_clip_weights_file(clip_weights: str) -> bool:
    """A path or URL of a checkpoint file, not an OpenCLIP tag (tags have no '/' or file suffix)."""
    return "/" in clip_weights or clip_weights.endswith(CHECKPOINT_SUFFIXES) or os.path.exists(clip_weights)


def pretrained_config(architecture: str | None, preset_tag: str | None, tag: str) -> dict[str, Any]:
    """OpenCLIP's download config of `tag` ('pretrained': the preset's) for `architecture`, checked offline."""
    if architecture is None:
        raise ClipWeightsError(f"clip_weights {tag!r}: a pretrained tag needs an OpenCLIP architecture, not a config dict")
    if tag == PRESET_TAG:
        if preset_tag is None:
            raise ClipWeightsError(f"clip_weights 'pretrained': {architecture} is not a preset; name an OpenCLIP tag")
        tag = preset_tag
    config = open_clip.get_pretrained_cfg(architecture, tag)
    if not config:
        known = open_clip.list_pretrained_tags_by_model(architecture)
        raise ClipWeightsError(f"clip_weights {tag!r} is not an OpenCLIP tag of {architecture}; known: {known}")
    return config


def _pretrained_file(model: SED, tag: str) -> str:
    config = pretrained_config(model.open_clip_model, model.pretrained_tag, tag)
    try:
        return open_clip.download_pretrained(config)
    except Exception as exc:  # no network, or the hub refused: say which weights could not be had
        source = config.get("hf_hub") or config.get("url")
        raise ClipWeightsError(f"cannot download OpenCLIP weights {source} for clip_weights {tag!r}: {type(exc).__name__}: {exc}") from exc


def load_clip_weights(model: SED, clip_weights: str, storage_options: dict[str, Any] | None = None) -> None:
    """Replace the CLIP part's weights (image and text towers) with OpenCLIP's; the decoder is untouched."""
    if not is_clip_weights_file(clip_weights):
        _load(model, _pretrained_file(model, clip_weights), clip_weights)
        return
    if "://" not in clip_weights:
        _load(model, clip_weights, clip_weights)
        return
    with tempfile.TemporaryDirectory() as tmp:  # OpenCLIP's loader reads local files
        # OpenCLIP picks its reader by the file's suffix: keep the name, without a URL's query.
        local = os.path.join(tmp, os.path.basename(clip_weights.split("?")[0].rstrip("/")) or "clip.bin")
        try:
            with fsspec.open(clip_weights, "rb", **(storage_options or {})) as source, open(local, "wb") as target:
                while chunk := source.read(1 << 24):
                    target.write(chunk)
        except (OSError, ValueError) as exc:
            raise ClipWeightsError(f"cannot read clip_weights {clip_weights!r}: {type(exc).__name__}: {exc}") from exc
        _load(model, local, clip_weights)


def _load(model: SED, path: str, name: str) -> None:
    if not os.path.exists(path):
        raise ClipWeightsError(f"clip_weights {name!r}: no such file")
    try:
        open_clip.load_checkpoint(model.backbone.clip, path, strict=True, weights_only=True)
    # Another architecture: torch raises on missing/unexpected keys and shapes, OpenCLIP's position
    # embedding resizer asserts on a different width.
    except (RuntimeError, AssertionError) as exc:
        raise ClipWeightsError(f"clip_weights {name!r} do not fit this model's CLIP: {exc}") from exc
    except Exception as exc:  # not a checkpoint at all: a corrupt download, an HTML error page...
        raise ClipWeightsError(f"clip_weights {name!r} is not a readable OpenCLIP checkpoint: {type(exc).__name__}: {exc}") from exc

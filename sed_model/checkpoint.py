"""The only place that knows checkpoint formats.

Two formats, chosen by name (explicitly, or from the file extension), never by sniffing keys:
- `official`: the paper's released `.pth` files, `{"model": state_dict, ...}` with keys
  `sem_seg_head.predictor.clip_model.<open_clip key>` and `sem_seg_head.predictor.transformer.<decoder key>`;
  read with `torch.load(weights_only=True)`, so a pickle that carries code is refused.
- `safetensors`: the project's own files: the model's state dict plus the `SEDConfig` that built it.

Files are read through fsspec, so any URL works (`s3://`, `gs://`, `file://`, `memory://`, a path).
Loading is strict: every key used, every parameter filled, shapes equal; otherwise a `CheckpointError`
that lists what is missing, unexpected or mis-shaped.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import struct
from dataclasses import dataclass
from typing import Any

import fsspec
import safetensors.torch
import torch
from torch import nn

from .config import SEDConfig

OFFICIAL = "official"
SAFETENSORS = "safetensors"
FORMATS = (OFFICIAL, SAFETENSORS)
_EXTENSIONS = {".pth": OFFICIAL, ".pt": OFFICIAL, ".safetensors": SAFETENSORS}

# The paper's key prefixes -> this project's module names.
OFFICIAL_PREFIXES = {
    "sem_seg_head.predictor.clip_model.": "backbone.clip.",
    "sem_seg_head.predictor.transformer.": "decoder.",
}
PROJECT_FORMAT_NAME = "sed-label"
PROJECT_FORMAT_VERSION = "1"
_MAX_LISTED = 20


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the model."""


@dataclass(frozen=True)
class CheckpointInfo:
    url: str
    format: str
    sha256: str
    num_tensors: int
    config: dict[str, Any] | None = None  # the SEDConfig description stored in project checkpoints


def checkpoint_format(url: str, format: str | None = None) -> str:
    """The format to read `url` as: `format` if given, else from the extension; otherwise an error."""
    if format is not None:
        if format not in FORMATS:
            raise CheckpointError(f"unknown checkpoint format {format!r}; known formats: {list(FORMATS)}")
        return format
    path = url.split("?", 1)[0].lower()
    for extension, name in _EXTENSIONS.items():
        if path.endswith(extension):
            return name
    raise CheckpointError(
        f"cannot tell the format of checkpoint {url!r} from its extension "
        f"({', '.join(_EXTENSIONS)}); pass format= one of {list(FORMATS)}"
    )


def _read_bytes(url: str, storage_options: dict[str, Any] | None) -> bytes:
    try:
        with fsspec.open(url, "rb", **(storage_options or {})) as f:
            return f.read()
    except Exception as exc:  # fsspec backends raise many types (OSError, botocore, aiohttp...)
        raise CheckpointError(f"cannot read checkpoint {url!r}: {type(exc).__name__}: {exc}") from exc


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors file (an 8-byte header length, then the JSON header)."""
    (header_length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_length])
    return header.get("__metadata__") or {}


def official_to_project_keys(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename the paper's keys; return (renamed state dict, keys under neither known prefix)."""
    renamed, unknown = {}, []
    for key, value in state_dict.items():
        for prefix, replacement in OFFICIAL_PREFIXES.items():
            if key.startswith(prefix):
                renamed[replacement + key[len(prefix) :]] = value
                break
        else:
            unknown.append(key)
    return renamed, unknown


def read_checkpoint(
    url: str, format: str | None = None, storage_options: dict[str, Any] | None = None
) -> tuple[dict[str, torch.Tensor], CheckpointInfo]:
    """Read a checkpoint into a state dict with this project's key names (CPU tensors)."""
    fmt = checkpoint_format(url, format)
    data = _read_bytes(url, storage_options)
    digest = hashlib.sha256(data).hexdigest()
    config = None
    if fmt == OFFICIAL:
        try:
            payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(
                f"{url!r} was refused by torch.load(weights_only=True): it is not a plain tensor "
                f"checkpoint (it may carry code). {exc}"
            ) from exc
        except Exception as exc:
            raise CheckpointError(f"{url!r} is not a PyTorch checkpoint: {type(exc).__name__}: {exc}") from exc
        if not isinstance(payload, dict) or not isinstance(payload.get("model"), dict):
            raise CheckpointError(
                f"{url!r} is not in the paper's released format: expected a dict with a 'model' state dict"
            )
        state_dict, unknown = official_to_project_keys(payload["model"])
        if unknown:
            raise CheckpointError(
                f"{url!r} has {len(unknown)} keys outside {list(OFFICIAL_PREFIXES)}: {_listing(unknown)}"
            )
    else:
        try:
            metadata = _safetensors_metadata(data)
            state_dict = safetensors.torch.load(data)
        except Exception as exc:
            raise CheckpointError(f"{url!r} is not a safetensors file: {type(exc).__name__}: {exc}") from exc
        if metadata.get("format") != PROJECT_FORMAT_NAME:
            raise CheckpointError(f"{url!r} is a safetensors file but not a {PROJECT_FORMAT_NAME} checkpoint")
        if metadata.get("format_version") != PROJECT_FORMAT_VERSION:
            raise CheckpointError(
                f"{url!r} has checkpoint format version {metadata.get('format_version')!r}; "
                f"this version reads {PROJECT_FORMAT_VERSION!r}"
            )
        config = json.loads(metadata["config"])
    return state_dict, CheckpointInfo(url, fmt, digest, len(state_dict), config)


def load_state_dict_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load with every key used and every parameter filled, or raise listing the differences."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_listing(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches: {_listing(mismatched)}")
    if problems:
        raise CheckpointError(f"{source} does not fit this model ({'; '.join(problems)})")
    model.load_state_dict(state_dict, strict=True)


def load_checkpoint(
    model: nn.Module,
    url: str,
    format: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> CheckpointInfo:
    """Load the paper's `.pth` or the project's `.safetensors` from a path or fsspec URL, strictly."""
    state_dict, info = read_checkpoint(url, format, storage_options)
    load_state_dict_strict(model, state_dict, source=f"checkpoint {url!r}")
    return info


def save_checkpoint(
    model: nn.Module, url: str, config: SEDConfig | None = None, storage_options: dict[str, Any] | None = None
) -> CheckpointInfo:
    """Write the project's safetensors checkpoint (weights + the config that builds the model)."""
    config = config or getattr(model, "config", None)
    if not isinstance(config, SEDConfig):
        raise CheckpointError("save_checkpoint needs the model's SEDConfig (model.config or config=)")
    if checkpoint_format(url) != SAFETENSORS:
        raise CheckpointError(f"the project's checkpoints are .safetensors files, got {url!r}")
    state_dict = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    metadata = {
        "format": PROJECT_FORMAT_NAME,
        "format_version": PROJECT_FORMAT_VERSION,
        "config": json.dumps(config.describe()),
    }
    data = safetensors.torch.save(state_dict, metadata=metadata)
    with fsspec.open(url, "wb", **(storage_options or {})) as f:
        f.write(data)
    return CheckpointInfo(url, SAFETENSORS, hashlib.sha256(data).hexdigest(), len(state_dict), config.describe())


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f", ... ({len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else "")

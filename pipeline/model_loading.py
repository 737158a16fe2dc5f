"""Build the job's SED from its model spec, and identify its weights by hash."""

from __future__ import annotations

import hashlib
import json

import torch

import sed_model
from schemas import ModelSpec


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("inference.device is 'cuda' but this worker sees no CUDA device")
    return torch.device(device)


def model_config(spec: ModelSpec) -> sed_model.SEDConfig:
    return sed_model.SEDConfig(clip_model=spec.clip_model, image_size=spec.image_size)


def random_weights_hash(spec: ModelSpec) -> str:
    """Stands in for a checkpoint hash when the job runs on seeded random weights (the demo)."""
    config = model_config(spec).describe()
    identity = {"random_seed": spec.seed, "config": config}
    if spec.clip_weights is not None:  # only then: outputs written before clip_weights existed keep their hash
        identity["clip_weights"] = spec.clip_weights
    payload = json.dumps(identity, sort_keys=True)
    return "random-" + hashlib.sha256(payload.encode()).hexdigest()


def load_model(spec: ModelSpec, device: torch.device | str = "cpu") -> tuple[sed_model.SED, str]:
    """The model in eval mode on `device`, and the sha256 of its checkpoint (or a random-weights id)."""
    if spec.weights is None:
        torch.manual_seed(spec.seed)
        model = sed_model.build_sed(model_config(spec))
        if spec.clip_weights is not None:  # OpenCLIP's CLIP, a random decoder: where training starts
            sed_model.load_clip_weights(model, spec.clip_weights, spec.storage_options)
        return model.to(device).eval(), random_weights_hash(spec)
    model, info = sed_model.create_model(
        model_config(spec), spec.weights, device, spec.storage_options
    )
    return model, info.sha256


def encode_taxonomy(spec: ModelSpec, classes: list[str], templates: list[str], device: str = "cpu") -> tuple[torch.Tensor, str]:
    """Text embeddings `(T, P, D)` (computed on `device`, returned on CPU), and the checkpoint hash
    they were computed with."""
    model, checkpoint_hash = load_model(spec, resolve_device(device))
    return model.encode_classes(classes, templates).cpu(), checkpoint_hash

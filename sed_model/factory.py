"""One entry point to a ready model: build from a config, then load weights (OpenCLIP's order)."""

from __future__ import annotations

from typing import Any

import torch

from .checkpoint import SAFETENSORS, CheckpointInfo, checkpoint_format, load_state_dict_strict, read_checkpoint
from .config import SEDConfig
from .model import SED, build_sed


def create_model(
    config: SEDConfig | None = None,
    weights: str | None = None,
    device: str | torch.device = "cpu",
    storage_options: dict[str, Any] | None = None,
) -> tuple[SED, CheckpointInfo | None]:
    """Build an SED in eval mode on `device`, with `weights` loaded strictly if given.

    A project checkpoint (`.safetensors`) carries its own config; with `config=None` it is used.
    """
    info = None
    state_dict = None
    if weights is not None:
        state_dict, info = read_checkpoint(weights, storage_options=storage_options)
        if config is None and checkpoint_format(weights) == SAFETENSORS:
            config = SEDConfig.from_description(info.config)
    model = build_sed(config)
    if state_dict is not None:
        load_state_dict_strict(model, state_dict, source=f"checkpoint {weights!r}")
    return model.to(device).eval(), info

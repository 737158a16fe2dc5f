"""The paper's training recipe in pure torch: what is trained, the optimiser, the schedule, one step.

As SED's code sets it up (detectron2's optimiser and solver settings of the released configs):
- trained: the whole decoder and the CLIP image tower (`clip.visual.*`); every other CLIP parameter
  (text tower, token and positional embeddings, text projection, logit scale) is frozen;
- AdamW, lr 2e-4, the CLIP image tower at 0.01x; weight decay 1e-4, except 0 for normalisation
  layers (LayerNorm, timm's LayerNorm2d, GroupNorm) and embeddings;
- cosine schedule from lr to 0 over the run, no warm-up;
- gradient clipping of all trained parameters together at total L2 norm 0.01;
- the four BCE losses of `sed_loss`, summed.

Mixed precision (the pipeline's default on GPU; "float32" trains without autocast): the forward
and the losses under `torch.autocast` in bfloat16, or in float16 with a `GradScaler` (gradients
unscaled before clipping, so the clipping norm means the same).

Executors (Ray Train in `pipeline`, a plain loop in tests) call `train_step` once per iteration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .loss import IGNORE_LABEL, class_logits, sed_loss
from .model import SED

IMAGE_TOWER_PREFIX = "backbone.clip.visual."
TRAINING_PRECISIONS = ("float32", "bfloat16", "float16")
AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
NO_DECAY_MODULES = (nn.LayerNorm, nn.GroupNorm, nn.Embedding)  # timm's LayerNorm2d is a LayerNorm


@dataclass(frozen=True)
class Recipe:
    """The optimisation settings; the defaults are the paper's."""

    lr: float = 2e-4
    image_tower_lr_multiplier: float = 0.01
    weight_decay: float = 1e-4
    iterations: int = 80_000
    clip_grad_norm: float = 0.01
    exclude_ignored: bool = False  # the paper counts ignored pixels as negatives of every class
    precision: str = "float32"  # autocast dtype of the forward; "float16" needs a GradScaler

    def __post_init__(self) -> None:
        if self.precision not in TRAINING_PRECISIONS:
            raise ValueError(f"recipe.precision must be one of {TRAINING_PRECISIONS}, got {self.precision!r}")
        for name in ("lr", "iterations", "clip_grad_norm"):
            if not getattr(self, name) > 0:
                raise ValueError(f"recipe.{name} must be > 0, got {getattr(self, name)}")
        if self.image_tower_lr_multiplier < 0 or self.weight_decay < 0:
            raise ValueError("recipe.image_tower_lr_multiplier and recipe.weight_decay must be >= 0")


def freeze_for_training(model: SED) -> list[nn.Parameter]:
    """Freeze what the paper does not train; return the trained parameters (decoder + image tower)."""
    trained = []
    for name, parameter in model.named_parameters():
        train = name.startswith(("decoder.", IMAGE_TOWER_PREFIX))
        parameter.requires_grad_(train)
        if train:
            trained.append(parameter)
    if not any(name.startswith("decoder.") for name, p in model.named_parameters() if p.requires_grad):
        raise ValueError("the model has no decoder parameters to train")
    return trained


def parameter_groups(model: SED, recipe: Recipe) -> list[dict[str, Any]]:
    """AdamW parameter groups of the trained parameters: (image tower or decoder) x (decay or not)."""
    no_decay = {
        id(parameter)
        for module in model.modules()
        if isinstance(module, NO_DECAY_MODULES)
        for parameter in module.parameters(recurse=False)
    }
    groups: dict[tuple[bool, bool], dict[str, Any]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        image_tower = name.startswith(IMAGE_TOWER_PREFIX)
        decays = id(parameter) not in no_decay
        key = (image_tower, decays)
        if key not in groups:
            groups[key] = {
                "params": [],
                "names": [],
                "lr": recipe.lr * (recipe.image_tower_lr_multiplier if image_tower else 1.0),
                "weight_decay": recipe.weight_decay if decays else 0.0,
            }
        groups[key]["params"].append(parameter)
        groups[key]["names"].append(name)
    return [groups[key] for key in sorted(groups)]


def build_optimizer(model: SED, recipe: Recipe) -> torch.optim.AdamW:
    """Freeze the untrained parts and return AdamW over the recipe's parameter groups."""
    freeze_for_training(model)
    return torch.optim.AdamW(parameter_groups(model, recipe), lr=recipe.lr, weight_decay=recipe.weight_decay)


def cosine_factor(iteration: int, iterations: int) -> float:
    """The learning rate's factor at `iteration`: cosine from 1 to 0 over `iterations`, no warm-up."""
    return 0.5 * (1.0 + math.cos(math.pi * min(iteration, iterations) / iterations))


def build_schedule(optimizer: torch.optim.Optimizer, recipe: Recipe) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda iteration: cosine_factor(iteration, recipe.iterations))


def training_precision(requested: str, device: torch.device | str) -> str:
    """Resolve "auto": bfloat16 on GPUs that run it, float16 on older GPUs, float32 on CPU."""
    if requested != "auto":
        return requested
    device = torch.device(device)
    if device.type != "cuda":
        return "float32"
    # Native bfloat16 only (compute capability 8.0+): emulated bfloat16 on older GPUs is slow.
    return "bfloat16" if torch.cuda.is_bf16_supported(including_emulation=False) else "float16"


def build_grad_scaler(recipe: Recipe, device: torch.device | str) -> torch.amp.GradScaler | None:
    """float16 needs loss scaling (its range underflows small gradients); other precisions do not."""
    return torch.amp.GradScaler(torch.device(device).type) if recipe.precision == "float16" else None


def train_step(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    text: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    recipe: Recipe,
    ignore_label: int = IGNORE_LABEL,
    scaler: torch.amp.GradScaler | None = None,
    prompt_class: torch.Tensor | None = None,
) -> dict[str, float]:
    """One iteration: forward in training mode, the four losses, backward, clipping, AdamW, schedule.

    `model` is an `SED` or a wrapper calling its forward (DDP); `images` `(B, 3, H, W)` uint8,
    `targets` `(B, H, W)` int64 with `ignore_label`, `text` the classes' `(T, P, D)` embeddings;
    `scaler` from `build_grad_scaler` (float16 only). With `prompt_class` (per row of `text`, its
    class in `targets`, or -1), `text` holds prompts and the loss is on the classes they form
    (`class_logits`). Returns the losses, their sum, the gradient norm before clipping and the
    decoder's learning rate in this step.
    """
    if (recipe.precision == "float16") != (scaler is not None):
        raise ValueError("float16 training needs a GradScaler (build_grad_scaler), and only float16 takes one")
    model.train()
    optimizer.zero_grad(set_to_none=True)
    dtype = AUTOCAST_DTYPES.get(recipe.precision)
    with torch.autocast(images.device.type, dtype=dtype, enabled=dtype is not None):
        logits = model(images, text)
        if prompt_class is not None:
            num_classes = int(prompt_class.max()) + 1
            logits = [class_logits(output, prompt_class, num_classes) for output in logits]
        losses = sed_loss(logits, targets, ignore_label, exclude_ignored=recipe.exclude_ignored)
    total = sum(losses.values())
    trained = [p for group in optimizer.param_groups for p in group["params"]]
    lr = optimizer.param_groups[0]["lr"]
    if scaler is None:
        total.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(trained, recipe.clip_grad_norm)
        optimizer.step()
    else:
        scaler.scale(total).backward()
        scaler.unscale_(optimizer)  # clip the true gradients
        grad_norm = torch.nn.utils.clip_grad_norm_(trained, recipe.clip_grad_norm)
        scaler.step(optimizer)  # skipped when the gradients overflowed
        scaler.update()
    schedule.step()
    record = {name: float(value.detach()) for name, value in losses.items()}
    record.update(loss=float(total.detach()), grad_norm=float(grad_norm), lr=lr)
    return record

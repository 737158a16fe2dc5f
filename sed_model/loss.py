"""SED's training loss: binary cross-entropy on each of the four heads, against one-hot labels."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

IGNORE_LABEL = 255


def class_logits(prompt_logits: torch.Tensor, prompt_class: torch.Tensor, num_classes: int) -> torch.Tensor:
    """`(B, P, h, w)` logits of prompts -> `(B, C, h, w)` logits of the classes they form.

    A class of several prompts has the probability of its best prompt, and sigmoid is monotonic,
    so its logit is the maximum of its prompts' logits (the gradient goes to the prompt that wins
    each pixel). Prompts of class -1 (distractors: no ground truth names them) are left out.
    """
    kept = prompt_class >= 0
    logits = prompt_logits[:, kept]
    index = prompt_class[kept].view(1, -1, 1, 1).expand_as(logits)
    shape = (logits.shape[0], num_classes, *logits.shape[2:])
    return logits.new_full(shape, float("-inf")).scatter_reduce(1, index, logits, reduce="amax", include_self=False)


def sed_loss(
    logits: Sequence[torch.Tensor],
    targets: torch.Tensor,
    ignore_label: int = IGNORE_LABEL,
    exclude_ignored: bool = False,
) -> dict[str, torch.Tensor]:
    """Four BCE losses `loss_sem_seg_0..3`, one per output of `[head, head0, head1, head2]`.

    Each output `(B, T, h, w)` is upsampled bilinearly (`align_corners=False`) to the label size and
    compared with the one-hot label, averaged over B*T*H*W. As in the paper's code, pixels labelled
    `ignore_label` count as negatives for every class by default; `exclude_ignored=True` leaves them
    out of the loss instead.
    """
    if targets.dim() != 3 or targets.dtype != torch.int64:
        raise ValueError(f"targets must be int64 (B, H, W), got {targets.dtype} {tuple(targets.shape)}")
    num_classes = logits[0].shape[1]
    valid = targets != ignore_label
    bad = valid & ((targets < 0) | (targets >= num_classes))
    if bool(bad.any()):
        raise ValueError(
            f"targets hold labels outside 0..{num_classes - 1} (and the ignore label {ignore_label}): "
            f"{sorted(set(targets[bad].unique().tolist()))[:10]}"
        )
    one_hot = F.one_hot(torch.where(valid, targets, 0), num_classes).permute(0, 3, 1, 2).to(logits[0].dtype)
    one_hot = one_hot * valid[:, None].to(one_hot.dtype)
    size = targets.shape[-2:]
    losses = {}
    for i, output in enumerate(logits):
        upsampled = F.interpolate(output, size=size, mode="bilinear", align_corners=False)
        if exclude_ignored:
            weight = valid[:, None].expand_as(upsampled).to(upsampled.dtype)
            per_pixel = F.binary_cross_entropy_with_logits(upsampled, one_hot, reduction="none")
            losses[f"loss_sem_seg_{i}"] = (per_pixel * weight).sum() / weight.sum().clamp_min(1)
        else:
            losses[f"loss_sem_seg_{i}"] = F.binary_cross_entropy_with_logits(upsampled, one_hot)
    return losses

"""The CLIP backbone of SED on upstream OpenCLIP: dense image features and the text tower.

SED does not use CLIP's pooled image embedding. It needs the ConvNeXt trunk's hierarchical maps
(`res2`..`res5`, strides 4..32) for appearance guidance, and CLIP-space features at every stride-32
position (`clip_vis_dense`) for the cost volume. Those come from running the trunk's parts by hand:
`visual(x)` with `timm_pool=""` would apply the projection on the wrong axis.
"""

from __future__ import annotations

from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool
from timm.layers import Mlp
from timm.models.convnext import ConvNeXtBlock
from torch import nn

from . import ops
from .cpu.layout import activation_name, channel_norm, channels_last


class CLIPBackbone(nn.Module):
    """An `open_clip.model.CLIP` (timm image tower) exposing SED's dense features.

    Parameter names stay OpenCLIP's (`clip.visual.trunk...`), so the paper's checkpoints map onto
    it by a prefix change alone.
    """

    def __init__(self, clip_cfg: dict[str, Any]) -> None:
        super().__init__()
        if "timm_model_name" not in clip_cfg.get("vision_cfg", {}):
            raise ValueError("SED's backbone needs a timm image tower (vision_cfg.timm_model_name)")
        self.clip = open_clip.model.CLIP(**clip_cfg)
        trunk = self.clip.visual.trunk
        if not hasattr(trunk, "stem") or not hasattr(trunk, "stages") or len(trunk.stages) != 4:
            raise ValueError(f"SED needs a ConvNeXt-style trunk with a stem and 4 stages, got {type(trunk).__name__}")
        self.stage_channels: tuple[int, ...] = tuple(info["num_chs"] for info in trunk.feature_info)
        self.embed_dim: int = clip_cfg["embed_dim"]
        self.context_length: int = self.clip.context_length
        self.has_text_tower = True

    def dense_features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Normalised images (B, 3, S, S) -> `res2`..`res5` and `clip_vis_dense` (B, D, S/32, S/32)."""
        trunk = self.clip.visual.trunk
        # Channels-last, so timm's permutes are free and the blocks' MLPs run as oneDNN's matrix
        # product on the positions (`cpu/layout.py`; measured: the ConvNeXt-B trunk about 7% faster on a
        # 2-core AMD EPYC than in timm's layout).
        x = trunk.stem(channels_last(images))
        features: dict[str, torch.Tensor] = {}
        for i, stage in enumerate(trunk.stages):
            x = stage.downsample(x)
            for block in stage.blocks:
                x = block(x) if self.training else _convnext_block_eval(block, x)
            features[f"res{i + 2}"] = x
        x = trunk.norm_pre(x)
        x = trunk.head.norm(x)
        # OpenCLIP's projection head (linear or MLP) at every position, over the channel axis.
        x = self.clip.visual.head(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        features["clip_vis_dense"] = x
        return features

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids (N, context) -> L2-normalised text embeddings (N, D).

        CLIP's text tower is causal and pools the end-of-text token, so the padding after the
        longest prompt's end changes nothing: it is cut (OpenCLIP runs all 77 positions). The same
        computation on 10-20 positions instead of 77 for SED's templates: about 4x faster, which
        matters at 80 templates per class (ConvNeXt-B: 8 prompts/s on one thread in full).
        """
        if not self.has_text_tower:
            raise RuntimeError("this model's text tower was dropped (drop_text_tower): pass text embeddings computed elsewhere")
        clip = self.clip
        if clip.attn_mask is None or clip.text_pool_type not in ("argmax", "eos"):
            return clip.encode_text(tokens, normalize=True)
        length = int((tokens != 0).sum(dim=1).max())  # the longest prompt, its end-of-text token included
        tokens = tokens[:, :length]
        cast_dtype = clip.transformer.get_cast_dtype()
        x = clip.token_embedding(tokens).to(cast_dtype) + clip.positional_embedding[:length].to(cast_dtype)
        x = clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask[:length, :length]))
        x = text_global_pool(x, tokens, clip.text_pool_type, eos_token_id=getattr(clip, "text_eos_id", None))
        if clip.text_projection is not None:
            x = clip.text_projection(x) if isinstance(clip.text_projection, nn.Linear) else x @ clip.text_projection
        return F.normalize(x, dim=-1)

    def drop_text_tower(self) -> None:
        """Free the text tower, for a process that labels with text embeddings computed elsewhere.

        It is half of ConvNeXt-B CLIP's weights (about 350 MB in float32), needed once per taxonomy.
        """
        for name in ("transformer", "token_embedding", "positional_embedding", "ln_final", "text_projection", "attn_mask"):
            setattr(self.clip, name, None)
        self.has_text_tower = False


def _convnext_block_eval(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's `ConvNeXtBlock` in evaluation, its MLP through `ops.residual_mlp` (with the LayerNorm,
    layer scale and residual) or `ops.mlp`, which choose the fastest route (`ops.py`).

    The same parameters and the same function (stochastic depth and dropout are off in evaluation);
    only the route to the kernels differs. Other block types run as they are.
    """
    mlp = getattr(block, "mlp", None)
    if not isinstance(block, ConvNeXtBlock) or block.use_conv_mlp or type(mlp) is not Mlp or not isinstance(mlp.norm, nn.Identity):
        return block(x)
    y = block.conv_dw(x)
    activation = activation_name(mlp.act)
    if activation == "gelu" and isinstance(block.norm, nn.LayerNorm) and block.gamma is not None and isinstance(block.shortcut, nn.Identity):
        return ops.residual_mlp(y, block.norm, mlp.fc1, "gelu", mlp.fc2, residual=x, scale=block.gamma, out=None if torch.is_grad_enabled() else y)
    y = channel_norm(y, block.norm)
    if activation:
        y = ops.mlp(y, mlp.fc1, activation, mlp.fc2)
    else:
        y = ops.pointwise(mlp.act(ops.pointwise(y, mlp.fc1)), mlp.fc2)
    if block.gamma is None:
        return y + block.shortcut(x)
    return torch.addcmul(block.shortcut(x), y, block.gamma[:, None, None])

"""SED's gradual-fusion decoder, with category early rejection per image.

The decoder runs per (image, class) pair. Pairs are kept as *rows* of one tensor, image-major and
contiguous per image, together with each row's image and class index. Exact mode starts with every
pair; early rejection drops rows between stages, so each image keeps its own class set and a batch
gives every image exactly what it would get alone (the paper's code takes the union over the batch).
The only cross-class computation, class attention, reduces over the rows of one image at a time.

Module and parameter names follow the paper's checkpoints (`sem_seg_head.predictor.transformer.*`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Rows:
    """Which (image, class) pairs a row tensor holds; rows are image-major and contiguous per image."""

    image_index: torch.Tensor  # (N,) int64
    class_index: torch.Tensor  # (N,) int64
    counts: list[int]  # rows per image, length B (0 where an image kept nothing)

    @classmethod
    def full(cls, num_images: int, num_classes: int, device: torch.device) -> "Rows":
        image_index = torch.arange(num_images, device=device).repeat_interleave(num_classes)
        class_index = torch.arange(num_classes, device=device).repeat(num_images)
        return cls(image_index, class_index, [num_classes] * num_images)

    def select(self, keep: torch.Tensor) -> "Rows":
        counts = [int(chunk.sum()) for chunk in keep.split(self.counts)]
        return Rows(self.image_index[keep], self.class_index[keep], counts)


@dataclass
class StageLogits:
    """One head's logits `(N, h, w)` for the rows that reached it."""

    logits: torch.Tensor
    rows: Rows


def early_reject(logits: torch.Tensor, rows: Rows, top_k: int) -> torch.Tensor:
    """Category early rejection: keep, per image, the classes in some pixel's top-K.

    `logits` is a head's output `(N, h, w)`; returns a boolean mask `(N,)` of rows to keep.
    """
    keep = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    start = 0
    for count in rows.counts:
        if count:
            top = logits[start : start + count].topk(min(top_k, count), dim=0).indices
            keep[start + top.unique()] = True
        start += count
    return keep


class ConvNeXtBlock(nn.Module):
    """Depth-wise conv, channels-last LayerNorm, MLP with exact GELU, layer scale, residual."""

    def __init__(self, dim: int, kernel_size: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return x + (self.gamma * y).permute(0, 3, 1, 2)


class LinearAttention(nn.Module):
    """Multi-head linear attention (elu + 1 feature map) over the classes of each image.

    Tokens are rows; at every position `l` the rows of one image attend to each other. The sums over
    classes (of phi(k) v^T and of phi(k)) are taken per image, never across images.
    """

    def __init__(self, dim: int, num_heads: int, eps: float = 1e-6) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.eps = eps
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        n, length, dim = x.shape
        shape = (n, length, self.num_heads, dim // self.num_heads)
        q = F.elu(self.q(x).view(shape)) + 1
        k = F.elu(self.k(x).view(shape)) + 1
        v = self.v(x).view(shape)
        outputs = []
        for qs, ks, vs in zip(q.split(list(counts)), k.split(list(counts)), v.split(list(counts))):
            s = qs.shape[0]
            if s == 0:
                continue
            kv = torch.einsum("slhd,slhv->lhdv", ks, vs / s)
            z = 1.0 / (torch.einsum("slhd,lhd->slh", qs, ks.sum(dim=0)) + self.eps)
            outputs.append(torch.einsum("slhd,lhdv,slh->slhv", qs, kv, z) * s)
        return torch.cat(outputs).reshape(n, length, dim)


class ClassAttention(nn.Module):
    """Pooled, pre-norm transformer layer over the class axis; the pooled result is added back."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.attention = LinearAttention(dim, num_heads)
        self.MLP = nn.Sequential(nn.Linear(dim, 4 * dim), nn.ReLU(), nn.Linear(4 * dim, dim))
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, counts: Sequence[int], pooling: int) -> torch.Tensor:
        n, c, h, w = x.shape
        y = F.avg_pool2d(x, pooling) if pooling > 1 else x
        ph, pw = y.shape[-2:]
        y = y.flatten(2).transpose(1, 2)  # (N, positions, C)
        y = y + self.attention(self.norm1(y), counts)
        y = y + self.MLP(self.norm2(y))
        y = y.transpose(1, 2).reshape(n, c, ph, pw)
        if (ph, pw) != (h, w):
            y = F.interpolate(y, size=(h, w), mode="bilinear", align_corners=True)
        # The paper adds the whole pooled result (not only the attention update) back to x.
        return x + y


class DoubleConv(nn.Module):
    """(3x3 conv without bias, GroupNorm(C/16), ReLU) twice."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.double_conv = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.GroupNorm(out_channels // 16, out_channels),
            nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.GroupNorm(out_channels // 16, out_channels),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.double_conv(x)

    def after_first_conv(self, x: torch.Tensor) -> torch.Tensor:
        """The rest of the block, for callers that compute the first conv themselves (`UpStage`)."""
        return self.double_conv[1:](x)


class UpStage(nn.Module):
    """ConvNeXt block, class attention, 2x up-sampling, fusion with both guidances, double conv."""

    def __init__(self, in_channels: int, out_channels: int, guidance_channels: int, kernel_size: int, heads: int) -> None:
        super().__init__()
        self.cnext = ConvNeXtBlock(in_channels, kernel_size)
        self.attention = ClassAttention(in_channels, heads)
        self.up = nn.ConvTranspose2d(in_channels, in_channels - guidance_channels, 2, stride=2)
        self.conv = DoubleConv(in_channels + guidance_channels, out_channels)

    def forward(
        self,
        x: torch.Tensor,
        appearance: torch.Tensor,
        correlation: torch.Tensor,
        rows: Rows,
        pooling: int,
    ) -> torch.Tensor:
        x = self.attention(self.cnext(x), rows.counts, pooling)
        x = self.up(x)
        return self.conv.after_first_conv(self._fuse(x, appearance, correlation, rows))

    def _fuse(self, x: torch.Tensor, appearance: torch.Tensor, correlation: torch.Tensor, rows: Rows) -> torch.Tensor:
        """First fusion conv on concat([upsampled, appearance, correlation]), without repeating appearance.

        The paper concatenates the image's appearance guidance to every class's features. That conv
        has no bias, so it is the sum of convs over the three parts: the appearance part is computed
        once per image and added to each of the image's rows (saving its FLOPs and the repeated
        tensor), while the per-class parts run as one conv.
        """
        conv = self.conv.double_conv[0]
        c_up, g_app = x.shape[1], appearance.shape[1]
        weight = conv.weight
        per_class = F.conv2d(
            torch.cat([x, correlation], dim=1),
            torch.cat([weight[:, :c_up], weight[:, c_up + g_app :]], dim=1),
            padding=conv.padding,
        )
        per_image = F.conv2d(appearance, weight[:, c_up : c_up + g_app], padding=conv.padding)
        start = 0
        for i, count in enumerate(rows.counts):
            per_class.narrow(0, start, count).add_(per_image[i])
            start += count
        return per_class


class SEDDecoder(nn.Module):
    """Cost volume `(B, T, P, h, w)` + backbone maps -> logits of the four heads."""

    def __init__(
        self,
        appearance_channels: Sequence[int],
        hidden_dim: int = 128,
        decoder_dims: Sequence[int] = (64, 32, 16),
        guidance_dims: Sequence[int] = (32, 16, 8),
        num_templates: int = 80,
        kernel_size: int = 9,
        heads: int = 4,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(num_templates, hidden_dim, 7, padding=3)
        # Appearance guidance from res4, res3, res2 (in that order).
        self.decoder_guidance_projection = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, g, 3, padding=1), nn.ReLU()) for c, g in zip(appearance_channels, guidance_dims)
        )
        corr_in = (num_templates, *guidance_dims[:2])
        self.decoder_corr_guidance_projection = nn.ModuleList(
            nn.Sequential(nn.ConvTranspose2d(c, g, 2, stride=2), nn.ReLU()) for c, g in zip(corr_in, guidance_dims)
        )
        widths = (hidden_dim, *decoder_dims)
        self.decoder1 = UpStage(widths[0], widths[1], guidance_dims[0], kernel_size, heads)
        self.decoder2 = UpStage(widths[1], widths[2], guidance_dims[1], kernel_size, heads)
        self.decoder3 = UpStage(widths[2], widths[3], guidance_dims[2], kernel_size, heads)
        self.head0 = nn.Conv2d(widths[0], 1, 3, padding=1)
        self.head1 = nn.Conv2d(widths[1], 1, 3, padding=1)
        self.head2 = nn.Conv2d(widths[2], 1, 3, padding=1)
        self.head = nn.Conv2d(widths[3], 1, 3, padding=1)

    def forward(
        self,
        cost: torch.Tensor,
        appearance_features: Sequence[torch.Tensor],
        pooling: int,
        top_k: int | None = None,
    ) -> list[StageLogits]:
        """Return `[head, head0, head1, head2]` logits for the rows that reached each head.

        `appearance_features` are the backbone's `res4, res3, res2`. They are detached: the image
        tower trains only through the cost volume. Heads 0-2 see detached inputs for the same
        reason (they supervise, and prune, but do not train the decoder). With `top_k`, early
        rejection runs after `head0`, `head1` and `head2`.
        """
        b, t = cost.shape[:2]
        rows = Rows.full(b, t, cost.device)
        correlation = cost.flatten(0, 1)
        appearance = [proj(f.detach()) for proj, f in zip(self.decoder_guidance_projection, appearance_features)]

        x = self.conv1(correlation)
        stage_logits = [StageLogits(self.head0(x.detach()).squeeze(1), rows)]
        stages = (self.decoder1, self.decoder2, self.decoder3)
        heads = (self.head1, self.head2, self.head)
        for i, (stage, head) in enumerate(zip(stages, heads)):
            if top_k is not None:
                keep = early_reject(stage_logits[-1].logits, rows, top_k)
                if not bool(keep.all()):
                    rows = rows.select(keep)
                    x, correlation = x[keep], correlation[keep]
            # Correlation guidance is chained on the cost volume; only kept rows are computed.
            correlation = self.decoder_corr_guidance_projection[i](correlation)
            x = stage(x, appearance[i], correlation, rows, pooling)
            stage_logits.append(StageLogits(head(x if i == 2 else x.detach()).squeeze(1), rows))
        return [stage_logits[3], stage_logits[0], stage_logits[1], stage_logits[2]]

"""SED's gradual-fusion decoder, with category early rejection per image.

The decoder runs per (image, class) pair. Pairs are kept as *rows*, image-major and contiguous per
image, together with each row's image and class index. Exact mode starts with every pair; early
rejection drops rows between stages, so each image keeps its own class set and a batch gives every
image exactly what it would get alone (the paper's code takes the union over the batch).

Rows travel in chunks of at most `chunk_rows`, so memory is bounded whatever the taxonomy size. A
chunk holds rows of one image only, and each image's rows are cut the same way in any batch, so an
image's result is the same bit for bit whoever its batch-mates are (a resumed job relabels an image
exactly). Everything is independent per row except class attention, whose linear attention reduces
over an image's classes only through two sums (of phi(k) v^T and of phi(k)). Each up-stage therefore
runs in two passes over the chunks: the ConvNeXt block and those sums first, then the attention with
the whole image's sums and the rest of the stage. That is the paper's computation, exactly, in
another order.

The fusable steps (MLPs, class attention's sums and application, GroupNorm + ReLU, the 3x3 and
fusion convs, the heads, the transposed convs, conv1) are named ops (`ops.py`), which choose their
implementation: on CPUs in float32 inference fused kernels, oneDNN's routes and the FFT
(`sed_model/cpu`), elsewhere PyTorch's operators. Feature maps are channels-last; the appearance
guidance is convolved once per image instead of once per class (see `UpStage.appearance_term`). In
inference the chunks one stage hands to the next live in large stores of their own
(`_chunk_stores`), so the heap does not fragment between stages.

Module and parameter names follow the paper's checkpoints (`sem_seg_head.predictor.transformer.*`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .cpu.allocator import advise_huge_pages
from .cpu.fft_conv import SpectrumCache
from .cpu.layout import channel_norm, channels_last

# Rows per chunk. Measured on a 2-core CPU (ConvNeXt-B, T=64, with `allocator.keep_freed_memory`):
# 8, 16 and 32 rows run at the same speed, so the smallest keeps the temporaries small.
DEFAULT_CHUNK_ROWS = 8
# Rows per FFT convolution of conv1 (several chunks of one image): its per-frequency products are
# small matrices, and 32 rows run them about twice as fast per row as 8.
FFT_GROUP_ROWS = 32
# In inference, the chunks a stage hands to the next are carved out of allocations of at least this
# size (`_chunk_stores`): above glibc's mmap threshold (`allocator.py`), so each goes back to the OS
# whole once its chunks are consumed, instead of leaving holes in the heap that the next stage's
# larger chunks cannot reuse (measured at T=847: the peak grew by 0.2-0.4 GB from one call to the
# next that way).
STORE_BYTES = 64 * 2**20


# An attention layer's class sums over some rows of one image: `sum phi(k) v^T`, `sum phi(k)`.
Sums = tuple[torch.Tensor, torch.Tensor]


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

    def chunk_spans(self, chunk_rows: int) -> list[tuple[int, int, int]]:
        """`(image, first, end)` row spans of at most `chunk_rows` rows, each within one image.

        Each image's rows are cut the same way whatever its batch-mates.
        """
        spans, offset = [], 0
        for image, count in enumerate(self.counts):
            spans += [(image, offset + first, offset + min(first + chunk_rows, count)) for first in range(0, count, chunk_rows)]
            offset += count
        return spans


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
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """`inplace` writes the result over `x` (inference, where the input is not needed after)."""
        y = self.dwconv(x)
        return ops.residual_mlp(y, self.norm, self.pwconv1, "gelu", self.pwconv2, residual=x, scale=self.gamma, out=x if inplace else None)


class LinearAttention(nn.Module):
    """Multi-head linear attention (elu + 1 feature map) over the classes of each image.

    At every position the rows of one image attend to each other: with `S` classes,
    `out = phi(q) (sum_s phi(k_s) v_s^T / S) / (phi(q) . sum_s phi(k_s) + eps) * S`. The two sums are
    taken per image (`ClassSums`), never across images, and may be accumulated chunk by chunk.
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

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """NCHW `(N, C', h, w)` -> `(N, h*w*C'/d, d)`: one row per (position, head) of width `d`.

        A view when `x` is channels-last, so the products below run on strided views, not copies.
        """
        n, c, h, w = x.shape
        d = self.q.out_features // self.num_heads
        return x.permute(0, 2, 3, 1).reshape(n, h * w * (c // d), d)

    def class_sums(self, x: torch.Tensor, running: Sums | None = None) -> Sums:
        """`sum phi(k) v^T` `(h*w*heads, d, d)` and `sum phi(k)` `(h*w*heads, d)` over the rows of `x`
        (normalised NCHW, one image's), added to `running` (the sums of the image's earlier rows).

        The sums run over up to hundreds of classes, so they are kept in float32 under autocast.
        """
        # k and v as two products rather than one of twice the width: the feature map then runs on
        # a contiguous k (measured: class sums 22-26% faster at the last two stages).
        k = self._heads(ops.pointwise(x, self.k))
        v = self._heads(ops.pointwise(x, self.v))
        return ops.attention_sums(k, v, running)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, k_sum: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """`residual` plus the attention output for the rows of `x` (normalised NCHW, one image's),
        given the image's sums."""
        n, c, h, w = x.shape
        out = ops.attention_apply(self._heads(ops.pointwise(x, self.q)), kv, k_sum, self._heads(residual), self.eps)
        return out.reshape(n, h, w, c).permute(0, 3, 1, 2)


class ClassSums:
    """Per image, the class sums of one attention layer so far: `sum phi(k) v^T` and `sum phi(k)`."""

    def __init__(self, num_images: int) -> None:
        self._sums: list[Sums | None] = [None] * num_images

    def running(self, image: int) -> Sums | None:
        """The sums over the image's rows seen so far; None before its first chunk."""
        return self._sums[image]

    def set(self, image: int, sums: Sums) -> None:
        self._sums[image] = sums

    def get(self, image: int) -> Sums:
        sums = self._sums[image]
        if sums is None:
            raise RuntimeError(f"class attention: image {image} has rows but no accumulated sums")
        return sums


class ClassAttention(nn.Module):
    """Pooled, pre-norm transformer layer over the class axis; the pooled result is added back."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.attention = LinearAttention(dim, num_heads)
        self.MLP = nn.Sequential(nn.Linear(dim, 4 * dim), nn.ReLU(), nn.Linear(4 * dim, dim))
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)

    @staticmethod
    def _pool(x: torch.Tensor, pooling: int) -> torch.Tensor:
        return F.avg_pool2d(x, pooling) if pooling > 1 else x

    def class_sums(self, x: torch.Tensor, pooling: int, running: Sums | None = None) -> Sums:
        """First pass: the attention sums over these rows (one image's) added to `running`."""
        return self.attention.class_sums(channel_norm(self._pool(x, pooling), self.norm1), running)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, k_sum: torch.Tensor, pooling: int) -> torch.Tensor:
        """Second pass: attention with the image's complete sums, MLP, the pooled result added to `x`
        (in inference written over `x`, which the caller gives up)."""
        y = self._pool(x, pooling)
        y = self.attention(channel_norm(y, self.norm1), kv, k_sum, residual=y)
        y = ops.residual_mlp(y, self.norm2, self.MLP[0], "relu", self.MLP[2], residual=y, out=None if torch.is_grad_enabled() else y)
        if y.shape[-2:] != x.shape[-2:]:
            y = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=True)
        # The paper adds the whole pooled result (not only the attention update) back to x; in
        # inference over x, which the caller gives up (no new map per chunk: 9 MB at the last stage).
        return x + y if torch.is_grad_enabled() else x.add_(y)


class DoubleConv(nn.Module):
    """(3x3 conv without bias, GroupNorm(C/16), ReLU) twice: the layers, under the checkpoint's
    names; `UpStage` runs them inside its own passes (the appearance term added before the first)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.double_conv = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.GroupNorm(out_channels // 16, out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.GroupNorm(out_channels // 16, out_channels),
            nn.ReLU(inplace=True),
        )


class UpStage(nn.Module):
    """ConvNeXt block, class attention, 2x up-sampling, fusion with both guidances, double conv.

    It runs in two passes (see the module's docstring): `cnext` and `attention.class_sums` over all
    chunks of rows, then `forward` on each chunk.
    """

    def __init__(self, in_channels: int, out_channels: int, guidance_channels: int, kernel_size: int, heads: int) -> None:
        super().__init__()
        self.cnext = ConvNeXtBlock(in_channels, kernel_size)
        self.attention = ClassAttention(in_channels, heads)
        self.up = nn.ConvTranspose2d(in_channels, in_channels - guidance_channels, 2, stride=2)
        self.conv = DoubleConv(in_channels + guidance_channels, out_channels)
        self.guidance_channels = guidance_channels

    def first_pass(self, x: torch.Tensor, pooling: int, running: Sums | None = None) -> tuple[torch.Tensor, Sums]:
        """The ConvNeXt block on a chunk (one image's rows), and the class sums with the chunk's
        rows added to `running` (the image's earlier chunks').

        In inference the block's output overwrites the chunk, so it stays in its store.
        """
        x = self.cnext(x, inplace=not torch.is_grad_enabled())
        return x, self.attention.class_sums(x, pooling, running)

    def appearance_term(self, appearance: torch.Tensor) -> torch.Tensor:
        """The appearance guidance's part of the first fusion conv, once per image.

        The paper concatenates [upsampled, appearance, correlation] and convolves; that conv has no
        bias, so it is the sum of convs over the three parts. The appearance part is the same for
        every class of an image, so it is computed once and added to each of the image's rows.
        """
        c_up = self.up.out_channels
        conv = self.conv.double_conv[0]
        return F.conv2d(appearance, conv.weight[:, c_up : c_up + self.guidance_channels], padding=conv.padding)

    def forward(
        self,
        x: torch.Tensor,
        kv: torch.Tensor,
        k_sum: torch.Tensor,
        appearance_term: torch.Tensor,
        correlation: torch.Tensor,
        pooling: int,
        out: torch.Tensor | None = None,
        fusion_input: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The stage after its ConvNeXt block for one chunk (`x`: `cnext`'s output, one image's rows).

        `kv, k_sum` are the image's class sums, `appearance_term` its `(1, C, H, W)` appearance term,
        `correlation` the rows' correlation guidance. With `out` (inference only), the result is
        written there; `fusion_input` (inference only; channels-last, at least as many rows as `x`)
        is memory for the fusion conv's input (`ops.fusion_conv`).
        """
        x = self.attention(x, kv, k_sum, pooling)
        conv = self.conv.double_conv[0]
        c_up = self.up.out_channels
        per_class_weight = torch.cat([conv.weight[:, :c_up], conv.weight[:, c_up + self.guidance_channels :]], dim=1)
        norm1, _, conv2, norm2, _ = self.conv.double_conv[1:]
        y = ops.fusion_conv(x, self.up, correlation, per_class_weight, conv, norm1, appearance_term, fusion_input)
        return ops.conv3x3_norm_relu(y, conv2.weight, conv2, norm2, out=out)


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
        self.chunk_rows = DEFAULT_CHUNK_ROWS
        self._conv1_spectrum = SpectrumCache()

    def forward(
        self,
        cost: torch.Tensor,
        appearance_features: Sequence[torch.Tensor],
        pooling: int,
        top_k: int | None = None,
        chunk_rows: int | None = None,
    ) -> list[StageLogits]:
        """Return `[head, head0, head1, head2]` logits for the rows that reached each head.

        `appearance_features` are the backbone's `res4, res3, res2`. They are detached: the image
        tower trains only through the cost volume. Heads 0-2 see detached inputs for the same
        reason (they supervise, and prune, but do not train the decoder). With `top_k`, early
        rejection runs after `head0`, `head1` and `head2`. Rows go `chunk_rows` (default:
        `self.chunk_rows`) at a time; a GPU wants larger chunks than a CPU.
        """
        chunk_rows = self.chunk_rows if chunk_rows is None else chunk_rows
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        rows = Rows.full(cost.shape[0], cost.shape[1], cost.device)
        # Per image, like everything below: an image's result must not depend on its batch-mates
        # (kernels may round differently for another batch size).
        appearance = [
            torch.cat([channels_last(proj(f[i : i + 1].detach())) for i in range(f.shape[0])])
            for proj, f in zip(self.decoder_guidance_projection, appearance_features)
        ]

        spans = rows.chunk_spans(chunk_rows)
        chunks = self._embed_cost(cost, rows, spans)
        stage_logits = [StageLogits(torch.cat([ops.head(self.head0, x.detach()) for x in chunks]).squeeze(1), rows)]
        stages = (self.decoder1, self.decoder2, self.decoder3)
        heads = (self.head1, self.head2, self.head)
        for level, (stage, head) in enumerate(zip(stages, heads)):
            if top_k is not None:
                keep = early_reject(stage_logits[-1].logits, rows, top_k)
                if not bool(keep.all()):
                    rows = rows.select(keep)
                    spans = rows.chunk_spans(chunk_rows)
                    chunks = _regroup(chunks, keep, [end - first for _, first, end in spans])
            last = level == len(stages) - 1
            chunks, logits = self._up_stage(level, stage, head, chunks, spans, cost, appearance[level], rows, pooling, last)
            stage_logits.append(StageLogits(logits, rows))
        return [stage_logits[3], stage_logits[0], stage_logits[1], stage_logits[2]]

    def _up_stage(
        self,
        level: int,
        stage: UpStage,
        head: nn.Conv2d,
        chunks: list[torch.Tensor],
        spans: Sequence[tuple[int, int, int]],
        cost: torch.Tensor,
        appearance: torch.Tensor,
        rows: Rows,
        pooling: int,
        last: bool,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Both passes of one up-stage over the chunks; returns the output chunks and the head's logits.

        At most one stage's input and one stage's output are held at a time (none for the last
        stage: only its logits are kept). Each input chunk is released once consumed; in inference
        the output chunks are carved from large stores (`_chunk_stores`), each released once all of
        its chunks are consumed by the next stage.
        """
        sums = ClassSums(len(rows.counts))
        for i, (image, _, _) in enumerate(spans):
            chunks[i], image_sums = stage.first_pass(chunks[i], pooling, sums.running(image))
            sums.set(image, image_sums)
        appearance_term = stage.appearance_term(appearance)
        stores = fusion_input = None
        if _inference_stores(appearance_term):
            height, width = appearance_term.shape[-2:]
            if not last:
                stores = _chunk_stores(spans, (stage.conv.double_conv[3].out_channels, height, width), appearance_term)
            # One buffer for the fusion conv's input (the concatenation; with the CPU kernels only
            # the up-sampled map) for all chunks: at the last stage it passes glibc's mmap
            # threshold, and a fresh one per chunk cost ~4,000 page faults each (measured at T=64).
            largest_chunk = max(end - first for _, first, end in spans)
            per_class_channels = stage.conv.double_conv[0].in_channels - stage.guidance_channels
            fusion_input = _large_buffer((largest_chunk, per_class_channels, height, width), appearance_term)
        outputs, logits = [], []
        for i, (image, first, end) in enumerate(spans):
            x, chunks[i] = chunks[i], None
            correlation = self._correlation(cost, rows, first, end, level)
            out = None if stores is None else stores[i]
            y = stage(x, *sums.get(image), appearance_term[image : image + 1], correlation, pooling, out=out, fusion_input=fusion_input)
            logits.append(ops.head(head, y if last else y.detach()).squeeze(1))
            if not last:
                outputs.append(y)
        return outputs, torch.cat(logits)

    def _embed_cost(self, cost: torch.Tensor, rows: Rows, spans: Sequence[tuple[int, int, int]]) -> list[torch.Tensor]:
        """`conv1` over the cost volume of each chunk of rows, on groups of whole chunks of one image
        (the same groups in any batch, like the chunks: on CPUs through the FFT, whose per-frequency
        products are faster on more rows); in inference into the chunk stores."""
        stores = None
        if _inference_stores(cost):
            stores = _chunk_stores(spans, (self.conv1.out_channels, *cost.shape[-2:]), cost)
        chunks: list[torch.Tensor] = []
        for group in _image_groups(spans, FFT_GROUP_ROWS):
            first = group[0][1]
            y = ops.embed(self._cost_rows(cost, rows, first, group[-1][2]), self.conv1, self._conv1_spectrum)
            for _, span_first, span_end in group:
                part = y[span_first - first : span_end - first]
                chunks.append(stores[len(chunks)].copy_(part) if stores is not None else channels_last(part))
        return chunks

    @staticmethod
    def _cost_rows(cost: torch.Tensor, rows: Rows, first: int, end: int) -> torch.Tensor:
        """The cost volume `(n, P, h, w)` of rows `first:end` (NCHW)."""
        return cost[rows.image_index[first:end], rows.class_index[first:end]]

    def _correlation(self, cost: torch.Tensor, rows: Rows, first: int, end: int, level: int) -> torch.Tensor:
        """Correlation guidance of rows `first:end` for up-stage `level`, chained on the raw cost volume.

        Recomputed per stage from the cost volume (about 1% of the decoder's FLOPs, 5% of its time on
        a 2-core CPU) rather than held for every row between stages, which at the last stage would
        cost as much memory as its input.
        """
        x = channels_last(self._cost_rows(cost, rows, first, end))
        for projection in self.decoder_corr_guidance_projection[: level + 1]:
            x = ops.transposed_conv2x2_relu(x, projection[0])  # projection: ConvTranspose2d then ReLU
        return x


def _inference_stores(like: torch.Tensor) -> bool:
    """Whether chunks go into stores and buffers of their own: inference without autocast (in
    training autograd keeps what it needs; under autocast the ops make their own dtypes)."""
    return not torch.is_grad_enabled() and not torch.is_autocast_enabled(like.device.type)


def _chunk_stores(spans: Sequence[tuple[int, int, int]], row_shape: tuple[int, ...], like: torch.Tensor) -> list[torch.Tensor]:
    """Empty channels-last chunks `(rows, *row_shape)` for `spans`, carved from stores of consecutive chunks.

    Each store holds at least `STORE_BYTES` (but the last), so it is its own mapping: it goes back
    to the OS as a whole once all of its chunks are released.
    """
    row_bytes = math.prod(row_shape) * like.element_size()
    chunks: list[torch.Tensor] = []
    start = 0
    while start < len(spans):
        stop, store_rows = start, 0
        while stop < len(spans) and store_rows * row_bytes < STORE_BYTES:
            store_rows += spans[stop][2] - spans[stop][1]
            stop += 1
        store = _large_buffer((store_rows, *row_shape), like)
        offset = 0
        for _, first, end in spans[start:stop]:
            chunks.append(store[offset : offset + end - first])
            offset += end - first
        start = stop
    return chunks


def _large_buffer(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """An empty channels-last tensor with `like`'s dtype and device, huge pages asked for (a fresh
    mapping then fills with few page faults)."""
    buffer = torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=torch.channels_last)
    advise_huge_pages(buffer)
    return buffer


def _image_groups(spans: Sequence[tuple[int, int, int]], group_rows: int) -> list[list[tuple[int, int, int]]]:
    """Consecutive chunk spans of one image, gathered until a group holds `group_rows` rows or more."""
    groups: list[list[tuple[int, int, int]]] = []
    for span in spans:
        current = groups[-1] if groups else None
        if current is None or current[0][0] != span[0] or current[-1][2] - current[0][1] >= group_rows:
            groups.append([span])
        else:
            current.append(span)
    return groups


def _regroup(chunks: list[torch.Tensor], keep: torch.Tensor, sizes: Sequence[int]) -> list[torch.Tensor]:
    """The kept rows of `chunks` (in order), regrouped into chunks of the given `sizes`.

    Consumes `chunks`: each is released once read, so the kept rows are never held twice.
    """
    groups: list[torch.Tensor] = []
    pending: list[torch.Tensor] = []
    pending_rows = first = 0
    for i in range(len(chunks)):
        chunk, chunks[i] = chunks[i], None
        kept = chunk[keep[first : first + chunk.shape[0]]]
        first += chunk.shape[0]
        del chunk
        while kept.shape[0]:
            take = min(sizes[len(groups)] - pending_rows, kept.shape[0])
            pending.append(kept[:take])
            pending_rows += take
            kept = kept[take:]
            if pending_rows == sizes[len(groups)]:
                groups.append(channels_last(torch.cat(pending)))
                pending, pending_rows = [], 0
    return groups

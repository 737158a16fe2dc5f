"""Plots and overlays for the HTML report, as self-contained data URIs (the page opens offline)."""

from __future__ import annotations

import base64
import io

import matplotlib

matplotlib.use("Agg")  # no display: render to memory
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from .stats import HISTOGRAM_BINS, LabelStatistics  # noqa: E402

UNLABELED_COLOUR = (0, 0, 0)


def class_colours(num_classes: int) -> np.ndarray:
    """A fixed colour per class (tab20, then golden-angle hues), uint8 (T, 3)."""
    base = (np.array(plt.get_cmap("tab20").colors) * 255).astype(np.uint8)
    extra = [
        (np.array(matplotlib.colors.hsv_to_rgb(((i * 0.618033988749895) % 1, 0.65, 0.95))) * 255).astype(np.uint8)
        for i in range(max(num_classes - len(base), 0))
    ]
    return np.concatenate([base, np.array(extra, dtype=np.uint8).reshape(-1, 3)])[:num_classes]


def _data_uri(figure: plt.Figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def class_share_chart(stats: LabelStatistics, top: int = 30) -> str:
    share = stats.class_pixels / max(stats.class_pixels.sum() + stats.unlabeled_pixels + stats.distractor_pixels, 1)
    order = np.argsort(share)[::-1][:top]
    figure, axis = plt.subplots(figsize=(8, 0.25 * len(order) + 1))
    axis.barh([stats.classes[i] for i in order][::-1], share[order][::-1] * 100, color="#4c78a8")
    axis.set_xlabel("share of labelled pixels (%)")
    return _data_uri(figure)


def probability_histograms(stats: LabelStatistics, top: int = 12) -> str:
    order = np.argsort(stats.class_pixels)[::-1][:top]
    order = [i for i in order if stats.class_images[i] > 0] or list(order[:1])
    columns = 4
    rows = (len(order) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(10, 2.1 * rows), squeeze=False)
    edges = np.linspace(0, 1, HISTOGRAM_BINS + 1)
    for axis, c in zip(axes.flat, order):
        axis.bar(edges[:-1], stats.mean_prob_histogram[c], width=1 / HISTOGRAM_BINS, align="edge", color="#f58518")
        axis.set_title(stats.classes[c][:30], fontsize=9)
        axis.set_xlim(0, 1)
    for axis in list(axes.flat)[len(order) :]:
        axis.axis("off")
    figure.supxlabel("mean probability of the class over its pixels, per image")
    return _data_uri(figure)


def kept_classes_chart(stats: LabelStatistics, prompts: int) -> str:
    """Images per number of prompts early rejection kept (the classes, for a taxonomy without groups)."""
    figure, axis = plt.subplots(figsize=(6, 2.5))
    counts = sorted(stats.kept_counts.items())
    axis.bar([k for k, _ in counts], [v for _, v in counts], color="#54a24b")
    axis.set_xlabel(f"prompts kept by early rejection (of {prompts})")
    axis.set_ylabel("images")
    return _data_uri(figure)


def throughput_chart(stats: LabelStatistics) -> str:
    points = stats.throughput()
    figure, axis = plt.subplots(figsize=(6, 2.5))
    axis.plot([m for m, _ in points], [n / 60 for _, n in points], marker="o", color="#e45756")
    axis.set_xlabel("minutes since the first label")
    axis.set_ylabel("images / s")
    return _data_uri(figure)


def overlay(image: np.ndarray, label_map: np.ndarray, colours: np.ndarray, unlabeled: int, max_side: int = 320) -> str:
    """Image with its coloured label map blended on top, as a JPEG data URI."""
    palette = np.vstack([colours, UNLABELED_COLOUR]).astype(np.float32)
    indices = np.where(label_map == unlabeled, len(colours), label_map)
    blended = (0.5 * image.astype(np.float32) + 0.5 * palette[indices]).astype(np.uint8)
    picture = Image.fromarray(blended)
    picture.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()

"""`prepare_dataset`: an official download -> a prepared folder of images and train-id label maps."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

from .ade import Ade150, AdeFull
from .coco import CocoStuff
from .pascal import PascalContextDetail, PascalContextMat, Voc
from .prepared import PreparedWriter
from .raw import RawRoot, Sample
from .registry import DatasetError, get_dataset


class RawDataset(Protocol):
    def items(self) -> list[Any]: ...

    def convert(self, item: Any) -> Sample | None: ...  # None: the paper skips this image


# raw_format (registry) -> converter of that official download
CONVERTERS: dict[str, Callable[[RawRoot, str], RawDataset]] = {
    "ade20k_150": lambda raw, split: Ade150(raw),
    "ade20k_full": lambda raw, split: AdeFull(raw),
    "pascal_context_detail": lambda raw, split: PascalContextDetail(raw),
    "pascal_context_mat": lambda raw, split: PascalContextMat(raw),
    "voc_without_background": lambda raw, split: Voc(raw, background=255),
    "voc_with_background": lambda raw, split: Voc(raw, background=20),
    "coco_stuff": lambda raw, split: CocoStuff(raw, split),
}


def prepare_dataset(
    name: str,
    raw_url: str,
    output_url: str,
    split: str | None = None,
    storage_options: dict[str, Any] | None = None,
    output_storage_options: dict[str, Any] | None = None,
    limit: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Convert the official download at `raw_url` as the paper did; returns the written manifest.

    `limit`: convert only the first N images (a quick check of a download); the manifest says so.
    """
    spec = get_dataset(name)
    split = split or spec.splits[0]
    if split not in spec.splits:
        raise DatasetError(f"{name} has the splits {list(spec.splits)}, not {split!r}")
    say = progress or (lambda message: None)
    raw = RawRoot(raw_url, storage_options)
    source = CONVERTERS[spec.raw_format](raw, split)
    listed = source.items()
    if not listed:
        raise DatasetError(f"{raw_url!r} holds no {name} images; expected {spec.raw_layout}")
    items = listed[:limit]
    say(f"{name} ({split}): {len(listed)} images in {raw_url}" + (f", converting the first {len(items)}" if limit else ""))
    writer = PreparedWriter(spec, split, output_url, output_storage_options)
    skipped: list[str] = []
    started = time.monotonic()
    step = max(1, len(items) // 20)
    for done, item in enumerate(items, start=1):
        sample = source.convert(item)
        if sample is None:
            skipped.append(str(item))
        else:
            writer.add(sample)
        if done % step == 0 or done == len(items):
            say(f"  {done}/{len(items)} ({done / max(time.monotonic() - started, 1e-9):.1f} images/s)")
    manifest = writer.finish(raw_url, skipped, limit)
    say(f"{manifest['images']} images written to {output_url}" + (f"; {len(skipped)} skipped (label all ignore)" if skipped else ""))
    return manifest

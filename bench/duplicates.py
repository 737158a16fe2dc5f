"""A job over a collection with copies: the model's time goes to distinct images only.

    python bench/duplicates.py              # about 5 minutes on 2 cores
    python bench/duplicates.py --copies 8

The demo's six images (`jobs/demo_images/`) are put `--copies` times into a folder, and the demo job
(`jobs/demo.yaml`: a tiny SED on the CPU) labels three collections of the same size and image sizes:
(a) exact copies, (b) copies whose one pixel differs (all distinct: the model labels every image),
(c) exact copies with `duplicates.reuse_labels: false`. Prints each run's images per second (the
job's own figure: images labelled over its whole run, Ray's start included), its duplicates and the
model seconds spent and saved (`sed-label report`).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.label import run_job  # noqa: E402
from pipeline.report import build_report  # noqa: E402
from schemas import JobSpec  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def collection(folder: Path, copies: int, distinct: bool) -> None:
    """Each demo image `copies` times (as PNG, so one changed pixel stays changed)."""
    for copy in range(copies):
        (folder / f"copy{copy}").mkdir(parents=True)
        for source in sorted((REPO / "jobs" / "demo_images").iterdir()):
            pixels = np.array(Image.open(source).convert("RGB"))
            if distinct:
                pixels[0, 0, 0] = (int(pixels[0, 0, 0]) + copy) % 256
            Image.fromarray(pixels).save(folder / f"copy{copy}" / f"{source.stem}.png")


def run(name: str, root: Path, copies: int, distinct: bool, reuse: bool) -> None:
    spec = yaml.safe_load((REPO / "jobs" / "demo.yaml").read_text())
    images = root / name / "images"
    collection(images, copies, distinct)
    spec["input"] = {"url": str(images), "shard_size": 8}
    spec["output"]["url"] = str(root / name / "out")
    spec["duplicates"] = {"reuse_labels": reuse}
    summary = run_job(JobSpec.model_validate(spec))
    labels = build_report(spec["output"]["url"])["labels"]
    print(
        f"{name}: {summary.images} images, {summary.duplicates} duplicates, {summary.seconds:.1f} s, "
        f"{summary.images_per_second:.2f} images/s; model {labels['model_seconds']:.1f} s spent, "
        f"{labels['model_seconds_saved']:.1f} s saved",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=40)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        # The first job of a process pays one-time costs (imports, caches): the copies' job takes them.
        run("copies", root, args.copies, distinct=False, reuse=True)
        run("distinct", root, args.copies, distinct=True, reuse=True)
        run("copies-no-reuse", root, args.copies, distinct=False, reuse=False)


if __name__ == "__main__":
    main()

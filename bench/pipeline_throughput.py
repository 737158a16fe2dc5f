"""Whole-job throughput against the bare model loop, on the same images and device, in one run.

    python bench/pipeline_throughput.py --images 48

Writes `--images` synthetic images to a temporary folder, then measures:
1. the bare loop: decode each file, label it with `SEDPredictor.label_batch` in batches of
   `--batch-size`, with `torch.set_num_threads(--cpus-per-actor)` (what a Ray actor gets);
2. the whole job (`pipeline.run_job` on a local Ray): listing, decoding, the actor pool, RLE and
   PNG encoding, shard writing and commits; timed from the first to the last shard commit, so Ray's
   start-up and the actors' model loading are reported separately and not counted.
It prints both rates and their ratio (the job's overhead: 1.0 means none). The model is the demo's
tiny SED by default (random weights; the point is the pipeline, not the labels) or `--model
convnext_b` with random weights for the real geometry.
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

import sed_model
from pipeline.label import run_job
from pipeline.decode import decode_image
from pipeline.model_loading import load_model
from pipeline.taxonomy import load_taxonomy
from schemas import JobSpec

REPO = Path(__file__).resolve().parents[1]


def write_images(folder: Path, count: int, size: tuple[int, int]) -> list[Path]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        small = rng.integers(0, 255, (size[1] // 16, size[0] // 16, 3), dtype=np.uint8)
        path = folder / f"image_{i:05d}.jpg"
        Image.fromarray(small).resize(size, Image.BILINEAR).save(path, quality=90)
        paths.append(path)
    return paths


def make_spec(args: argparse.Namespace, images: Path, output: Path) -> JobSpec:
    demo = yaml.safe_load((REPO / "jobs" / "demo.yaml").read_text())
    return JobSpec.model_validate(
        {
            "input": {"url": str(images), "shard_size": args.shard_size},
            "taxonomy": {"classes": demo["taxonomy"]["classes"] if args.classes is None else [f"class {i}" for i in range(args.classes)]},
            "model": {"clip_model": demo["model"]["clip_model"] if args.model == "tiny" else args.model, "weights": None},
            "inference": {"top_k": args.top_k, "batch_size": args.batch_size},
            "output": {"url": str(output), "formats": ["parquet", "coco", "png"]},
            "ray": {"num_actors": args.num_actors, "cpus_per_actor": args.cpus_per_actor, "num_cpus": args.ray_cpus},
        }
    )


def bare_loop(spec: JobSpec, paths: list[Path], threads: int) -> float:
    """Images per second of decode + model on one process, as an actor would run them."""
    torch.set_num_threads(threads)
    sed_model.prepare_cpu_inference()  # as the job's actors do
    model, _ = load_model(spec.model, "cpu")
    taxonomy = load_taxonomy(spec.taxonomy)
    predictor = sed_model.SEDPredictor(model, top_k=spec.inference.top_k)
    predictor.set_taxonomy(taxonomy.classes, taxonomy.templates)
    batch = spec.inference.batch_size
    started = time.perf_counter()
    for start in range(0, len(paths), batch):
        images = [
            torch.from_numpy(decode_image(p.read_bytes(), spec.input.max_pixels)).permute(2, 0, 1) for p in paths[start : start + batch]
        ]
        predictor.label_batch(images)
    return len(paths) / (time.perf_counter() - started)


def job_rate(spec: JobSpec) -> tuple[float, float, float]:
    """(images per second between the first and last commit, seconds to the first commit, total seconds)."""
    commits: list[tuple[float, int]] = []
    pattern = re.compile(r"shard \S+ committed: (\d+) ok, (\d+) errors")

    def progress(line: str) -> None:
        match = pattern.search(line)
        if match:
            commits.append((time.perf_counter(), int(match[1]) + int(match[2])))

    started = time.perf_counter()
    run_job(spec, progress=progress)
    total = time.perf_counter() - started
    if len(commits) < 2:
        raise SystemExit("the job committed fewer than 2 shards: use more --images or a smaller --shard-size")
    images_after_first = sum(n for _, n in commits[1:])
    return images_after_first / (commits[-1][0] - commits[0][0]), commits[0][0] - started, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--size", type=int, nargs=2, default=(480, 360), metavar=("W", "H"))
    parser.add_argument("--model", default="tiny", help="tiny (the demo's) or a preset, e.g. convnext_b (random weights)")
    parser.add_argument("--classes", type=int, default=None, help="number of synthetic class names (default: the demo's 6)")
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--shard-size", type=int, default=8)
    parser.add_argument("--num-actors", type=int, default=1)
    parser.add_argument("--cpus-per-actor", type=int, default=1)
    parser.add_argument("--ray-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="sed-label-bench-") as folder:
        paths = write_images(Path(folder) / "images", args.images, tuple(args.size))
        spec = make_spec(args, Path(folder) / "images", Path(folder) / "out")
        print(f"{args.images} images {args.size[0]}x{args.size[1]}, model {args.model}, top_k {args.top_k}, "
              f"batch {args.batch_size}, {args.num_actors} actor(s) x {args.cpus_per_actor} CPU, torch {torch.__version__}")
        bare = bare_loop(spec, paths, args.cpus_per_actor * args.num_actors)
        rate, first_commit, total = job_rate(spec)
    print(f"bare model loop (decode + label_batch, {args.cpus_per_actor * args.num_actors} threads): {bare:8.2f} images/s")
    print(f"whole job, first to last commit:                        {rate:8.2f} images/s")
    print(f"  (start-up to the first commit {first_commit:.1f} s, whole run {total:.1f} s)")
    print(f"ratio job / bare loop: {rate / bare:.2f}")


if __name__ == "__main__":
    main()

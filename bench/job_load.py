"""A labelling job under load: images per second, and whether memory stays flat as the job grows.

    python bench/job_load.py                     # 5,000 then 20,000 images; about 20-30 min on 2 cores
    python bench/job_load.py --sizes 500 2000    # the short version

For each size N it writes N small synthetic images (`--image-size`, JPEG) to a temporary folder,
runs the whole job on a local Ray (the demo's tiny SED with random weights, at a 128x128 model
input by default: the pipeline's load, not the model's, is what this measures), and samples
every 0.5 s the memory of the driver and of every Ray worker process. It prints, per size: images
per second, the peak private memory (and RSS) of the driver and of the largest worker, the peak
private memory of all workers together, and checks that every image has exactly one row.
Each job runs in a fresh process, so its driver peak owes nothing to the previous size.
Memory that stays flat from the smaller to the larger size is what a job of millions needs: the
driver holds only the rows of shards not yet committed, the workers only their batches.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
import threading
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.label import JobOutput, run_job  # noqa: E402
from pipeline_throughput import write_images  # noqa: E402  (bench/ is this script's folder)
from schemas import JobSpec  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _memory_mb(pid: str) -> tuple[float, float]:
    """(RSS, private memory) of a process in MB.

    Private memory (RssAnon) leaves out shared libraries and the pages of Ray's object store that
    the process has touched: those count in RSS, but the store is one pool of bounded size shared
    by all processes, so a worker's RSS creeps up towards it as objects cycle through the pool.
    """
    fields = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("VmRSS", "RssAnon"):
                fields[name] = int(value.split()[0]) / 1024
    except OSError:
        pass
    return fields.get("VmRSS", 0.0), fields.get("RssAnon", 0.0)


def _ray_worker_pids() -> list[str]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().startswith(b"ray::"):
                    pids.append(entry.name)
            except OSError:
                continue
    return pids


class MemorySampler:
    """Peak memory (RSS and private) of this process and of Ray's worker processes, sampled in a thread."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.peaks = dict.fromkeys(("driver_rss", "driver", "worker_rss", "worker", "workers"), 0.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            driver_rss, driver = _memory_mb("self")
            workers = [_memory_mb(pid) for pid in _ray_worker_pids()] or [(0.0, 0.0)]
            sample = {
                "driver_rss": driver_rss,
                "driver": driver,
                "worker_rss": max(rss for rss, _ in workers),
                "worker": max(private for _, private in workers),
                "workers": sum(private for _, private in workers),
            }
            self.peaks = {name: max(peak, sample[name]) for name, peak in self.peaks.items()}


def make_spec(images: Path, output: Path, args: argparse.Namespace) -> JobSpec:
    demo = yaml.safe_load((REPO / "jobs" / "demo.yaml").read_text())
    return JobSpec.model_validate(
        {
            "input": {"url": str(images), "shard_size": args.shard_size},
            "taxonomy": demo["taxonomy"],
            "model": {"clip_model": demo["model"]["clip_model"], "weights": None, "image_size": args.model_size},
            "inference": {"top_k": 3, "batch_size": args.batch_size, "short_edge": None},
            "output": {"url": str(output), "formats": ["parquet", "coco"]},
            "ray": {"num_actors": args.num_actors, "num_cpus": args.ray_cpus},
        }
    )


def measure(size: int, args: argparse.Namespace) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        images = Path(tmp) / "images"
        write_images(images, size, (args.image_size, args.image_size))
        spec = make_spec(images, Path(tmp) / "out", args)
        # The job runs in a fresh process: its driver's peak owes nothing to writing the images
        # or to the previous size's job.
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            result = pool.submit(run_measured, spec).result()
    if result["rows"] != size or result["images"] != size:
        sys.exit(f"{size} images in, {result['rows']} rows out: the job lost or duplicated rows")
    return result


def run_measured(spec: JobSpec) -> dict[str, float]:
    """Run the job, sampling memory; what `measure` reports."""
    with MemorySampler() as memory:
        summary = run_job(spec)
    store = JobOutput(spec.output.url)
    return {
        "images": summary.images,
        "rows": sum(marker["images"] for marker in store.committed_shards().values()),
        "images_per_second": summary.images_per_second,
        **memory.peaks,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000], help="job sizes in images")
    parser.add_argument("--image-size", type=int, default=64, help="side of the square synthetic images")
    parser.add_argument("--model-size", type=int, default=128, help="model.image_size: what the model sees (the paper's 768 is ~30x slower)")
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-actors", type=int, default=1)
    parser.add_argument("--ray-cpus", type=int, default=None)
    args = parser.parse_args()
    results = [measure(size, args) for size in args.sizes]
    print("peak memory in MB: private (RssAnon) and, in brackets, RSS")
    print(f"{'images':>8} {'images/s':>9} {'driver':>15} {'largest worker':>15} {'all workers':>12}")
    for r in results:
        print(
            f"{r['images']:>8} {r['images_per_second']:>9.1f} {r['driver']:>7.0f} ({r['driver_rss']:>5.0f}) "
            f"{r['worker']:>7.0f} ({r['worker_rss']:>5.0f}) {r['workers']:>12.0f}"
        )
    first, last = results[0], results[-1]
    growth = ", ".join(f"{name} x{last[key] / first[key]:.2f}" for name, key in (("driver", "driver"), ("largest worker", "worker"), ("all workers", "workers")))
    print(f"private memory growth from {first['images']} to {last['images']} images: {growth}")


if __name__ == "__main__":
    main()

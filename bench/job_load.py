"""A labelling job under load: images per second, and whether memory stays flat as the job grows.

    python bench/job_load.py                     # 5,000 then 20,000 images; about 20-30 min on 2 cores
    python bench/job_load.py --sizes 500 2000    # the short version

For each size N it writes N small synthetic images (`--image-size`, JPEG) to a temporary folder,
runs the whole job on a local Ray (the demo's tiny SED with random weights, at a 128x128 model
input by default: the pipeline's load, not the model's, is what this measures), and samples every 0.5 s the resident memory of the driver (this process) and of every
Ray worker process. It prints, per size: images per second, peak driver RSS, peak RSS of the
largest worker and of all workers together, and checks that every image has exactly one row.
Memory that stays flat from the smaller to the larger size is what a job of millions needs: the
driver holds only the rows of shards not yet committed, the workers only their batches.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import OutputStore, run_job  # noqa: E402
from pipeline_throughput import write_images  # noqa: E402  (bench/ is this script's folder)
from schemas import JobSpec  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _rss_mb(pid: str) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


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
    """Peak RSS of this process and of Ray's worker processes, sampled in a background thread."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.driver = self.worker = self.workers = 0.0
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
            self.driver = max(self.driver, _rss_mb("self"))
            worker_rss = [_rss_mb(pid) for pid in _ray_worker_pids()]
            self.worker = max([self.worker, *worker_rss])
            self.workers = max(self.workers, sum(worker_rss))


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
        with MemorySampler() as memory:
            summary = run_job(spec)
        store = OutputStore(spec.output.url)
        rows = sum(marker["images"] for marker in store.committed_shards().values())
    if rows != size or summary.images != size:
        sys.exit(f"{size} images in, {rows} rows out: the job lost or duplicated rows")
    return {
        "images": size,
        "images_per_second": summary.images_per_second,
        "driver_mb": memory.driver,
        "worker_mb": memory.worker,
        "workers_mb": memory.workers,
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
    print(f"{'images':>8} {'images/s':>9} {'driver peak MB':>15} {'largest worker MB':>18} {'all workers MB':>15}")
    for r in results:
        print(f"{r['images']:>8} {r['images_per_second']:>9.1f} {r['driver_mb']:>15.0f} {r['worker_mb']:>18.0f} {r['workers_mb']:>15.0f}")
    first, last = results[0], results[-1]
    print(
        f"memory growth from {first['images']} to {last['images']} images: driver x{last['driver_mb'] / first['driver_mb']:.2f}, "
        f"largest worker x{last['worker_mb'] / first['worker_mb']:.2f}, all workers x{last['workers_mb'] / first['workers_mb']:.2f}"
    )


if __name__ == "__main__":
    main()

"""The pipeline's own ceiling: what one driver sustains, and what object-storage latency costs.

    python bench/scale.py                      # about 10 minutes on 2 cores
    python bench/scale.py --latencies 30 --start-shards 2000

(a) The same job (the demo's tiny SED at a 64x64 input, 768 synthetic images, shards of 256,
    outputs parquet + coco + png) to a local folder and to a real S3 server on loopback (moto)
    behind a proxy that delays every request by 10, 30 and 100 ms; images per second from the
    first shard commit to the last, and each S3 run's ratio to the local run.
(b) The driver's CPU seconds per image over the same span (/proc: user + system time of the
    driver process, its commit threads included), i.e. the images per second one driver could
    feed if the model were free.
(c) Start-up of a rerun over a job of `--start-shards` committed shards on that S3 at 30 ms per
    request: the seconds from the call until the job says it has nothing to do.
Each job runs in a fresh process (its driver's CPU owes nothing to the previous one).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from latency_proxy import LatencyProxy  # noqa: E402  (bench/ is this script's folder)
from pipeline_throughput import write_images  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BUCKET = "scale"


class Measured:
    """A `Progress` that notes when each shard commits, and the driver's CPU time then."""

    def __init__(self) -> None:
        self.commits: list[tuple[float, float, int]] = []  # (wall, driver CPU, images committed so far)
        self.nothing_to_do_at: float | None = None
        self.images = 0
        self.started = time.monotonic()

    def start(self, total: int, unit: str, description: str) -> None:
        pass

    def advance(self, steps: int = 1) -> None:
        pass

    def note(self, message: str) -> None:
        if message.startswith("shard "):
            self.images += int(message.split(": ")[1].split(" ok")[0]) + int(message.split(", ")[1].split(" errors")[0])
            times = os.times()
            self.commits.append((time.monotonic(), times.user + times.system, self.images))
        elif message.startswith("nothing to do"):
            self.nothing_to_do_at = time.monotonic() - self.started


def job_spec(images: Path, output: str, options: dict[str, Any], args: argparse.Namespace, formats: list[str]) -> dict[str, Any]:
    demo = yaml.safe_load((REPO / "jobs" / "demo.yaml").read_text())
    return {
        "input": {"url": str(images), "shard_size": args.shard_size},
        "taxonomy": {"classes": demo["taxonomy"]["classes"]},
        "model": {"clip_model": demo["model"]["clip_model"], "weights": None, "image_size": args.image_size},
        "inference": {"top_k": 3, "batch_size": args.batch_size},
        "output": {"url": output, "formats": formats, "storage_options": options},
        "ray": {"num_actors": 1},
    }


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """In a fresh process: run the job; the rate and driver CPU between the first and last commit."""
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    log = open(os.path.join(tempfile.gettempdir(), "sed-label-bench-scale.log"), "a")
    os.dup2(log.fileno(), 2)  # Ray's own notices: into the log, as the CLI keeps them
    from pipeline.label import run_job
    from schemas import JobSpec

    progress = Measured()
    summary = run_job(JobSpec.model_validate(spec), progress=progress)
    result = {"seconds": summary.seconds, "nothing_to_do_after": progress.nothing_to_do_at, "images": summary.images}
    if len(progress.commits) >= 2:
        (t0, cpu0, n0), (t1, cpu1, n1) = progress.commits[0], progress.commits[-1]
        result["images_per_second"] = (n1 - n0) / (t1 - t0)
        result["driver_cpu_ms_per_image"] = 1000 * (cpu1 - cpu0) / (n1 - n0)
    return result


def in_fresh_process(spec: dict[str, Any]) -> dict[str, Any]:
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(run_one, spec).result()


def start_moto() -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(150):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return server, port
        except OSError:
            time.sleep(0.2)
    server.kill()
    raise RuntimeError("moto_server did not start")


def s3_options(endpoint: str) -> dict[str, Any]:
    return {"key": "bench", "secret": "bench", "client_kwargs": {"endpoint_url": endpoint}}


def committed_job_on_s3(folder: Path, shards: int, args: argparse.Namespace, direct: str) -> dict[str, Any]:
    """A job of `shards` one-image shards whose every shard is committed, written straight to S3."""
    from pipeline.label.commit import COMMITTED_DIR, JobOutput
    from pipeline.label.run import prepare_output
    from pipeline.model_loading import random_weights_hash
    from pipeline.progress import LogProgress
    from pipeline.taxonomy import load_taxonomy
    from schemas import JobSpec

    inputs = folder / "start_inputs"
    inputs.mkdir()
    for i in range(shards):
        (inputs / f"img_{i:06d}.jpg").write_bytes(b"not decoded: every shard is committed")
    spec = job_spec(inputs, f"s3://{BUCKET}/start", s3_options(direct), args, ["parquet"])
    spec["input"]["shard_size"] = 1
    job = JobSpec.model_validate(spec)
    store, plan, _ = prepare_output(job, load_taxonomy(job.taxonomy), random_weights_hash(job.model), False, LogProgress())
    marker = '{"images": 1, "ok": 1, "errors": 0, "errors_by_reason": {}, "files": []}'.encode()
    ids = sorted(set(plan.column("shard_id").to_pylist()))
    JobOutput(store.url, store.storage_options).write_many({f"{COMMITTED_DIR}/{shard}.json": marker for shard in ids})
    return spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=768)
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=64, help="the model's input side")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--latencies", type=float, nargs="+", default=[10, 30, 100], help="ms added to every S3 request")
    parser.add_argument("--start-shards", type=int, default=10_000, help="committed shards of the start-up check (0: skip)")
    args = parser.parse_args()
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.machine())
    flags = sorted({f for line in open("/proc/cpuinfo") if line.startswith("flags") for f in line.split() if f.startswith(("avx512f", "avx2", "amx"))})
    print(f"CPU: {cpu} ({', '.join(flags)}), {os.cpu_count()} cores")
    server, port = start_moto()
    direct = f"http://127.0.0.1:{port}"
    try:
        import s3fs

        s3fs.S3FileSystem(**s3_options(direct)).mkdir(BUCKET)
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            write_images(folder / "images", args.images, (160, 120))
            formats = ["parquet", "coco", "png"]
            print(f"\n(a, b) {args.images} images, shards of {args.shard_size}, outputs {formats}, model input {args.image_size}x{args.image_size}")
            print(f"{'output':<28} {'images/s':>9} {'ratio':>6} {'driver CPU ms/image':>20}")
            local = in_fresh_process(job_spec(folder / "images", str(folder / "local"), {}, args, formats))
            print(f"{'local folder':<28} {local['images_per_second']:9.2f} {1.0:6.2f} {local['driver_cpu_ms_per_image']:20.3f}")
            for latency in args.latencies:
                proxy = LatencyProxy(port, latency / 1000)
                spec = job_spec(folder / "images", f"s3://{BUCKET}/out-{latency:g}ms", s3_options(proxy.endpoint), args, formats)
                result = in_fresh_process(spec)
                proxy.close()
                ratio = result["images_per_second"] / local["images_per_second"]
                name = f"S3, {latency:g} ms per request"
                print(f"{name:<28} {result['images_per_second']:9.2f} {ratio:6.2f} {result['driver_cpu_ms_per_image']:20.3f}")
            if args.start_shards:
                spec = committed_job_on_s3(folder, args.start_shards, args, direct)
                proxy = LatencyProxy(port, 0.030)
                spec["output"]["storage_options"] = s3_options(proxy.endpoint)
                result = in_fresh_process(spec)
                proxy.close()
                print(
                    f"\n(c) rerun over {args.start_shards} committed shards on S3 at 30 ms per request: "
                    f"'nothing to do' after {result['nothing_to_do_after']:.1f} s, whole command {result['seconds']:.1f} s "
                    f"({proxy.requests} requests)"
                )
    finally:
        server.terminate()
        server.wait(timeout=10)


if __name__ == "__main__":
    main()

"""A GPU's first measurement, in one short run: parity, speed and memory, and a labelling job.

    python bench/gpu_check.py                   # on a CUDA machine: about 3-5 minutes
    python bench/gpu_check.py --device cpu      # small sizes, the tiny demo model: CI keeps it working

(from the repository root, with the project installed). It prints; it never asserts, but it exits
with status 1 if the fixtures' parity fails.

1. Parity on the device: the tiny fixture model (`../shared/reference`) in float32, its logits,
   probabilities and early rejection against what the paper's code computed (within 1e-4), and
   bfloat16's argmax agreement with float32 on the fixture images.
2. The model alone: ConvNeXt-B (random weights, nothing downloaded) at T classes, exact and
   top_k=8, float32 and bfloat16, images/s of `label_batch` on 768x768 images at each batch size,
   and the device's memory peak of each.
3. A labelling job of `--images` generated images at `--job-classes` classes with one actor on
   the device (the product's whole path: plan, Ray Data reads and decodes, the actor, encode
   tasks, commits), its images/s after its first batch against the bare model loop over the same
   decoded images at the job's batch size.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import sed_model

REFERENCE_DIR = Path(__file__).resolve().parents[2] / "shared" / "reference"
PARITY_ATOL = 1e-4
# The demo's tiny SED (jobs/demo.yaml), for --device cpu.
TINY_CLIP = {
    "embed_dim": 64,
    "vision_cfg": {"timm_model_name": "test_convnext", "timm_model_pretrained": False, "timm_pool": "", "timm_proj": "linear", "timm_drop": 0.0, "image_size": 768},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--classes", type=int, default=None, help="T for the speed runs and the job (cuda: 150, cpu: 8)")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="batch sizes timed (cuda: 1 4 16, cpu: 1 2)")
    parser.add_argument("--images", type=int, default=None, help="images in the labelling job (cuda: 200, cpu: 8)")
    parser.add_argument(
        "--job-classes", type=int, default=8,
        help="T of the labelling job: the job encodes its T x 80 prompts once, in a one-CPU Ray task, before labelling",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed batches per setting, after one warm-up")
    parser.add_argument("--json", help="also write the figures to this file")
    return parser.parse_args()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def parity(device: torch.device) -> dict[str, Any]:
    """The fixture model on `device` against the paper's outputs; bfloat16's agreement with float32."""
    if not (REFERENCE_DIR / "sed_tiny_reference_outputs.pt").exists():
        return {"skipped": f"no fixtures at {REFERENCE_DIR}"}
    reference = torch.load(REFERENCE_DIR / "sed_tiny_reference_outputs.pt", weights_only=True)
    model = sed_model.build_sed(sed_model.SEDConfig(clip_model=reference["clip_cfg"], eval_pooling=2))
    sed_model.load_checkpoint(model, str(REFERENCE_DIR / "sed_tiny_official_format.pth"))
    model = model.eval().to(device)
    text = reference["text_features"].to(device)
    worst = 0.0
    labels = {}
    with torch.no_grad():
        for index, image in enumerate(reference["images"]):
            image = image.to(device)
            logits = model.forward_logits(image[None], text)
            for actual, expected in zip(logits, reference["eval_logits"][index]):
                worst = max(worst, float((actual[0].cpu() - expected).abs().max()))
            probs = model.predict(image, text)
            worst = max(worst, float((probs.cpu() - reference["eval_probs"][index]).abs().max()))
            for top_k in (1, 2):
                early = model.predict(image, text, top_k=top_k)
                worst = max(worst, float((early.cpu() - reference[f"cer_top{top_k}_probs"][index]).abs().max()))
            labels[index] = (probs.argmax(0), model.predict(image, text, precision="bfloat16").argmax(0))
    same = sum(int((a == b).sum()) for a, b in labels.values())
    total = sum(a.numel() for a, _ in labels.values())
    return {"max_abs_diff": worst, "ok": worst <= PARITY_ATOL, "bfloat16_agreement": same / total}


def model_speed(device: torch.device, clip_model: Any, classes: int, batches: list[int], repeats: int) -> list[dict[str, Any]]:
    """images/s of `label_batch` per (precision, mode, batch), with the memory peak of each."""
    torch.manual_seed(0)
    model = sed_model.build_sed(sed_model.SEDConfig(clip_model=clip_model)).eval().to(device)
    model.drop_text_tower()
    size = model.config.image_size
    text = F.normalize(torch.randn(classes, model.config.num_templates, model.backbone.embed_dim, device=device), dim=-1)
    rows = []
    for precision in ("float32", "bfloat16"):
        for top_k in (None, 8):
            for batch in batches:
                images = [torch.randint(0, 256, (3, size, size), dtype=torch.uint8, device=device) for _ in range(batch)]
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                model.label_batch(images, text, top_k, precision=precision)  # warm-up
                _sync(device)
                started = time.perf_counter()
                for _ in range(repeats):
                    model.label_batch(images, text, top_k, precision=precision)
                _sync(device)
                seconds = (time.perf_counter() - started) / repeats
                peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
                rows.append({"precision": precision, "top_k": top_k, "batch": batch, "images_per_second": batch / seconds, "peak_mb": peak})
                print(f"  {precision:<8} {'exact' if top_k is None else f'top_k={top_k}':<8} batch {batch:>3}: "
                      f"{batch / seconds:7.2f} images/s" + ("" if peak is None else f", peak {peak:,.0f} MB"), flush=True)
    return rows


class _Rate:
    """A job's `Progress` that keeps when images were done: the labelling rate after the first
    batch (the actor's start and first batch left out, as the bare loop's warm-up is)."""

    def __init__(self) -> None:
        self.times: list[tuple[float, int]] = []
        self.done = 0

    def start(self, total: int, unit: str, description: str) -> None:
        self.times, self.done = [], 0

    def advance(self, steps: int = 1) -> None:
        self.done += steps
        self.times.append((time.perf_counter(), self.done))

    def note(self, message: str) -> None:
        pass

    def steady_rate(self) -> float | None:
        """None when all images came in one batch of results (a run too small to tell)."""
        if len(self.times) < 2:
            return None
        (first_time, first_done), (last_time, last_done) = self.times[0], self.times[-1]
        return (last_done - first_done) / max(last_time - first_time, 1e-9)


def job_against_model(device: torch.device, clip_model: Any, classes: int, images: int, batch: int) -> dict[str, Any]:
    """A labelling job over `images` generated pictures with one actor on `device`, and the bare
    model loop over the same decoded pictures."""
    from jobs.console import session
    from pipeline.label import run_job
    from pipeline.model_loading import load_model
    from schemas import JobSpec

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / "images").mkdir()
        rng = np.random.default_rng(0)
        for i in range(images):
            picture = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
            Image.fromarray(picture).save(root / "images" / f"{i:05d}.jpg", quality=90)
        names = [f"class {i}" for i in range(classes)]
        spec = JobSpec.model_validate({
            "input": {"url": str(root / "images"), "shard_size": 50},
            "taxonomy": {"classes": names},
            "model": {"clip_model": clip_model, "weights": None},
            "inference": {"device": device.type, "batch_size": batch, "top_k": 8},
            "output": {"url": str(root / "out"), "formats": ["parquet"]},
            "ray": {"address": None, "num_actors": 1, "gpus_per_actor": 1 if device.type == "cuda" else 0},
        })
        rate = _Rate()
        with session("gpu-check") as current:  # Ray's and the libraries' output into a log file, as `sed-label run` does
            summary = run_job(spec, progress=rate)
        log = current.log_path

        loaded, _ = load_model(spec.model, device)
        predictor = sed_model.SEDPredictor(loaded, top_k=8)
        predictor.set_taxonomy(names)
        decoded = [torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1).to(device) for p in sorted((root / "images").iterdir())]
        predictor.label_batch(decoded[:batch])  # warm-up
        _sync(device)
        started = time.perf_counter()
        for first in range(0, len(decoded), batch):
            predictor.label_batch(decoded[first : first + batch])
        _sync(device)
        model_rate = len(decoded) / (time.perf_counter() - started)
    steady = rate.steady_rate()
    return {
        "images": images,
        "classes": classes,
        "job_images_per_second": summary.images_per_second,
        "job_steady_images_per_second": steady,
        "model_images_per_second": model_rate,
        "ratio": (summary.images_per_second if steady is None else steady) / model_rate,
        "log": log,
    }


def main() -> None:
    args = _parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device here: run with --device cpu to check the script itself")
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    classes = args.classes or (150 if on_gpu else 8)
    batches = args.batches or ([1, 4, 16] if on_gpu else [1, 2])
    images = args.images or (200 if on_gpu else 8)
    clip_model = "convnext_b" if on_gpu else TINY_CLIP
    name = torch.cuda.get_device_name(device) if on_gpu else "CPU"
    print(f"device: {name}; torch {torch.__version__}", flush=True)
    if not on_gpu:
        sed_model.prepare_cpu_inference()
    result: dict[str, Any] = {"device": name, "torch": torch.__version__}

    result["parity"] = parity(device)
    p = result["parity"]
    if "skipped" in p:
        print(f"parity: skipped ({p['skipped']})")
    else:
        print(f"parity: {'ok' if p['ok'] else 'FAILED'}: max |difference| {p['max_abs_diff']:.2e} from the paper's outputs "
              f"(tolerance {PARITY_ATOL:g}); bfloat16 argmax agreement with float32 {p['bfloat16_agreement']:.2%}", flush=True)

    model_name = "ConvNeXt-B" if on_gpu else "the tiny demo model"
    print(f"{model_name}, random weights, T={classes}, 768x768 images:", flush=True)
    result["model"] = model_speed(device, clip_model, classes, batches, args.repeats)

    job_batch = max(batches)
    print(f"labelling job: {images} images (640x480 JPEG), T={args.job_classes}, one actor on {device.type}, batch {job_batch}, top_k=8 ...", flush=True)
    result["job"] = job_against_model(device, clip_model, args.job_classes, images, job_batch)
    j = result["job"]
    steady = j["job_steady_images_per_second"]
    labelling = "one batch of results: too few images to tell" if steady is None else f"{steady:.2f} images/s labelling"
    print(f"job: {labelling} ({j['job_images_per_second']:.2f} with its start); the bare model loop: "
          f"{j['model_images_per_second']:.2f} images/s; job/model {j['ratio']:.2f} (Ray's output: {j['log']})", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if "ok" in p and not p["ok"]:
        sys.exit(1)


if __name__ == "__main__":
    main()

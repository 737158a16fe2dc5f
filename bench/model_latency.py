"""SED's speed and memory on this machine against the machine's own limit, measured in one run.

    python bench/model_latency.py                       # T = 150, 459, 847; about 10 minutes on 2 cores
    python bench/model_latency.py --classes 150 --bfloat16 32

(from the repository root, with the project installed or `PYTHONPATH=.`). It prints; it never asserts.

1. The machine's limits: GFLOP/s of the kernels SED is made of (matrix product, `Linear`, 1x1 and
   3x3 convolutions in channels-last), in float32 and bfloat16. The limit is the fastest of them.
2. Per taxonomy size T, in ms per image, the ConvNeXt-B geometry (768x768, random weights, nothing
   downloaded): the backbone, and the decoder in exact mode and with early rejection. Random
   weights make every class win some pixel, so real top-K rejection keeps everything; the "early"
   rows therefore force a fixed share of each image's classes (`--kept-share`) through the real
   rejection path (rows dropped after head0, attention over the kept classes only).
3. The rate on the paper's FLOPs (362 GFLOP for the backbone + 3.35 GFLOP per class and image for
   the decoder) and its ratio to the float32 limit, measured again in the same worker process
   right before and after the model (the faster of the two: a shared machine's speed drifts
   between processes, so each row is set against the limit of its own minutes); the peak RSS of each mode (a fresh process each,
   whose `ru_maxrss` is that mode's peak).
4. With `--bfloat16 T`, bfloat16 (autocast; on a CPU with the fused kernels the backbone only, the
   decoder staying in float32: `ops.decoder_precision`) at T classes, exact and early, each beside
   float32: the same timings, and how often its argmax label equals float32's: on the random
   ConvNeXt-B (overall, and beyond its near-ties: pixels whose float32 margin is under 0.001, which
   any rounding may flip), on the shared tiny fixtures (`../shared/reference`, if present), and on
   a model with real class margins: the demo's fine-tuned tiny SED (`--trained`, written by
   `sed-label train jobs/train_demo.yaml`) on its validation scenes, with the share of the pixels
   float32 is sure of whose label changes. Off by default: a CPU without native bfloat16
   (AVX512-BF16 or AMX) runs it many times slower than float32.

Each timing is the median of `--repeats` runs after `--warmups` untimed ones (default 2): a
process's first images are slower while its heap grows to its working size (measured on a 2-core
AMD EPYC at T=150, the decoder's first three calls 2.2, 1.9 and 1.6 s, then 1.5-1.6 s, with
41,000, 34,000, 4,000 and then ~550 page faults per call), and a labelling worker spends its life
in that steady state.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

BACKBONE_GFLOP = 362.0  # ConvNeXt-B image tower at 768x768, per image
DECODER_GFLOP_PER_CLASS = 3.35
REPO = Path(__file__).resolve().parents[1]
REFERENCE_DIR = REPO.parent / "shared" / "reference"
CONFIDENT_MARGIN = 0.05  # float32's top-1 minus top-2 probability above which a label should not change
TIE_MARGIN = 1e-3  # below it, a random model's pixel is a near-tie that bfloat16's rounding may flip


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[150, 459, 847], help="taxonomy sizes T")
    parser.add_argument("--kept-share", type=float, default=0.1, help="share of classes the early rows keep after head0")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs after the warm-ups (median)")
    parser.add_argument(
        "--warmups", type=int, default=2, help="untimed runs first: a process's first images grow its heap (see the module's docstring)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--bfloat16", type=int, default=None, metavar="T", help="also measure bfloat16 at T classes")
    parser.add_argument(
        "--trained",
        default=str(REPO / "outputs" / "train_demo" / "checkpoints" / "iter_0000150.safetensors"),
        help="with --bfloat16: the demo's fine-tuned tiny SED (sed-label train jobs/train_demo.yaml), whose agreement is measured too",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args()


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KB


def _timed(run: Callable[[], Any], repeats: int, warmups: int = 1) -> tuple[float, Any]:
    """Median seconds of `repeats` runs after `warmups` untimed ones, and the last result."""
    for _ in range(warmups):
        result = run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2], result


# Workers (each in a fresh process) ----------------------------------------------------------------
def _limits(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from sed_model.cpu.allocator import keep_freed_memory

    keep_freed_memory()  # as in the model's workers, so the limits are measured under the same malloc

    def rate(flop: float, run: Callable[[], Any]) -> float:
        seconds, _ = _timed(run, 5 if dtype == torch.float32 else 1)
        return flop / seconds / 1e9

    kernels = {}
    with torch.inference_mode():
        for dtype in (torch.float32, torch.bfloat16) if args.bfloat16 else (torch.float32,):
            name = "float32" if dtype == torch.float32 else "bfloat16"
            # Smaller bfloat16 problems: without native support they run at a few GFLOP/s.
            n, batch = (2048, 16) if dtype == torch.float32 else (1024, 2)
            a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
            kernels[f"{name} matmul {n}x{n}"] = rate(2 * n**3, lambda: a @ b)
            x = torch.randn(batch, 128, 48, 48, dtype=dtype).contiguous(memory_format=torch.channels_last)
            w = torch.randn(128, 128, 3, 3, dtype=dtype)
            kernels[f"{name} 3x3 conv 128->128 48x48 x{batch}, channels-last"] = rate(
                2 * batch * 48 * 48 * 128 * 128 * 9, lambda: F.conv2d(x, w, padding=1)
            )
            if dtype == torch.float32:
                rows = torch.randn(37_000, 512)
                linear = torch.nn.Linear(512, 512)
                kernels["float32 Linear 512->512 x37k rows"] = rate(2 * 37_000 * 512 * 512, lambda: linear(rows))
                image = torch.randn(1, 512, 185, 200).contiguous(memory_format=torch.channels_last)
                kernels["float32 1x1 conv 512->512, channels-last"] = rate(
                    2 * 37_000 * 512 * 512, lambda: F.conv2d(image, linear.weight[:, :, None, None], linear.bias)
                )
    return {
        "kernels": kernels,
        "float32": max(v for k, v in kernels.items() if k.startswith("float32")),
        "bfloat16": max((v for k, v in kernels.items() if k.startswith("bfloat16")), default=None),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def _conv_limit() -> float:
    """GFLOP/s of the float32 limit kernel (3x3 conv, channels-last), best of 5 after a warm-up."""
    import torch
    import torch.nn.functional as F

    x = torch.randn(16, 128, 48, 48).contiguous(memory_format=torch.channels_last)
    w = torch.randn(128, 128, 3, 3)
    with torch.inference_mode():
        F.conv2d(x, w, padding=1)
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            F.conv2d(x, w, padding=1)
            best = min(best, time.perf_counter() - start)
    return 2 * 16 * 48 * 48 * 128 * 128 * 9 / best / 1e9


def _force_kept_share(share: float, classes: int) -> None:
    """Make early rejection keep `share` of each image's classes after head0, and all of those later.

    Random weights give no real rejection; this drives the real rejection path with a fixed share.
    """
    import torch

    from sed_model import decoder

    def keep_share(logits: torch.Tensor, rows: decoder.Rows, top_k: int) -> torch.Tensor:
        keep = torch.ones(logits.shape[0], dtype=torch.bool)
        start = 0
        for count in rows.counts:
            if count == classes:  # after head0: every class is still there
                keep[start + max(1, round(count * share)) : start + count] = False
            start += count
        return keep

    decoder.early_reject = keep_share


def _agreement(labels: list[Any], reference: list[Any]) -> float:
    same = sum(int((a == b).sum()) for a, b in zip(labels, reference))
    return same / sum(b.numel() for b in reference)


def _agreement_beyond_ties(fast: Any, exact: Any) -> dict[str, float]:
    """Random weights leave many pixels at near-ties: the share of pixels whose float32 margin
    (top-1 minus top-2 probability) is under `TIE_MARGIN`, and the agreement on all the others."""
    top_two = exact.probs.topk(2, dim=0).values
    clear = (top_two[0] - top_two[1]) >= TIE_MARGIN
    same = (fast.labels == exact.labels) & clear
    return {"tie_share": 1 - float(clear.float().mean()), "agreement_clear": int(same.sum()) / max(int(clear.sum()), 1)}


def _fixture_agreement() -> float | None:
    """bfloat16 vs float32 argmax agreement of the tiny fixture model on the fixture images."""
    import torch

    import sed_model

    if not (REFERENCE_DIR / "sed_tiny_reference_outputs.pt").exists():
        return None
    reference = torch.load(REFERENCE_DIR / "sed_tiny_reference_outputs.pt", weights_only=True)
    cases = torch.load(REFERENCE_DIR / "sed_tiny_cer_cases.pt", weights_only=True)
    model = sed_model.build_sed(sed_model.SEDConfig(clip_model=reference["clip_cfg"]))
    sed_model.load_checkpoint(model, str(REFERENCE_DIR / "sed_tiny_official_format.pth"))
    model.eval()
    images, text = list(reference["images"]), cases["text_features"]
    exact = [p.labels for p in model.predict_batch(images, text)]
    fast = [p.labels for p in model.predict_batch(images, text, precision="bfloat16")]
    return _agreement(fast, exact)


def _trained_agreement(checkpoint: str) -> dict[str, float] | None:
    """bfloat16 vs float32 on a model with real class margins: the demo's fine-tuned tiny SED on
    its validation scenes (as training validates them). The argmax agreement, and the share of the
    pixels float32 is sure of (margin over `CONFIDENT_MARGIN`) whose label bfloat16 changes."""
    import numpy as np
    import torch
    import yaml
    from PIL import Image

    import sed_model
    from pipeline.model_loading import load_model
    from schemas import ModelSpec

    if not Path(checkpoint).exists():
        return None
    spec = yaml.safe_load((REPO / "jobs" / "train_demo.yaml").read_text())
    model, _ = load_model(ModelSpec(**{**spec["model"], "weights": checkpoint}))
    classes = spec["taxonomy"]["classes"]
    text = model.encode_classes(classes)
    same = confident = flipped = total = 0
    for path in sorted((REPO / "jobs" / "demo_train" / "val" / "images").iterdir()):
        image = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
        probs = {}
        for precision in ("float32", "bfloat16"):
            predictor = sed_model.SEDPredictor(model, short_edge=spec["recipe"]["short_edge"], precision=precision)
            predictor.set_taxonomy(classes, text_features=text)
            probs[precision] = predictor.predict(image).probs.float()
        exact, fast = probs["float32"].argmax(0), probs["bfloat16"].argmax(0)
        top_two = probs["float32"].topk(2, dim=0).values
        sure = (top_two[0] - top_two[1]) > CONFIDENT_MARGIN
        same += int((exact == fast).sum())
        confident += int(sure.sum())
        flipped += int((sure & (exact != fast)).sum())
        total += exact.numel()
    return {"agreement": same / total, "confident_share": confident / total, "confident_flipped": flipped / max(confident, 1)}


def _measure(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """One (T, exact/early, precision) in this fresh process."""
    import torch
    import torch.nn.functional as F

    import sed_model

    classes, rejection, precision = mode.split(":")
    classes = int(classes)
    sed_model.prepare_cpu_inference()  # what the labelling job's actors do on CPU
    if args.threads:
        torch.set_num_threads(args.threads)
    if rejection == "early":
        _force_kept_share(args.kept_share, classes)
    torch.manual_seed(0)
    model = sed_model.build_sed(sed_model.SEDConfig(clip_model="convnext_b")).eval()
    model.drop_text_tower()  # as the job's actors do: they get the text embeddings computed once per job
    size = model.config.image_size
    image = torch.randint(0, 256, (1, 3, size, size), dtype=torch.uint8)
    # Random embeddings stand in for encode_classes: encoding T x 80 prompts with a random text
    # tower would take minutes and measure nothing of the image path.
    text = F.normalize(torch.randn(classes, model.config.num_templates, model.backbone.embed_dim), dim=-1)
    top_k = 8 if rejection == "early" else None
    setup_mb = _peak_rss_mb()
    limit_before = _conv_limit()
    with torch.inference_mode():  # each part in the precision the model's predictions use
        with model.autocast(precision):
            backbone_s, features = _timed(lambda: model.dense_features(image), args.repeats, args.warmups)
        cost, appearance = model.decoder_inputs(features, text, precision)
        with model.decoder_autocast(precision):
            decoder_s, outputs = _timed(lambda: model.decoder(cost, appearance, model.pooling, top_k), args.repeats, args.warmups)
        result = {
            "mode": mode,
            "limit_gflops": max(limit_before, _conv_limit()),
            "backbone_ms": backbone_s * 1e3,
            "decoder_ms": decoder_s * 1e3,
            "kept": outputs[0].rows.image_index.numel(),
            "peak_rss_mb": _peak_rss_mb(),
            "setup_rss_mb": setup_mb,
        }
        if precision == "bfloat16":
            exact = model.predict_batch([image[0]], text, top_k, [(size // 4, size // 4)])
            fast = model.predict_batch([image[0]], text, top_k, [(size // 4, size // 4)], precision="bfloat16")
            result["agreement_random"] = _agreement([p.labels for p in fast], [p.labels for p in exact])
            result.update(_agreement_beyond_ties(fast[0], exact[0]))
            if rejection == "exact":  # the tiny models are measured once, as they are labelled (exact)
                result["agreement_fixtures"] = _fixture_agreement()
                result["agreement_trained"] = _trained_agreement(args.trained)
    return result


# Driver --------------------------------------------------------------------------------------------
def _run_worker(mode: str) -> dict[str, Any]:
    """This script again with `--worker mode`, in a fresh process; its last stdout line is JSON."""
    print(f"measuring {mode} ...", file=sys.stderr, flush=True)
    command = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--worker", mode]
    completed = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if completed.returncode:
        sys.exit(f"the {mode} worker failed with exit status {completed.returncode}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _report(args: argparse.Namespace, limits: dict[str, Any], results: list[dict[str, Any]]) -> None:
    print(f"torch {limits['torch']}, {limits['threads']} threads")
    print("machine limits (GFLOP/s):")
    for name, value in limits["kernels"].items():
        print(f"  {name:<48} {value:7.0f}")
    f32, bf16 = limits["float32"], limits["bfloat16"]
    print(f"  float32 limit {f32:.0f} GFLOP/s (the fastest float32 kernel)")
    if bf16 is not None:
        print(f"  bfloat16 limit {bf16:.0f} GFLOP/s (the fastest bfloat16 kernel)")
    print()
    print("SED ConvNeXt-B, random weights, one 768x768 image, median of "
          f"{args.repeats} run(s) after {args.warmups} warm-up(s); early = {args.kept_share:.0%} of the classes kept after head0")
    header = (
        f"{'T':>4} {'mode':<6} {'precision':<9} {'kept':>5} {'backbone':>9} {'decoder':>9} {'total':>9} {'GFLOP/s':>8} "
        f"{'limit':>6} {'/limit':>7} {'peak RSS':>9}"
    )
    print(header)
    print(f"{'':>4} {'':<6} {'':<9} {'':>5} {'ms':>9} {'ms':>9} {'ms':>9} {'':>8} {'GF/s':>6} {'':>7} {'MB':>9}")
    print("-" * len(header))
    for r in results:
        classes, rejection, precision = r["mode"].split(":")
        total_ms = r["backbone_ms"] + r["decoder_ms"]
        paper_gflop = BACKBONE_GFLOP + DECODER_GFLOP_PER_CLASS * int(classes)
        rate = paper_gflop / (total_ms / 1e3)
        limit = max(f32, r["limit_gflops"]) if precision == "float32" else bf16
        print(
            f"{classes:>4} {rejection:<6} {precision:<9} {r['kept']:>5} {r['backbone_ms']:>9.0f} {r['decoder_ms']:>9.0f} "
            f"{total_ms:>9.0f} {rate:>8.0f} {limit:>6.0f} {rate / limit:>7.2f} {r['peak_rss_mb']:>9.0f}"
        )
    print("(GFLOP/s: the paper's FLOPs for all T classes over the time taken, so early rejection can pass the limit;")
    print(" limit: the float32 limit, the faster of the one above and the one measured around this row's model run")
    print(" in its own process; bfloat16 rows: the bfloat16 limit above)")
    by_mode = {r["mode"]: r for r in results}
    for r in results:
        classes, rejection, precision = r["mode"].split(":")
        if precision != "bfloat16":
            continue
        base = by_mode.get(f"{classes}:{rejection}:float32")
        speed = "" if base is None else f", {(base['backbone_ms'] + base['decoder_ms']) / (r['backbone_ms'] + r['decoder_ms']):.2f}x float32's speed"
        print(f"bfloat16 at T={classes} ({rejection}): argmax agreement with float32 {r['agreement_random']:.2%} "
              f"(random ConvNeXt-B; {r['agreement_clear']:.2%} beyond its {r['tie_share']:.1%} of near-ties, "
              f"margin < {TIE_MARGIN}){speed}")
        if rejection != "exact":
            continue
        fixtures = r["agreement_fixtures"]
        print(f"  the tiny fixtures (150 classes): agreement {'n/a (no ../shared/reference)' if fixtures is None else f'{fixtures:.2%}'}")
        trained = r["agreement_trained"]
        if trained is None:
            print(f"  the fine-tuned demo model: not measured ({args.trained} missing: sed-label train jobs/train_demo.yaml)")
        else:
            print(f"  the fine-tuned demo model on its validation scenes: agreement {trained['agreement']:.2%}; of the "
                  f"{trained['confident_share']:.0%} of pixels float32 is sure of (margin > {CONFIDENT_MARGIN}), "
                  f"{trained['confident_flipped']:.3%} change label")


def main() -> None:
    args = _parse_args()
    if args.worker == "limits":
        print(json.dumps(_limits(args)))
        return
    if args.worker is not None:
        print(json.dumps(_measure(args.worker, args)))
        return
    limits = _run_worker("limits")
    modes = [f"{t}:{rejection}:float32" for t in args.classes for rejection in ("exact", "early")]
    if args.bfloat16:
        modes += [f"{args.bfloat16}:{rejection}:{precision}" for rejection in ("exact", "early") for precision in ("float32", "bfloat16")]
    modes = list(dict.fromkeys(modes))
    _report(args, limits, [_run_worker(mode) for mode in modes])


if __name__ == "__main__":
    main()

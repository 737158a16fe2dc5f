"""CPU latency and peak memory of SED (ConvNeXt-B geometry), exact decoding vs category early rejection.

    python bench/model_latency.py --classes 150
    python bench/model_latency.py --classes 20 --repeats 1 --threads 2 --batch 2

(from the repository root, with the project installed or `PYTHONPATH=.`).

The model is `build_sed(SEDConfig(clip_model="convnext_b"))` with random weights (nothing is
downloaded), run on random uint8 3x768x768 images against T random L2-normalised text embeddings
`(T, 80, D)`. Per image, in milliseconds (median over `--repeats` runs, after one warm-up run):

- backbone: `model.dense_features` (preprocessing and the ConvNeXt trunk);
- decoder: `cost_volume` and `model.decoder` on the same precomputed backbone features, in exact
  mode (`top_k=None`) or with early rejection (`--top-k`);
- total: backbone + decoder.

With random weights the heads' logits are noise, so early rejection keeps a random-ish class set,
in practice nearly all of it (every position of a head's map keeps its own top-K): the speed-up here
depends on how many classes survive, which the table shows after each head.

Each mode runs in a fresh worker process (this script again, with a hidden `--worker MODE`), whose
`ru_maxrss` gives that mode's peak RSS; "growth" is how far inference raised it above its value
once the model and the inputs were built. The benchmark prints; it never asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

MODES = ("exact", "early")
HEADS = ("head0", "head1", "head2")


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {number}")
    return number


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=_positive_int, default=150, help="taxonomy size T (default 150)")
    parser.add_argument("--top-k", type=_positive_int, default=8, help="early rejection's K (default 8)")
    parser.add_argument("--repeats", type=_positive_int, default=2, help="timed runs after the warm-up (default 2)")
    parser.add_argument("--threads", type=_positive_int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--batch", type=_positive_int, default=1, help="images per batch (default 1)")
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    return parser.parse_args()


def _peak_rss_mb() -> float:
    """This process's peak resident set size; Linux reports `ru_maxrss` in KB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _median_ms_per_image(run: Callable[[], Any], repeats: int, batch: int) -> tuple[float, Any]:
    """Time `run` `repeats` times; return the median in ms per image and the last run's result."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000 / batch, result


def _measure(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """One mode, in this (fresh) process: build, warm up, time; kept classes and peak RSS."""
    # Imported here, not at the top: a child's ru_maxrss starts at its parent's peak RSS (Linux
    # carries it across fork/exec), so the parent must stay small and never import torch.
    import torch
    import torch.nn.functional as F

    import sed_model

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = sed_model.build_sed(sed_model.SEDConfig(clip_model="convnext_b")).eval()
    size = model.config.image_size
    images = torch.randint(0, 256, (args.batch, 3, size, size), dtype=torch.uint8)
    # Random embeddings stand in for encode_classes: encoding T x 80 prompts (12000 for T=150) with
    # the random text tower would take minutes and measure nothing of the image path.
    text = F.normalize(torch.randn(args.classes, model.config.num_templates, model.backbone.embed_dim), dim=-1)
    top_k = None if mode == "exact" else args.top_k
    setup_rss_mb = _peak_rss_mb()

    def decode(features: dict[str, torch.Tensor]) -> list[Any]:
        cost = sed_model.cost_volume(features["clip_vis_dense"], text)
        return model.decoder(cost, (features["res4"], features["res3"], features["res2"]), model.pooling, top_k)

    with torch.inference_mode():
        # Warm-up: one full prediction (backbone, cost volume, decoder with this mode's top_k), which
        # also tells which classes survive each head. Probabilities stay at the decoder's 192x192
        # output, so no T x 768 x 768 resize inflates the peak.
        low_res = [(size // 4, size // 4)] * args.batch
        predictions = model.predict_batch(list(images), text, top_k, low_res)
        backbone_ms, features = _median_ms_per_image(lambda: model.dense_features(images), args.repeats, args.batch)
        decoder_ms, _ = _median_ms_per_image(lambda: decode(features), args.repeats, args.batch)

    kept = {head: statistics.mean(p.kept_after[head].numel() for p in predictions) for head in HEADS}
    return {
        "mode": mode,
        "top_k": top_k,
        "backbone_ms": backbone_ms,
        "decoder_ms": decoder_ms,
        "total_ms": backbone_ms + decoder_ms,
        "kept": kept,
        "peak_rss_mb": _peak_rss_mb(),
        "setup_rss_mb": setup_rss_mb,
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "embed_dim": model.backbone.embed_dim,
        "image_size": size,
    }


def _run_worker(mode: str) -> dict[str, Any]:
    """Re-run this script as `--worker mode`; its last stdout line is the result as JSON."""
    print(f"measuring {mode} mode in a fresh process ...", file=sys.stderr, flush=True)
    command = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--worker", mode]
    completed = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if completed.returncode:
        sys.exit(f"the {mode} worker failed with exit status {completed.returncode}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _print_report(args: argparse.Namespace, results: list[dict[str, Any]]) -> None:
    first = results[0]
    print(f"torch {first['torch_version']}, {first['threads']} threads")
    print(
        f"SED convnext_b (random weights), image {first['image_size']}x{first['image_size']}, "
        f"T={args.classes} classes x 80 templates, D={first['embed_dim']}, batch {args.batch}, "
        f"median of {args.repeats} run(s) after 1 warm-up"
    )
    print()
    header = (
        f"{'mode':<8} {'top_k':>5} {'backbone':>10} {'decoder':>10} {'total':>10}  "
        f"{'kept head0/head1/head2':>22} {'peak RSS':>9} {'growth':>8}"
    )
    print(header)
    print(f"{'':<8} {'':>5} {'ms/image':>10} {'ms/image':>10} {'ms/image':>10}  {'(mean per image)':>22} {'MB':>9} {'MB':>8}")
    print("-" * len(header))
    for r in results:
        kept = "/".join(f"{r['kept'][head]:g}" for head in HEADS)
        top_k = "-" if r["top_k"] is None else str(r["top_k"])
        print(
            f"{r['mode']:<8} {top_k:>5} {r['backbone_ms']:>10.0f} {r['decoder_ms']:>10.0f} {r['total_ms']:>10.0f}  "
            f"{kept:>22} {r['peak_rss_mb']:>9.0f} {r['peak_rss_mb'] - r['setup_rss_mb']:>8.0f}"
        )
    exact, early = results
    print()
    print(
        f"early rejection speed-up (exact / top-{args.top_k}): total {exact['total_ms'] / early['total_ms']:.2f}x, "
        f"decoder alone {exact['decoder_ms'] / early['decoder_ms']:.2f}x"
    )
    if early["kept"]["head2"] == args.classes:
        print(
            f"note: top-{args.top_k} rejected no class (random weights give noisy logits, and with one top-K per "
            "pixel nearly every class wins somewhere), so both modes did the same work: the ratio is noise"
        )


def main() -> None:
    args = _parse_args()
    if args.worker is not None:
        print(json.dumps(_measure(args.worker, args)))
        return
    _print_report(args, [_run_worker(mode) for mode in MODES])


if __name__ == "__main__":
    main()

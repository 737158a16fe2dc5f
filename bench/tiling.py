"""Large images: the protocol's shrink against tiling, side by side in one run.

    python bench/tiling.py                                   # a 6000x4000 scan, T = 6 and 150
    python bench/tiling.py --size 4000x3000 --classes 150 --scale 0.5

(from the repository root, with the project installed or `PYTHONPATH=.`). It prints; it never asserts.

The model is the demo's tiny SED (`jobs/demo.yaml`: ConvNeXt geometry of the decoder, a small
image tower, random weights: the labels are meaningless, the costs are real; the decoder's cost per
class and window is the ConvNeXt-B decoder's). The scan is a smooth random colour field with thin
lines. Per mode (untiled, tiled) and taxonomy size T, in a fresh process: seconds per image,
windows, and the process's peak RSS above what it held before labelling (the model, the image).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="6000x4000", help="WIDTHxHEIGHT of the scan")
    parser.add_argument("--classes", type=int, nargs="+", default=[6, 150], help="taxonomy sizes T")
    parser.add_argument("--window", type=int, default=768)
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args()


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _measure(mode: str, args: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F
    import yaml

    import sed_model
    from pipeline.model_loading import load_model
    from schemas import ModelSpec

    tiled, classes = mode.split(":")
    classes = int(classes)
    sed_model.prepare_cpu_inference()
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = yaml.safe_load((REPO / "jobs" / "demo.yaml").read_text())
    model, _ = load_model(ModelSpec(**spec["model"]))
    model.drop_text_tower()
    width, height = (int(v) for v in args.size.split("x"))
    generator = torch.Generator().manual_seed(0)
    field = F.interpolate(torch.rand((1, 3, 8, 12), generator=generator) * 255, size=(height, width), mode="bilinear")[0]
    field[:, ::97, :] = 255  # one-pixel lines: what the protocol's shrink erases
    image = field.clamp(0, 255).to(torch.uint8)
    text = F.normalize(torch.randn(classes, model.config.num_templates, model.backbone.embed_dim, generator=generator), dim=-1)
    tiling = sed_model.Tiling(window=args.window, overlap=args.overlap, min_side=min(height, width) - 1, scale=args.scale) if tiled == "tiled" else None
    predictor = sed_model.SEDPredictor(model, tiling=tiling)
    predictor.set_taxonomy([f"class {i}" for i in range(classes)], text_features=text)
    before = _peak_rss_mb()
    started = time.perf_counter()
    labelling = predictor.label_batch([image], margins=True)[0]
    seconds = time.perf_counter() - started
    return {"mode": mode, "seconds": seconds, "windows": labelling.windows, "rss_above_mb": _peak_rss_mb() - before, "before_mb": before}


def main() -> None:
    args = _parse_args()
    if args.worker:
        print(json.dumps(_measure(args.worker, args)))
        return
    results = []
    for classes in args.classes:
        for tiled in ("untiled", "tiled"):
            mode = f"{tiled}:{classes}"
            print(f"measuring {mode} ...", file=sys.stderr, flush=True)
            command = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--worker", mode]
            completed = subprocess.run(command, stdout=subprocess.PIPE, text=True, cwd=REPO)
            if completed.returncode:
                sys.exit(f"the {mode} worker failed with exit status {completed.returncode}")
            results.append(json.loads(completed.stdout.strip().splitlines()[-1]))
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; scan {args.size}, window {args.window}, overlap {args.overlap}, scale {args.scale}")
    print(f"{'T':>4} {'mode':<8} {'windows':>7} {'s/image':>8} {'peak RSS above start':>21}")
    for r in results:
        tiled, classes = r["mode"].split(":")
        print(f"{classes:>4} {tiled:<8} {r['windows']:>7} {r['seconds']:>8.1f} {r['rss_above_mb']:>18.0f} MB")
    for classes in args.classes:
        untiled, tiled = (next(r for r in results if r["mode"] == f"{m}:{classes}") for m in ("untiled", "tiled"))
        print(f"T={classes}: tiling costs {tiled['seconds'] / untiled['seconds']:.1f}x the untiled time ({tiled['windows']} windows)")


if __name__ == "__main__":
    main()

"""DDP workers resolve precision "auto" alike: the least capable worker decides, over a real process group."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import sed_model
from pipeline.train import run as train

# What each rank's device would run natively: a newer GPU and an older one.
NATIVE = ("bfloat16", "float16")


def _resolve(rank: int, world: int, init_file: str, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        # Stands in for each worker's GPU generation (the CPUs here all resolve to float32).
        sed_model.training_precision = lambda requested, device: requested if requested != "auto" else NATIVE[rank]
        results[rank] = (
            train._common_precision("auto", torch.device("cpu"), world),
            train._common_precision("bfloat16", torch.device("cpu"), world),  # explicit: never overridden
        )
    finally:
        dist.destroy_process_group()


def test_auto_precision_is_the_least_capable_workers(tmp_path):
    world = len(NATIVE)
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_resolve, args=(world, os.fspath(tmp_path / "init"), results), nprocs=world)
        resolved = dict(results)
    assert resolved == {rank: ("float16", "bfloat16") for rank in range(world)}

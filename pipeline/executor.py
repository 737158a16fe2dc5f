"""Connecting to Ray, shared by the labelling job (`run.py`) and the benchmark evaluation (`benchmark.py`)."""

from __future__ import annotations

import logging

import ray

from schemas import RaySpec


def connect_ray(spec: RaySpec) -> bool:
    """Connect to (or start) Ray; True if this call started it and so should shut it down."""
    if ray.is_initialized():
        return False
    if spec.address is None:
        # "local": always a new embedded instance, never a cluster that happens to run on this machine.
        ray.init(address="local", num_cpus=spec.num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    else:
        ray.init(address=spec.address, log_to_driver=False)
    return True


def quiet_ray_data() -> None:
    """Progress is reported per shard or per image by the caller; Ray Data's own logs would drown it."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)

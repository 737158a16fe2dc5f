"""Integration fixtures: a real local Ray and a real S3 server on loopback (helpers: `helpers.py`)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray

from .helpers import free_port


@pytest.fixture(scope="module")
def local_ray(request):
    """A real local Ray per test module; the module's jobs reuse it instead of starting their own.

    Per module, not per session: no Ray of ours runs while the submission test starts a head, and
    none is left to shut down at interpreter exit. Its logical CPUs: the module's `RAY_CPUS`, else
    2 (the CI machine's cores); its workers' runtime environment: the module's `RAY_RUNTIME_ENV`.
    """
    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=getattr(request.module, "RAY_CPUS", 2),
            runtime_env=getattr(request.module, "RAY_RUNTIME_ENV", None),
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto in server mode) on loopback; yields fsspec storage options."""
    port = free_port()
    moto_server = Path(sys.executable).with_name("moto_server")
    process = subprocess.Popen([str(moto_server), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        process.kill()
        raise RuntimeError("moto_server did not start")
    os.environ["AWS_DEFAULT_REGION"] = "us-east-1"  # s3fs creates buckets in the default region
    options = {"key": "testing-key-id", "secret": "testing-secret-value", "client_kwargs": {"endpoint_url": endpoint}}
    yield options
    process.terminate()
    process.wait(timeout=10)

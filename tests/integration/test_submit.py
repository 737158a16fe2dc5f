"""Cluster submission through Ray's job API, against a real Ray head on loopback (token auth on)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from tests.helpers import REPO

from .helpers import free_port


@pytest.fixture()
def ray_head(tmp_path):
    """`ray start --head --block` in its own process group, killed (group and all) afterwards."""
    bin_dir = str(Path(sys.executable).parent)
    env = dict(os.environ, RAY_AUTH_MODE="token", PATH=f"{bin_dir}:{os.environ['PATH']}")
    subprocess.run([f"{bin_dir}/ray", "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    dashboard = free_port()
    # Every port chosen free: the session's own local Ray already holds Ray's default agent ports,
    # and a head whose job agent cannot bind answers every submission "No available agent".
    ports = [
        f"--{name}={free_port()}"
        for name in ("port", "ray-client-server-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                     "runtime-env-agent-port", "metrics-export-port", "node-manager-port", "object-manager-port")
    ]
    head = subprocess.Popen(
        [f"{bin_dir}/ray", "start", "--head", "--block", "--num-cpus=2", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard}", *ports],
        env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 120
    while subprocess.run([f"{bin_dir}/ray", "job", "list", "--address", address], env=env, capture_output=True, timeout=60).returncode:
        if time.monotonic() > deadline or head.poll() is not None:
            os.killpg(head.pid, signal.SIGKILL)
            raise RuntimeError("the Ray head's job server did not come up")
        time.sleep(1)
    yield address, env
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=5)  # `ray start --block` often ignores SIGTERM; the group is killed below
    except subprocess.TimeoutExpired:
        pass
    try:  # the head's daemons outlive `ray start --block`: end the whole group
        os.killpg(head.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.mark.slow
def test_submit_runs_the_job_on_the_cluster(ray_head, tmp_path):
    """`sed-label submit --wait` in its own process: Ray reads the token mode when it starts."""
    address, env = ray_head
    spec_data = yaml.safe_load((REPO / "jobs" / "demo.yaml").read_text())
    spec_data["input"]["url"] = str(REPO / "jobs" / "demo_images")
    spec_data["output"]["url"] = str(tmp_path / "out")
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec_data))
    result = subprocess.run(
        [f"{Path(sys.executable).parent}/sed-label", "submit", str(tmp_path / "job.yaml"), "--address", address, "--wait"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=400,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "SUCCEEDED" in result.stdout and "6 images: 6 ok, 0 errors" in result.stdout
    assert (tmp_path / "out" / "labels.coco.json").exists()

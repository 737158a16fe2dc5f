"""A worker node lost mid-job, on a real multi-node Ray cluster on one machine
(`ray.cluster_utils.Cluster`: a head and two worker nodes, each its own raylet): the job ends with
exactly one row per image, equal to an undisturbed run's."""

from __future__ import annotations

import time

import pytest
import ray
from ray.cluster_utils import Cluster

from pipeline.label import JobOutput, run_job
from tests.helpers import TINY_CHECKPOINT

from .fault_proxy import FaultProxy
from .helpers import free_port, read_rows, tiny_job, write_inputs
from .processes import parent_of, pids_titled, run_in_thread, wait_for
from .test_reliability import HELD_IMAGE, comparable

# Three raylets and a job: about a minute on 2 cores.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    """The head runs nothing (no CPUs): every task and actor lands on one of the two worker nodes."""
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    # The driver joins before the worker nodes exist, so it is attached to the head's raylet (Ray
    # refuses to remove the node a driver is attached to, and on one machine it could pick any).
    ray.init(address=cluster.address, log_to_driver=False)
    workers = [cluster.add_node(num_cpus=2) for _ in range(2)]
    cluster.wait_for_nodes()
    yield cluster, workers
    ray.shutdown()
    cluster.shutdown()


def node_of(pid: int, nodes: list) -> object:
    """The cluster node whose raylet started worker process `pid` (a raylet forks its workers)."""
    matches = [node for node in nodes if node.all_processes["raylet"][0].process.pid == parent_of(pid)]
    assert len(matches) == 1, f"worker {pid} was started by no worker node's raylet"
    return matches[0]


def test_a_lost_worker_node_costs_retries_not_rows(cluster, s3_server, tmp_path, reference):
    import s3fs

    cluster, workers = cluster
    endpoint = s3_server["client_kwargs"]["endpoint_url"]
    proxy = FaultProxy(int(endpoint.rsplit(":", 1)[1]))
    direct = s3fs.S3FileSystem(**s3_server)
    bucket = f"nodes-{free_port()}"
    direct.mkdir(bucket)
    inputs = write_inputs(tmp_path / "images")
    direct.put(str(tmp_path / "images") + "/", f"{bucket}/images/", recursive=True)
    options = {**s3_server, "client_kwargs": {"endpoint_url": proxy.endpoint}}

    def spec(output: str) -> object:
        return tiny_job(
            reference,
            f"s3://{bucket}/images/",
            f"s3://{bucket}/{output}/",
            input__storage_options=options,
            output__storage_options=options,
            model__weights=str(TINY_CHECKPOINT),  # every node sees this machine's disk
            input__shard_size=1,
            inference__batch_size=1,
        )

    undisturbed = spec("undisturbed")
    run_job(undisturbed)
    expected = comparable(read_rows(JobOutput(undisturbed.output.url, s3_server)))

    disturbed = spec("out")
    proxy.hold(HELD_IMAGE)  # the last read waits: the job is mid-way when the node goes
    thread, outcome = run_in_thread(run_job, disturbed)
    wait_for(lambda: direct.invalidate_cache() or direct.glob(f"{bucket}/out/_committed/*.json"), "the first committed shard")
    wait_for(lambda: proxy.requests_held > 0, "the held image's read")
    actors = pids_titled(b"MapWorker", raylets={node.all_processes["raylet"][0].process.pid for node in workers})
    assert actors, "no model actor process found on this cluster's worker nodes"
    lost = node_of(actors[0], workers)
    proxy.release()
    time.sleep(2)  # the released task's rows reach the actor on the node about to be lost
    assert len(direct.glob(f"{bucket}/out/_committed/*.json")) < len(inputs), "the node must be lost mid-job"
    cluster.remove_node(lost)  # kills its raylet and every process on it
    thread.join(timeout=600)
    proxy.close()
    assert "error" not in outcome, outcome.get("error")
    rows = read_rows(JobOutput(disturbed.output.url, s3_server))
    assert len(rows) == len(inputs)  # exactly one row per image: nothing lost, nothing twice
    assert comparable(rows) == expected
    assert outcome["result"].images == len(inputs)

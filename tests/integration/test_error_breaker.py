"""A job whose images fail for a cause that is not theirs stops, commits none of those failures,
and finishes on a rerun once the cause is fixed (`pipeline/label/breaker.py`).

Real jobs on the module's local Ray; the inputs vanish from a real folder, access to a real S3
input is denied by `FaultProxy` (the output stays reachable), and the model fails on marked images
(`inference_faults.py`, installed in every Ray worker).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from jobs.cli import app
from pipeline.label import ErrorRateExceeded, JobOutput, run_job
from pipeline.progress import LogProgress
from tests.helpers import REPO, TINY_CHECKPOINT

from .fault_proxy import FaultProxy
from .helpers import free_port, image_bytes, read_rows, tiny_job
from .inference_faults import POISONED_WIDTH

pytestmark = pytest.mark.usefixtures("local_ray")

RAY_RUNTIME_ENV = {
    "worker_process_setup_hook": "tests.integration.inference_faults.fail_on_poisoned_images",
    "env_vars": {"PYTHONPATH": str(REPO)},
}
IMAGES = 40
SHARD_SIZE = 4
VOLATILE_COLUMNS = ("labeled_at", "source", "model_seconds")  # when, from where, how long: not the labels


class FirstCommitStops(Exception):
    """The driver going away right after a shard was committed."""


class StopAfterFirstCommit(LogProgress):
    def note(self, message: str) -> None:
        super().note(message)
        if " committed: " in message:
            raise FirstCommitStops(message)


def write_images(folder: Path, poisoned: set[int] = frozenset()) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(IMAGES):
        name = f"img{i:03d}.png"
        (folder / name).write_bytes(image_bytes(POISONED_WIDTH if i in poisoned else 48, 40, i))
        names.append(name)
    return names


def comparable(rows: list[dict]) -> dict[str, dict]:
    return {r["image_id"]: {k: v for k, v in r.items() if k not in VOLATILE_COLUMNS} for r in rows}


def job(reference: dict, input_url: str, output_url: str, **overrides: object):
    return tiny_job(reference, input_url, output_url, input__shard_size=SHARD_SIZE, inference__batch_size=4, **overrides)


def stop_after_first_commit(spec) -> set[str]:
    with pytest.raises(FirstCommitStops):
        run_job(spec, progress=StopAfterFirstCommit())
    committed = set(JobOutput(spec.output.url, spec.output.storage_options).committed_shard_ids())
    assert 1 <= len(committed) < IMAGES // SHARD_SIZE, "the first run should stop mid-way"
    return committed


def images_of_other_shards(store: JobOutput, committed: set[str]) -> list[str]:
    plan = store.read_plan().to_pylist()
    return [row["image_id"] for row in plan if row["shard_id"] not in committed]


@pytest.fixture(scope="module")
def undisturbed(tmp_path_factory, reference):
    root = tmp_path_factory.mktemp("undisturbed")
    write_images(root / "images")
    spec = job(reference, str(root / "images"), str(root / "out"))
    run_job(spec)
    return comparable(read_rows(JobOutput(spec.output.url)))


def test_inputs_deleted_after_the_plan_stop_the_rerun_until_they_are_back(tmp_path, reference, undisturbed):
    write_images(tmp_path / "images")
    spec = job(reference, str(tmp_path / "images"), str(tmp_path / "out"))
    committed = stop_after_first_commit(spec)
    store = JobOutput(spec.output.url)
    gone = images_of_other_shards(store, committed)
    shutil.move(tmp_path / "images", tmp_path / "kept")
    (tmp_path / "images").mkdir()
    for name in set(write_images(tmp_path / "kept")) - set(gone):
        shutil.copy(tmp_path / "kept" / name, tmp_path / "images" / name)

    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(spec.model_dump_json())
    result = CliRunner().invoke(app, ["run", str(spec_file)])  # the product's command, on the module's Ray
    assert result.exit_code != 0, result.output
    assert '"not found" on ' in result.output, result.output
    assert "img0" in result.output and "FileNotFoundError" in result.output  # names images and the cause
    assert set(store.committed_shard_ids()) == committed  # nothing more committed

    shutil.rmtree(tmp_path / "images")
    shutil.move(tmp_path / "kept", tmp_path / "images")
    summary = run_job(spec)
    assert summary.shards_done_before == len(committed) and summary.errors == 0
    rows = read_rows(store)
    assert len(rows) == IMAGES and comparable(rows) == undisturbed  # one ok row each, as undisturbed


def test_input_access_denied_alone_stops_the_job(tmp_path, reference, undisturbed, s3_server):
    import s3fs

    endpoint = s3_server["client_kwargs"]["endpoint_url"]
    proxy = FaultProxy(int(endpoint.rsplit(":", 1)[1]))
    try:
        direct = s3fs.S3FileSystem(**s3_server)
        bucket = f"denied-{free_port()}"
        direct.mkdir(bucket)
        write_images(tmp_path / "images")
        direct.put(str(tmp_path / "images") + "/", f"{bucket}/images/", recursive=True)
        input_options = {**s3_server, "client_kwargs": {"endpoint_url": proxy.endpoint}}
        spec = job(
            reference,
            f"s3://{bucket}/images/",
            f"s3://{bucket}/out/",
            input__storage_options=input_options,  # only the input's requests meet the proxy
            output__storage_options=s3_server,
            model__weights=str(TINY_CHECKPOINT),
        )
        committed = stop_after_first_commit(spec)

        proxy.set("deny")
        with pytest.raises(ErrorRateExceeded) as stopped:
            run_job(spec)
        message = str(stopped.value)
        assert '"access denied" on ' in message and f"s3://{bucket}/images/img0" in message, message
        store = JobOutput(spec.output.url, s3_server)
        assert set(store.committed_shard_ids()) == committed

        proxy.set("pass")
        summary = run_job(spec)  # access restored: the rerun finishes the job
        assert summary.errors == 0
        rows = read_rows(store)
        assert len(rows) == IMAGES and comparable(rows) == undisturbed
    finally:
        proxy.close()


def test_a_model_failing_on_every_image_stops_the_job_and_commits_nothing(tmp_path, reference):
    write_images(tmp_path / "images", poisoned=set(range(IMAGES)))
    spec = job(reference, str(tmp_path / "images"), str(tmp_path / "out"))
    with pytest.raises(ErrorRateExceeded, match=r'"inference failed" on \d+ of the last \d+ images \(100%'):
        run_job(spec)
    assert JobOutput(spec.output.url).committed_shard_ids() == []


def test_a_model_failing_on_a_few_images_gives_them_error_rows(tmp_path, reference):
    poisoned = {3, 17, 30}
    write_images(tmp_path / "images", poisoned=poisoned)
    summary = run_job(job(reference, str(tmp_path / "images"), str(tmp_path / "out")))
    assert summary.images == IMAGES and summary.errors == len(poisoned)
    assert summary.errors_by_reason == {"inference failed": len(poisoned)}
    rows = {r["image_id"]: r for r in read_rows(JobOutput(str(tmp_path / "out")))}
    for i in range(IMAGES):
        row = rows[f"img{i:03d}.png"]
        if i in poisoned:
            assert row["status"] == "error" and row["error"].startswith("inference failed: RuntimeError: the model fails on")
        else:
            assert row["status"] == "ok", row["error"]


def test_with_the_breaker_off_every_failure_is_an_error_row(tmp_path, reference):
    write_images(tmp_path / "images", poisoned=set(range(IMAGES)))
    summary = run_job(job(reference, str(tmp_path / "images"), str(tmp_path / "out"), error_breaker=None))
    assert summary.images == IMAGES and summary.errors_by_reason == {"inference failed": IMAGES}

"""The whole labelling job on a real local Ray: outputs, bad inputs, resume, conflicts."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

import sed_model
from pipeline.label import JobConflictError, JobOutput, run_job
from pipeline.label.commit import COMMITTED_DIR, JOB_FILE, MERGED_COCO_FILE
from pipeline.model_loading import load_model

from .helpers import image_bytes, label_map_of, model_labels, read_rows, tiny_job, write_inputs

pytestmark = pytest.mark.usefixtures("local_ray")


@pytest.fixture(scope="module")
def finished_job(tmp_path_factory, reference, local_ray):
    """One job over good and bad inputs, run once for the module's checks."""
    root = tmp_path_factory.mktemp("job")
    inputs = write_inputs(root / "images")
    spec = tiny_job(reference, str(root / "images"), str(root / "out"))
    summary = run_job(spec)
    return spec, inputs, summary, JobOutput(spec.output.url)


def test_every_image_is_one_row_with_the_right_status(finished_job):
    spec, inputs, summary, store = finished_job
    rows = read_rows(store)
    assert sorted(r["image_id"] for r in rows) == sorted(inputs)
    assert [r["image_index"] for r in sorted(rows, key=lambda r: r["image_index"])] == list(range(len(inputs)))
    for row in rows:
        _, status, reason = inputs[row["image_id"]]
        assert row["status"] == status, (row["image_id"], row["error"])
        assert reason in (row["error"] or ""), (row["image_id"], row["error"])
    assert summary.images == len(inputs) and summary.errors == 4 and summary.ok == len(inputs) - 4
    assert summary.shards_total == 3 and summary.shards_committed == 3


def test_decoding_conventions_reach_the_rows(finished_job):
    _, _, _, store = finished_job
    rows = {r["image_id"]: r for r in read_rows(store)}
    assert (rows["k_exif.jpg"]["width"], rows["k_exif.jpg"]["height"]) == (80, 120)  # EXIF rotation applied
    assert (rows["h_gray16.png"]["width"], rows["h_gray16.png"]["height"]) == (64, 48)


def test_masks_equal_the_models_argmax_labels(finished_job, reference):
    spec, inputs, _, store = finished_job
    model, _ = load_model(spec.model)
    for row in read_rows(store):
        if row["status"] != "ok":
            continue
        expected, kept = model_labels(model, inputs[row["image_id"]][0], 2, reference["text_features"], reference["classes"])
        assert row["kept_classes"] == kept
        actual = label_map_of(row)
        assert (actual == expected).mean() > 0.999, row["image_id"]
        for label in row["labels"]:
            assert label["area"] == int((actual == label["class_id"]).sum())
            assert 0 < label["mean_prob"] <= label["max_prob"] <= 1


def test_coco_and_png_agree_with_parquet(finished_job):
    spec, _, _, store = finished_job
    rows = {r["image_index"]: r for r in read_rows(store) if r["status"] == "ok"}
    coco = COCO(store.path(MERGED_COCO_FILE))
    assert sorted(coco.getImgIds()) == sorted(rows)
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == spec.taxonomy.classes
    for index, row in rows.items():
        expected = label_map_of(row)
        for annotation in coco.loadAnns(coco.getAnnIds(imgIds=[index])):
            assert annotation["iscrowd"] == 0 and annotation["score"] > 0
            np.testing.assert_array_equal(coco.annToMask(annotation).astype(bool), expected == annotation["category_id"] - 1)
        png = next(Path(store.path("png", row["shard_id"])).glob(f"{index:09d}_*.png"))
        values = np.array(Image.open(png))
        assert values.dtype == np.uint8
        np.testing.assert_array_equal(np.where(expected == 65535, 255, expected), values)


def test_job_record_and_nothing_to_do(finished_job):
    spec, inputs, _, store = finished_job
    record = store.read_json(JOB_FILE)
    assert record["classes"] == spec.taxonomy.classes and record["images"] == len(inputs)
    again = run_job(spec)
    assert again.nothing_to_do and again.images == len(inputs) and again.shards_committed == 0


def test_changed_settings_are_refused(finished_job):
    spec, _, _, store = finished_job
    changed = spec.model_copy(deep=True)
    changed.taxonomy.classes = ["sky", "road"]
    with pytest.raises(JobConflictError, match="different job"):
        run_job(changed)
    changed = spec.model_copy(deep=True)
    changed.inference.top_k = None
    with pytest.raises(JobConflictError):
        run_job(changed)


def test_resume_redoes_only_uncommitted_shards(tmp_path, reference):
    inputs = write_inputs(tmp_path / "images")
    spec = tiny_job(reference, str(tmp_path / "images"), str(tmp_path / "out"), inference__top_k=None)
    run_job(spec)
    store = JobOutput(spec.output.url)
    before = {r["image_id"]: r for r in read_rows(store)}
    # A crash after a shard's files but before its marker; and one before any file of another.
    os.remove(store.path(COMMITTED_DIR, "000001.json"))
    os.remove(store.path(COMMITTED_DIR, "000002.json"))
    os.remove(store.path("labels", "000002.parquet"))
    summary = run_job(spec)
    assert summary.shards_done_before == 1 and summary.shards_committed == 2
    after = read_rows(store)
    assert sorted(r["image_id"] for r in after) == sorted(inputs)
    for row in after:
        assert row["status"] == before[row["image_id"]]["status"]
        if row["status"] == "ok":
            # Redone shards batch images with other neighbours, so oneDNN may round differently: the
            # same labels up to near-ties.
            assert (label_map_of(row) == label_map_of(before[row["image_id"]])).mean() > 0.999, row["image_id"]


def test_memory_urls_for_input_and_output(reference):
    import fsspec

    fs = fsspec.filesystem("memory")
    write_inputs_to_memory(fs)
    spec = tiny_job(reference, f"memory://images-{id(fs)}/", f"memory://out-{id(fs)}/")
    summary = run_job(spec)
    assert summary.images == 12 and summary.errors == 4
    rows = read_rows(JobOutput(spec.output.url))
    assert len(rows) == 12


def write_inputs_to_memory(fs):
    from .helpers import job_inputs

    inputs = job_inputs()
    for name, (data, _, _) in inputs.items():
        fs.pipe_file(f"/images-{id(fs)}/{name}", data)
    return inputs


def test_tar_shards_and_parquet_inputs(tmp_path, reference):
    """One job over a .tar shard and a Parquet file of image bytes, side by side in a folder."""
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    from .helpers import image_bytes

    folder = tmp_path / "inputs"
    folder.mkdir()
    with tarfile.open(folder / "shard-0000.tar", "w") as archive:
        for name, data in [("cat.jpg", image_bytes(64, 48, 10, "JPEG")), ("notes.txt", b"skip me"), ("bad.png", b"\x89PNG broken")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    table = pa.table({"key": ["p-1", "p-2"], "image": [image_bytes(50, 40, 11), image_bytes(40, 60, 12, "JPEG")]})
    pq.write_table(table, folder / "part-0.parquet")
    spec = tiny_job(reference, str(folder), str(tmp_path / "out"), input__id_column="key")
    summary = run_job(spec)
    rows = {r["image_id"]: r for r in read_rows(JobOutput(spec.output.url))}
    assert sorted(rows) == ["p-1", "p-2", "shard-0000.tar/bad.png", "shard-0000.tar/cat.jpg"]
    assert rows["shard-0000.tar/bad.png"]["status"] == "error"
    assert (rows["p-2"]["width"], rows["p-2"]["height"]) == (40, 60)
    assert summary.ok == 3 and summary.errors == 1


def test_a_grouped_taxonomy_with_distractors_speaks_in_output_classes(tmp_path, reference):
    """Groups and a distractor through the whole job: every output is in output classes, and the
    labels are the model's labels on the flat prompts, mapped to their classes."""
    inputs = write_inputs(tmp_path / "images")
    wall, sky, bed, person, drawers, light = reference["classes"]
    taxonomy = {"classes": [{"name": "room", "prompts": [wall, bed, drawers]}, sky, person], "distractors": [light]}
    spec = tiny_job(reference, str(tmp_path / "images"), str(tmp_path / "out"), taxonomy=taxonomy)
    run_job(spec)
    store = JobOutput(spec.output.url)
    classes = ["room", sky, person]
    record = store.read_json(JOB_FILE)
    assert record["classes"] == classes
    assert record["taxonomy"] == {
        "classes": [{"name": "room", "prompts": [wall, bed, drawers]}, {"name": sky, "prompts": [sky]}, {"name": person, "prompts": [person]}],
        "distractors": [light],
    }
    coco = COCO(store.path(MERGED_COCO_FILE))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == classes

    prompts = [wall, bed, drawers, sky, person, light]
    assert record["prompts"] == prompts  # what kept_classes index
    prompt_class = np.array([0, 0, 0, 1, 2, 65535])  # the distractor's pixels: unlabeled
    text = reference["text_features"][[list(reference["classes"]).index(p) for p in prompts]]
    model, _ = load_model(spec.model)
    distractor_pixels = 0
    for row in read_rows(store):
        if row["status"] != "ok":
            continue
        flat, _ = model_labels(model, inputs[row["image_id"]][0], 2, text, prompts)
        expected = prompt_class[flat]
        assert (label_map_of(row) == expected).mean() > 0.999, row["image_id"]
        assert abs(row["distractor_area"] - int((flat == 5).sum())) <= 0.001 * flat.size
        distractor_pixels += row["distractor_area"]
        for label in row["labels"]:
            assert label["class_id"] in (0, 1, 2)
            assert label["top_prompt"] in ((wall, bed, drawers) if label["class_id"] == 0 else (None,))
        png = next(Path(store.path("png", row["shard_id"])).glob(f"{row['image_index']:09d}_*.png"))
        assert set(np.unique(np.array(Image.open(png)))) <= {0, 1, 2, 255}
    assert distractor_pixels > 0  # the distractor won pixels: the case is not vacuous


def test_large_images_are_tiled_at_their_own_size(tmp_path, reference):
    folder = tmp_path / "scans"
    folder.mkdir()
    (folder / "scan.png").write_bytes(image_bytes(1200, 900, seed=7))
    (folder / "photo.png").write_bytes(image_bytes(400, 300, seed=8))
    tiling = {"window": 256, "overlap": 0.25, "min_side": 600}
    spec = tiny_job(reference, str(folder), str(tmp_path / "out"), inference__tiling=tiling)
    run_job(spec)
    rows = {r["image_id"]: r for r in read_rows(JobOutput(spec.output.url))}
    expected_windows = sed_model.Tiling(**tiling).windows(900, 1200)
    assert expected_windows == 5 * 6 and rows["scan.png"]["tiled_windows"] == expected_windows
    assert rows["photo.png"]["tiled_windows"] == 0
    model, _ = load_model(spec.model)
    for name, row in rows.items():
        data = (folder / name).read_bytes()
        expected, kept = model_labels(model, data, 2, reference["text_features"], reference["classes"], sed_model.Tiling(**tiling))
        actual = label_map_of(row)
        assert actual.shape == expected.shape == (row["height"], row["width"])
        assert row["kept_classes"] == kept and (actual == expected).mean() > 0.999, name


def test_a_large_taxonomy_is_encoded_by_tasks_over_the_cpus(reference, tmp_path):
    """40 classes on 2 CPUs: two text tasks (20 classes each), whose embeddings are the ones one
    process computes for the whole taxonomy."""
    from pipeline.model_loading import encode_taxonomy
    from pipeline.ray_stages import encode_taxonomy_once, text_task_slices
    from pipeline.taxonomy import load_taxonomy

    classes = [f"thing {i}" for i in range(40)]
    spec = tiny_job(reference, str(tmp_path), str(tmp_path / "out"), taxonomy={"classes": classes})
    assert text_task_slices(len(classes), 2) == [(0, 20), (20, 40)]
    text, checkpoint_hash = encode_taxonomy_once(spec.model, load_taxonomy(spec.taxonomy), spec.ray)
    whole, whole_hash = encode_taxonomy(spec.model, classes, list(sed_model.IMAGENET_TEMPLATES))
    assert checkpoint_hash == whole_hash
    # One thread in each task, the test process's own threads here: equal to float rounding.
    np.testing.assert_allclose(text, whole.numpy(), rtol=0, atol=1e-6)

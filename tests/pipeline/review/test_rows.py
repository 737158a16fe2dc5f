"""pipeline.review.rows: which committed rows a review takes (`Selection`, `select`), reading them
(`ReviewedJob`), and the file names a review gives images and label maps.

The job output folder is built by hand in tmp_path from hand-made model output, as
tests/pipeline/label/test_encode_writers.py builds it: encode_labels -> ShardWriter -> commit
marker, plus a job.json; no model, no Ray.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.infer import UNLABELED
from pipeline.label.commit import JobOutput
from pipeline.label.encode import WORK_COLUMNS, encode_labels, label_map_of
from pipeline.label.writers import ShardWriter
from pipeline.review.rows import ReviewedJob, ReviewError, Selection, image_name, label_name, relative_name, select
from schemas import LABELS_SCHEMA, STATUS_ERROR, STATUS_OK

CLASSES = ["sky", "tree", "road"]

# pycocotools' own decode() (label_map_of) trips a NumPy 2 deprecation inside the library; not ours to test.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

# Selection.parse ---------------------------------------------------------------------------------------------


def test_selection_parses_its_three_kinds():
    assert Selection.parse("least-confident:5") == Selection("least-confident", count=5)
    assert Selection.parse("random:3", seed=9) == Selection("random", count=3, seed=9)
    assert Selection.parse("ids:/tmp/some ids.txt") == Selection("ids", ids_url="/tmp/some ids.txt")
    assert Selection.parse("ids:s3://bucket/ids.txt").ids_url == "s3://bucket/ids.txt"
    assert str(Selection.parse("least-confident:5")) == "least-confident:5"
    assert str(Selection.parse("ids:a.txt")) == "ids:a.txt"


@pytest.mark.parametrize("text", ["foo:3", "random:0", "random:x", "least-confident", "random:-2", "random:", "ids:", "", "random:1.5"])
def test_selection_refuses_what_it_cannot_read(text):
    with pytest.raises(ReviewError, match="--select"):
        Selection.parse(text)


def test_selection_refuses_superscript_digits_with_a_review_error():
    with pytest.raises(ReviewError, match="--select"):
        Selection.parse("random:²")


# File names --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "image_id, name",
    [
        ("a/b.jpg", "a/b.jpg"),
        ("../../etc/passwd", "etc/passwd"),
        ("/abs/x.jpg", "abs/x.jpg"),
        ("a\\b\\c.png", "a/b/c.png"),
        ("C:\\data\\..\\x.png", "C:/data/x.png"),
        ("./a//b/./c.png", "a/b/c.png"),
    ],
)
def test_relative_name_is_relative_and_never_climbs(image_id, name):
    assert relative_name(image_id) == name


@pytest.mark.parametrize("image_id", ["", "..", "/", "../..", "./"])
def test_relative_name_refuses_ids_that_make_no_name(image_id):
    with pytest.raises(ReviewError):
        relative_name(image_id)


def test_label_name_is_the_image_name_as_png():
    assert label_name("a/b.jpg") == "a/b.png"
    assert label_name("a/b.png") == "a/b.png"
    assert label_name("../x/photo.v2.JPEG") == "x/photo.v2.png"
    assert label_name("noext") == "noext.png"


def encoded(format: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (3, 2), (10, 20, 30)).save(buffer, format=format)
    return buffer.getvalue()


def test_image_name_adds_the_extension_of_the_bytes_only_when_missing():
    assert image_name("x", encoded("PNG")) == "x.png"
    assert image_name("dir/x", encoded("JPEG")) == "dir/x.jpeg"
    assert image_name("a/b.jpg", b"not even an image") == "a/b.jpg"
    assert image_name("a/B.JPG", b"") == "a/B.JPG"
    assert image_name("../photo.v2", encoded("PNG")) == "photo.v2.png"


# A job output folder, by hand --------------------------------------------------------------------------------

HEIGHT, WIDTH = 3, 4


def objects(*values):
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array


def model_output(shard: str, rows: list[tuple[int, str, str, float]]) -> dict[str, np.ndarray]:
    """Rows (image_index, image_id, status, mean_margin) as SEDInference.__call__ returns them;
    each ok row's label map is a function of its index, so rows read back can be checked."""
    ok = [status == STATUS_OK for _, _, status, _ in rows]
    maps = []
    for (index, _, _, _), good in zip(rows, ok):
        label_map = np.full((HEIGHT, WIDTH), 2, np.uint16)
        label_map[: index % HEIGHT + 1, : index % WIDTH + 1] = 0
        label_map[HEIGHT - 1, WIDTH - 1] = UNLABELED
        maps.append(label_map if good else np.zeros((1, 1), np.uint16))
    return {
        "image_index": np.array([r[0] for r in rows], np.int64),
        "image_id": objects(*(r[1] for r in rows)),
        "shard_id": objects(*([shard] * len(rows))),
        "source": objects(*(f"/data/{r[1]}" for r in rows)),
        "status": objects(*(r[2] for r in rows)),
        "error": objects(*("" if good else "not an image: no known image format matches these bytes" for good in ok)),
        "width": np.array([WIDTH if good else 0 for good in ok], np.int32),
        "height": np.array([HEIGHT if good else 0 for good in ok], np.int32),
        "label_map": objects(*maps),
        "class_ids": objects(*(np.array([0, 2], np.int32) if good else np.zeros(0, np.int32) for good in ok)),
        "mean_probs": objects(*(np.array([0.6, 0.8], np.float32) if good else np.zeros(0, np.float32) for good in ok)),
        "max_probs": objects(*(np.array([0.7, 0.95], np.float32) if good else np.zeros(0, np.float32) for good in ok)),
        "kept_classes": objects(*(np.array([0, 1, 2], np.int32) if good else np.zeros(0, np.int32) for good in ok)),
        "unlabeled_area": np.array([1 if good else 0 for good in ok], np.int64),
        "distractor_area": np.zeros(len(rows), np.int64),
        "top_prompts": objects(*('[null, null]' if good else "[]" for good in ok)),
        "mean_margin": np.array([r[3] for r in rows], np.float32),
        "low_margin_share": np.array([0.25 if good else 0.0 for good in ok], np.float32),
        "margin_map": objects(*(None for _ in rows)),
    }


# (image_index, image_id, status, mean_margin); rows out of index order; margins exact in float32.
# Ties: 3 and 12 share 0.25, 5 and 2 share 0.5. Error rows carry margin 0 in the model's output.
SHARDS = {
    "000000": [
        (3, "img/03.jpg", STATUS_OK, 0.25),
        (1, "img/01.jpg", STATUS_OK, 0.75),
        (5, "img/05.jpg", STATUS_OK, 0.5),
        (4, "img/04.jpg", STATUS_ERROR, 0.0),
        (2, "img/02.jpg", STATUS_OK, 0.5),
        (0, "img/00.jpg", STATUS_OK, 0.875),
    ],
    "000001": [
        (12, "img/12.jpg", STATUS_OK, 0.25),
        (10, "img/10.jpg", STATUS_ERROR, 0.0),
        (11, "img/11.jpg", STATUS_OK, 0.0625),
        (13, "img/13.jpg", STATUS_OK, 0.9375),
    ],
}
OK_ROWS = [r for rows in SHARDS.values() for r in rows if r[2] == STATUS_OK]
ERROR_IDS = {r[1] for rows in SHARDS.values() for r in rows if r[2] != STATUS_OK}


def build_job(root, shards=SHARDS, schema_version_2: bool = False) -> str:
    store = JobOutput(str(root))
    for shard, rows in shards.items():
        table = encode_labels(model_output(shard, rows), len(CLASSES), "tax", "ckpt")
        writer = ShardWriter(store, shard, len(rows), ["parquet"], CLASSES, {})
        writer.add(table)
        if schema_version_2:
            # Rewrite the shard as labels schema 2 wrote it: no margin columns.
            writer.commit()
            current = table.drop_columns(list(WORK_COLUMNS)).cast(LABELS_SCHEMA)
            old = current.drop_columns(["mean_margin", "low_margin_share"]).set_column(0, "schema_version", pa.array([2] * len(rows), pa.int16()))
            sink = pa.BufferOutputStream()
            pq.write_table(old.replace_schema_metadata({b"sed_label.schema_version": b"2"}), sink)
            store.write(f"labels/{shard}.parquet", sink.getvalue().to_pybytes())
        else:
            writer.commit()
    store.write_json(
        "job.json",
        {
            "classes": CLASSES,
            "spec": {"input": {"image_column": "image"}, "output": {"formats": ["parquet"]}},
            "checkpoint_hash": "ckpt",
            "taxonomy_hash": "tax",
        },
    )
    return str(root)


@pytest.fixture
def job(tmp_path) -> ReviewedJob:
    return ReviewedJob(build_job(tmp_path / "job"))


def ids_of(table: pa.Table) -> list[int]:
    return table.column("image_index").to_pylist()


# ReviewedJob -------------------------------------------------------------------------------------------------


def test_reviewed_job_reads_the_record_and_every_committed_row(job):
    assert job.classes == CLASSES
    assert sorted(job.markers) == ["000000", "000001"]
    scores = job.scores()
    expected = sorted((index, image_id, status) for rows in SHARDS.values() for index, image_id, status, _ in rows)
    assert sorted(zip(*(scores.column(c).to_pylist() for c in ("image_index", "image_id", "status")))) == expected
    margins = dict(zip(ids_of(scores), scores.column("mean_margin").to_pylist()))
    assert {i: margins[i] for i, _, _, _ in OK_ROWS} == {i: m for i, _, _, m in OK_ROWS}
    assert all(margins[i] is None for i in (4, 10))  # error rows carry no score


def test_a_folder_without_job_json_is_refused(tmp_path):
    build_job(tmp_path / "job")
    (tmp_path / "job" / "job.json").unlink()
    with pytest.raises(ReviewError, match="job.json"):
        ReviewedJob(str(tmp_path / "job"))
    with pytest.raises(ReviewError, match="job.json"):
        ReviewedJob(str(tmp_path / "empty"))


def test_a_job_without_committed_shards_is_refused(tmp_path):
    JobOutput(str(tmp_path)).write_json("job.json", {"classes": CLASSES})
    with pytest.raises(ReviewError, match="no committed shards"):
        ReviewedJob(str(tmp_path))


def test_rows_are_the_full_rows_in_the_order_asked(job):
    chosen = pa.table({"image_index": pa.array([13, 2, 11], pa.int64()), "shard_id": ["000001", "000000", "000001"]})
    rows = job.rows(chosen)
    assert [r["image_id"] for r in rows] == ["img/13.jpg", "img/02.jpg", "img/11.jpg"]
    for r in rows:
        expected = np.full((HEIGHT, WIDTH), 2, np.uint16)
        expected[: r["image_index"] % HEIGHT + 1, : r["image_index"] % WIDTH + 1] = 0
        expected[HEIGHT - 1, WIDTH - 1] = UNLABELED
        np.testing.assert_array_equal(label_map_of(r), expected)
        assert (r["width"], r["height"], r["source"]) == (WIDTH, HEIGHT, f"/data/{r['image_id']}")


# select: least-confident -------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 3, 4, 100])
def test_least_confident_takes_the_lowest_mean_margins_ties_by_image_index(job, count):
    expected = [index for index, _, _, _ in sorted(OK_ROWS, key=lambda r: (r[3], r[0]))][:count]
    chosen = select(job, Selection.parse(f"least-confident:{count}"))
    assert ids_of(chosen) == expected
    assert ids_of(select(job, Selection.parse(f"least-confident:{count}"))) == expected
    shards = {index: shard for shard, rows in SHARDS.items() for index, _, _, _ in rows}
    assert chosen.column("shard_id").to_pylist() == [shards[i] for i in expected]


def test_least_confident_order_is_known():
    # The expected order of the table above, written out: 11 (0.0625), 3 and 12 (0.25), 2 and 5 (0.5), 1, 0, 13.
    assert [i for i, _, _, _ in sorted(OK_ROWS, key=lambda r: (r[3], r[0]))] == [11, 3, 12, 2, 5, 1, 0, 13]


def test_least_confident_on_rows_without_scores_points_to_random(tmp_path):
    job = ReviewedJob(build_job(tmp_path / "old", schema_version_2=True))
    assert job.scores().column("mean_margin").null_count == job.scores().num_rows
    with pytest.raises(ReviewError, match="random:N"):
        select(job, Selection.parse("least-confident:3"))
    chosen = select(job, Selection.parse("random:3"))
    assert chosen.num_rows == 3 and set(ids_of(chosen)) <= {r[0] for r in OK_ROWS}


# select: random ----------------------------------------------------------------------------------------------


def test_random_is_deterministic_for_a_seed_and_differs_for_another(job):
    ok_indices = {r[0] for r in OK_ROWS}
    first = ids_of(select(job, Selection.parse("random:4", seed=0)))
    assert len(first) == len(set(first)) == 4 and set(first) <= ok_indices
    assert ids_of(select(job, Selection.parse("random:4", seed=0))) == first
    assert ids_of(select(ReviewedJob(job.url), Selection.parse("random:4", seed=0))) == first  # a fresh reader too
    other = ids_of(select(job, Selection.parse("random:4", seed=1)))
    assert len(other) == 4 and set(other) <= ok_indices and other != first


def test_random_never_returns_error_rows(job):
    for seed in range(10):
        chosen = select(job, Selection.parse("random:100", seed=seed))
        assert sorted(ids_of(chosen)) == sorted(r[0] for r in OK_ROWS)
        assert set(chosen.column("status").to_pylist()) == {STATUS_OK}


# select: ids -------------------------------------------------------------------------------------------------


def test_ids_returns_the_files_rows_in_its_order(job, tmp_path):
    path = tmp_path / "ids.txt"
    path.write_text("img/13.jpg\n\n  img/02.jpg  \nimg/11.jpg\nimg/02.jpg\n")
    chosen = select(job, Selection.parse(f"ids:{path}"))
    assert ids_of(chosen) == [13, 2, 11]
    assert chosen.column("image_id").to_pylist() == ["img/13.jpg", "img/02.jpg", "img/11.jpg"]
    assert chosen.column("shard_id").to_pylist() == ["000001", "000000", "000001"]


def test_ids_names_unknown_ids_and_error_rows(job, tmp_path):
    path = tmp_path / "ids.txt"
    path.write_text("img/01.jpg\nnope.jpg\nimg/04.jpg\n")
    with pytest.raises(ReviewError) as caught:
        select(job, Selection.parse(f"ids:{path}"))
    message = str(caught.value)
    assert "nope.jpg" in message and "not in the job" in message
    assert "img/04.jpg" in message and "errors" in message
    assert "img/01.jpg" not in message
    path.write_text("img/10.jpg\n")
    with pytest.raises(ReviewError, match=r"1 whose rows are errors.*img/10\.jpg"):
        select(job, Selection.parse(f"ids:{path}"))


def test_ids_of_an_empty_or_missing_file_are_refused(job, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ReviewError, match="names no image ids"):
        select(job, Selection.parse(f"ids:{empty}"))
    with pytest.raises(ReviewError, match="cannot read it"):
        select(job, Selection.parse(f"ids:{tmp_path / 'missing.txt'}"))

"""pipeline.sources: listing an input into ImageRefs, the shard plan, and reading planned bytes.

Inputs are built in tmp_path (local files, .tar, Parquet) or in a private `memory://` folder.
"""

from __future__ import annotations

import io
import tarfile
import uuid

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.decode import DecodeError
from pipeline.sources import (
    KIND_FILE,
    KIND_PARQUET,
    KIND_TAR,
    PLAN_SCHEMA,
    InputError,
    inline_process_local_bytes,
    list_images,
    plan_shards,
    read_images,
)
from schemas import InputSpec


def png_bytes(value: int, size: tuple[int, int] = (3, 2)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (value, value, value)).save(buffer, format="PNG")
    return buffer.getvalue()


def write(path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def ids(refs) -> list[str]:
    return [r.image_id for r in refs]


def plan_rows(refs, shard_size: int = 100) -> list[dict]:
    return plan_shards(refs, shard_size).to_pylist()


@pytest.fixture
def memory_root():
    """A private `memory://` folder (the memory filesystem is process-global), removed afterwards."""
    fs = fsspec.filesystem("memory")
    root = f"/sources-test-{uuid.uuid4().hex}"
    yield fs, root
    if fs.exists(root):
        fs.rm(root, recursive=True)


# Prefixes and globs --------------------------------------------------------------------------------------


def test_prefix_is_listed_recursively_sorted_and_skips_hidden_and_non_images(tmp_path):
    for name in [
        "b.png",
        "a.JPG",  # extension check is case-insensitive
        "sub/deeper/c.webp",
        "sub/a.jpeg",
        "notes.txt",  # not an image
        "labels.json",
        ".hidden.png",  # hidden file
        "_tmp.png",  # underscore-prefixed file
        ".cache/x.png",  # inside a hidden folder
        "sub/_private/y.png",  # inside an underscore folder
    ]:
        write(tmp_path / "in" / name, png_bytes(1))
    refs = list_images(InputSpec(url=str(tmp_path / "in")))
    assert ids(refs) == ["a.JPG", "b.png", "sub/a.jpeg", "sub/deeper/c.webp"]
    assert all(r.kind == KIND_FILE for r in refs)
    # The source is where the bytes are; the id is the path relative to the input prefix.
    assert refs[2].source == str(tmp_path / "in" / "sub" / "a.jpeg")


def test_listing_is_deterministic_regardless_of_creation_order(tmp_path):
    names = ["z.png", "m/a.png", "a.png", "m/b/c.png"]
    for name in names:
        write(tmp_path / "one" / name, png_bytes(1))
    for name in reversed(names):
        write(tmp_path / "two" / name, png_bytes(1))
    assert ids(list_images(InputSpec(url=str(tmp_path / "one")))) == ids(list_images(InputSpec(url=str(tmp_path / "two"))))


def test_glob_url_lists_only_the_matches(tmp_path):
    for name in ["a.png", "b.png", "c.jpg", "sub/d.png"]:
        write(tmp_path / name, png_bytes(1))
    refs = list_images(InputSpec(url=f"{tmp_path}/*.png"))
    assert ids(refs) == ["a.png", "b.png"]


def test_single_file_url_lists_that_file(tmp_path):
    write(tmp_path / "only.png", png_bytes(1))
    assert ids(list_images(InputSpec(url=str(tmp_path / "only.png")))) == ["only.png"]


def test_missing_url_raises_input_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        list_images(InputSpec(url=str(tmp_path / "nope")))


def test_folder_without_images_raises_input_error(tmp_path):
    write(tmp_path / "in" / "readme.txt", b"hello")
    write(tmp_path / "in" / ".hidden.png", png_bytes(1))
    with pytest.raises(InputError, match="holds no images"):
        list_images(InputSpec(url=str(tmp_path / "in")))


# Tar shards -------------------------------------------------------------------------------------------------


def test_tar_members_are_listed_with_offsets_and_read_with_ranged_reads(tmp_path):
    members = {
        "img/a.png": png_bytes(10),
        "img/" + "long_name_" * 15 + ".png": png_bytes(20, (5, 4)),  # > 100 chars: needs an extra PAX header
        "b.jpg": b"not really a jpeg, but listed by extension",
        "notes.txt": b"skipped",
    }
    tar_path = tmp_path / "in" / "shard-0.tar"
    tar_path.parent.mkdir()
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as archive:
        folder = tarfile.TarInfo("img")  # a directory entry: not a file, not listed
        folder.type = tarfile.DIRTYPE
        archive.addfile(folder)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    refs = list_images(InputSpec(url=str(tmp_path / "in")))
    image_members = [name for name in members if not name.endswith(".txt")]
    assert ids(refs) == [f"shard-0.tar/{name}" for name in image_members]
    assert all(r.kind == KIND_TAR and r.source == str(tar_path) for r in refs)
    assert [r.length for r in refs] == [len(members[name]) for name in image_members]
    assert all(r.offset is not None and r.offset % 512 == 0 for r in refs)
    data = read_images(plan_rows(refs), "image", {})
    assert data == [members[name] for name in image_members]


def test_directory_entries_in_a_tar_are_not_images(tmp_path):
    tar_path = tmp_path / "x.tar"
    with tarfile.open(tar_path, "w") as archive:
        folder = tarfile.TarInfo("photos.png")  # a directory that merely looks like an image name
        folder.type = tarfile.DIRTYPE
        archive.addfile(folder)
        info = tarfile.TarInfo("photos.png/real.png")
        payload = png_bytes(3)
        info.size = len(payload)
        archive.addfile(info, io.BytesIO(payload))
    assert ids(list_images(InputSpec(url=str(tar_path)))) == ["x.tar/photos.png/real.png"]


def test_corrupt_tar_raises_input_error(tmp_path):
    write(tmp_path / "bad.tar", b"\x01" * 2048)
    with pytest.raises(InputError, match="not a readable tar"):
        list_images(InputSpec(url=str(tmp_path / "bad.tar")))


# Parquet inputs ----------------------------------------------------------------------------------------------


def test_parquet_binary_column_with_id_column_over_several_row_groups(tmp_path):
    images = [png_bytes(v) for v in range(5)]
    table = pa.table({"name": [f"img{v}" for v in range(5)], "image": pa.array(images, pa.binary())})
    path = tmp_path / "data.parquet"
    pq.write_table(table, path, row_group_size=2)  # row groups of 2, 2, 1: reads must map rows to groups
    assert pq.ParquetFile(path).metadata.num_row_groups == 3
    refs = list_images(InputSpec(url=str(path), id_column="name"))
    assert ids(refs) == ["img0", "img1", "img2", "img3", "img4"]
    assert [r.offset for r in refs] == [0, 1, 2, 3, 4]
    assert all(r.kind == KIND_PARQUET for r in refs)
    # Read in a scrambled order and a subset: each row still gets its own bytes.
    rows = plan_rows(refs)
    picked = [rows[4], rows[0], rows[3]]
    assert read_images(picked, "image", {}) == [images[4], images[0], images[3]]


def test_parquet_default_ids_are_file_and_row(tmp_path):
    pq.write_table(pa.table({"image": [png_bytes(1), png_bytes(2)]}), tmp_path / "p.parquet")
    assert ids(list_images(InputSpec(url=str(tmp_path)))) == ["p.parquet#0", "p.parquet#1"]


def test_parquet_struct_column_with_bytes_and_path(tmp_path):
    images = [png_bytes(7), png_bytes(8)]
    column = pa.array(
        [{"bytes": images[0], "path": "a.png"}, {"bytes": images[1], "path": "b.png"}],
        pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
    )
    path = tmp_path / "hf.parquet"
    pq.write_table(pa.table({"img": column}), path)
    refs = list_images(InputSpec(url=str(path), image_column="img"))
    assert read_images(plan_rows(refs), "img", {}) == images


def test_parquet_non_bytes_cell_is_an_error_value_not_a_raise(tmp_path):
    path = tmp_path / "s.parquet"
    pq.write_table(pa.table({"image": ["a string, not bytes"]}), path)
    [value] = read_images(plan_rows(list_images(InputSpec(url=str(path)))), "image", {})
    assert isinstance(value, DecodeError) and str(value).startswith("not image bytes: column 'image' holds str")


def test_parquet_missing_image_column_is_named_in_the_error(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"pixels": [b"x"]}), path)
    with pytest.raises(InputError, match="'image'"):
        list_images(InputSpec(url=str(path)))


def test_parquet_missing_id_column_is_named_in_the_error(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"image": [b"x"]}), path)
    with pytest.raises(InputError, match="'key'"):
        list_images(InputSpec(url=str(path), id_column="key"))


def test_duplicate_ids_get_numbered_suffixes(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"id": ["a", "b", "a", "a"], "image": [b"1", b"2", b"3", b"4"]}), path)
    assert ids(list_images(InputSpec(url=str(path), id_column="id"))) == ["a", "b", "a#1", "a#2"]


def test_duplicate_id_suffixes_never_collide_with_real_ids(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"id": ["x", "x#1", "x"], "image": [b"1", b"2", b"3"]}), path)
    listed = ids(list_images(InputSpec(url=str(path), id_column="id")))
    assert len(set(listed)) == len(listed), listed


# The plan and reading ----------------------------------------------------------------------------------------


def test_plan_shards_gives_zero_padded_shard_ids_and_global_indices(tmp_path):
    for i in range(5):
        write(tmp_path / f"{i}.png", png_bytes(i))
    plan = plan_shards(list_images(InputSpec(url=str(tmp_path))), 2)
    assert plan.schema.equals(PLAN_SCHEMA)
    assert plan.column("shard_id").to_pylist() == ["000000", "000000", "000001", "000001", "000002"]
    assert plan.column("image_index").to_pylist() == [0, 1, 2, 3, 4]
    assert plan.column("inline").null_count == 5


def test_read_images_returns_the_exception_for_a_missing_file(tmp_path):
    write(tmp_path / "a.png", png_bytes(1))
    write(tmp_path / "b.png", png_bytes(2))
    rows = plan_rows(list_images(InputSpec(url=str(tmp_path))))
    (tmp_path / "a.png").unlink()  # disappears between planning and reading
    first, second = read_images(rows, "image", {})
    assert isinstance(first, FileNotFoundError)
    assert second == png_bytes(2)


def test_read_images_returns_the_exception_for_every_row_of_a_missing_parquet(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"image": [b"1", b"2"]}), path)
    rows = plan_rows(list_images(InputSpec(url=str(path))))
    path.unlink()
    values = read_images(rows, "image", {})
    assert len(values) == 2 and all(isinstance(v, Exception) for v in values)


def test_memory_input_bytes_are_inlined_into_the_plan(memory_root):
    fs, root = memory_root
    images = {f"{root}/in/a.png": png_bytes(1), f"{root}/in/sub/b.png": png_bytes(2)}
    for path, data in images.items():
        fs.pipe(path, data)
    spec = InputSpec(url=f"memory://{root}/in")
    plan = plan_shards(list_images(spec), 1)
    assert plan.column("image_id").to_pylist() == ["a.png", "sub/b.png"]
    inlined = inline_process_local_bytes(plan, spec)
    assert inlined.schema.equals(PLAN_SCHEMA)
    assert inlined.column("inline").to_pylist() == list(images.values())
    # Once inlined, rows no longer need the (process-local) storage to be read.
    fs.rm(f"{root}/in", recursive=True)
    assert read_images(inlined.to_pylist(), "image", {}) == list(images.values())


def test_local_input_is_not_inlined(tmp_path):
    write(tmp_path / "a.png", png_bytes(1))
    spec = InputSpec(url=str(tmp_path))
    plan = plan_shards(list_images(spec), 4)
    assert inline_process_local_bytes(plan, spec).column("inline").null_count == 1


def test_memory_glob_and_parquet(memory_root):
    fs, root = memory_root
    fs.pipe(f"{root}/x/a.png", png_bytes(1))
    fs.pipe(f"{root}/x/b.jpg", png_bytes(2))
    assert ids(list_images(InputSpec(url=f"memory://{root}/x/*.png"))) == ["a.png"]
    sink = io.BytesIO()
    pq.write_table(pa.table({"image": [png_bytes(5)]}), sink)
    fs.pipe(f"{root}/p/data.parquet", sink.getvalue())
    spec = InputSpec(url=f"memory://{root}/p")
    plan = inline_process_local_bytes(plan_shards(list_images(spec), 8), spec)
    assert plan.column("inline").to_pylist() == [png_bytes(5)]
    assert np.asarray(Image.open(io.BytesIO(plan.column("inline")[0].as_py()))).shape == (2, 3, 3)

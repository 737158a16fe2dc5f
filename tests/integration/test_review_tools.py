"""The review loop against the real tools: a real Label Studio 1.23 server (tasks imported through its
REST API, a correction submitted as a reviewer would, its JSON export imported back) and PyPI
datumaro as CVAT's formats' reader and writer; then the report's agreement and the training data.

The tools live in their own virtual environments (they pin packages the product does not share):
`.venv-label-studio` and `.venv-datumaro` at the repository root, made as docs/development.md
says (`.ci/run` makes them); `SED_LABEL_STUDIO` / `SED_DATUMARO_PYTHON`
point elsewhere. Without them the tests skip, saying which to install.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from jobs.cli import app
from pipeline.label.commit import JobOutput
from pipeline.review.brush_rle import mask_to_rle
from pipeline.review.rows import label_name
from pipeline.train.data import labelled_data
from schemas import TrainSpec
from tests.helpers import REPO

from .helpers import free_port, label_map_of, read_rows
from .processes import wait_for

pytestmark = [pytest.mark.usefixtures("local_ray"), pytest.mark.slow]

LABEL_STUDIO = Path(os.environ.get("SED_LABEL_STUDIO", REPO / ".venv-label-studio" / "bin" / "label-studio"))
DATUMARO_PYTHON = Path(os.environ.get("SED_DATUMARO_PYTHON", REPO / ".venv-datumaro" / "bin" / "python"))
TOKEN = "sed-label-review-test-token"


def cli(*arguments: str) -> str:
    result = CliRunner().invoke(app, list(arguments))
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """The demo job, labelled with margin maps (format confidence)."""
    root = tmp_path_factory.mktemp("review")
    spec = yaml.safe_load((REPO / "jobs" / "demo.yaml").read_text())
    spec["input"]["url"] = str(REPO / "jobs" / "demo_images")
    spec["output"].update(url=str(root / "job"), formats=["parquet", "png", "confidence"])
    (root / "job.yaml").write_text(yaml.safe_dump(spec))
    cli("run", str(root / "job.yaml"))
    rows = {row["image_index"]: row for row in read_rows(JobOutput(str(root / "job")))}
    return root, rows


class LabelStudio:
    def __init__(self, url: str) -> None:
        self.url = url

    def call(self, method: str, path: str, body: object | None = None) -> object:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Authorization", f"Token {TOKEN}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=60) as response:
            content = response.read()
            return json.loads(content) if response.headers.get_content_type() == "application/json" and content else content


@pytest.fixture(scope="module")
def label_studio(job):
    if not LABEL_STUDIO.exists():
        pytest.skip(f"Label Studio is not installed at {LABEL_STUDIO} (docs/development.md: python3 -m venv .venv-label-studio ...)")
    root, _ = job
    port = free_port()
    environment = {
        **os.environ,
        "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(root),
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "LATEST_VERSION_CHECK": "false",
        "COLLECT_ANALYTICS": "false",
    }
    command = [
        str(LABEL_STUDIO), "start", "--no-browser", "--internal-host", "127.0.0.1", "-p", str(port),
        "--data-dir", str(root / "label-studio-data"), "--username", "reviewer@example.com",
        "--password", "review-password-1", "--user-token", TOKEN,
    ]
    log = open(root / "label-studio.log", "wb")
    server = subprocess.Popen(command, env=environment, stdout=log, stderr=subprocess.STDOUT, cwd=root, start_new_session=True)
    client = LabelStudio(f"http://127.0.0.1:{port}")

    def healthy() -> bool:
        assert server.poll() is None, (root / "label-studio.log").read_text()[-3000:]
        try:
            return urllib.request.urlopen(client.url + "/health", timeout=5).status == 200
        except (urllib.error.URLError, ConnectionError):
            return False

    try:
        wait_for(healthy, "Label Studio to start", timeout=180)
        yield client
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        log.close()


def brush_results(label_map: np.ndarray, classes: list[str]) -> list[dict]:
    height, width = label_map.shape
    return [
        {"id": f"r{k}", "from_name": "tag", "to_name": "image", "type": "brushlabels", "original_width": width,
         "original_height": height, "image_rotation": 0,
         "value": {"format": "rle", "rle": mask_to_rle(label_map == k), "brushlabels": [classes[k]]}}
        for k in np.unique(label_map) if k < len(classes)
    ]


def as_png_ids(label_map: np.ndarray) -> np.ndarray:
    return np.where(label_map == 65535, 255, label_map).astype(np.uint8)


def test_label_studio_round_trip_report_and_training_data(job, label_studio):
    root, rows = job
    classes = json.loads((root / "job" / "job.json").read_text())["classes"]
    export = root / "ls-export"
    output = cli("review", "export", str(root / "job"), "--to", "label-studio", "--select", "least-confident:4",
                 "--dest", str(export), "--copy-images", "--local-files-root", str(root))
    assert "4 images (least-confident:4) exported for label-studio" in output
    manifest = json.loads((export / "review.json").read_text())
    chosen = [image["image_index"] for image in manifest["images"]]
    margins = sorted((row["mean_margin"], index) for index, row in rows.items())
    assert chosen == [index for _, index in margins[:4]]  # the least confident, most doubtful first

    # The project as project.json describes it, a local-files storage over the export, the tasks.
    project = label_studio.call("POST", "/api/projects/", json.loads((export / "project.json").read_text()))
    label_studio.call("POST", "/api/storages/localfiles/", {"project": project["id"], "path": str(export), "use_blob_urls": True})
    imported = label_studio.call("POST", f"/api/projects/{project['id']}/import", json.loads((export / "tasks.json").read_text()))
    assert imported["task_count"] == 4 and imported["prediction_count"] == 4
    tasks = label_studio.call("GET", f"/api/tasks/?project={project['id']}")["tasks"]
    by_index = {task["data"]["sed_image_index"]: task for task in tasks}
    assert sorted(by_index) == sorted(chosen)
    served = label_studio.call("GET", by_index[chosen[0]]["data"]["image"])  # Label Studio opens the image
    assert Image.open(io.BytesIO(served)).size == (rows[chosen[0]]["width"], rows[chosen[0]]["height"])
    # "Uncertainty sampling" serves the lowest score, the least confident image, first.
    assert label_studio.call("GET", f"/api/projects/{project['id']}/next/")["data"]["sed_image_index"] == chosen[0]

    # A reviewer corrects one image (a block repainted, a strip left unpainted) and accepts another as predicted.
    corrected_index, accepted_index = chosen[0], chosen[1]
    corrected = label_map_of(rows[corrected_index]).astype(np.int64)
    height, width = corrected.shape
    corrected[height // 4 : height // 2, width // 4 : width // 2] = len(classes) - 1
    corrected[:, :5] = 65535
    label_studio.call("POST", f"/api/tasks/{by_index[corrected_index]['id']}/annotations/", {"result": brush_results(corrected, classes), "lead_time": 3.0})
    prediction = label_studio.call("GET", f"/api/predictions/?task={by_index[accepted_index]['id']}")[0]
    label_studio.call("POST", f"/api/tasks/{by_index[accepted_index]['id']}/annotations/", {"result": prediction["result"], "lead_time": 1.0})
    exported = label_studio.call("GET", f"/api/projects/{project['id']}/export?exportType=JSON&download_all_tasks=true")
    (root / "ls-export.json").write_bytes(exported if isinstance(exported, bytes) else json.dumps(exported).encode())

    truth = root / "reviewed"
    output = cli("review", "import", str(root / "ls-export.json"), "--from", "label-studio", "--job", str(root / "job"), "--output", str(truth))
    assert "2 reviewed images imported from label-studio" in output and "2 tasks had no annotation" in output
    for index, expected in ((corrected_index, corrected), (accepted_index, label_map_of(rows[accepted_index]))):
        written = np.asarray(Image.open(truth / "labels" / label_name(rows[index]["image_id"])))
        np.testing.assert_array_equal(written, as_png_ids(expected))  # pixel for pixel
    review = json.loads((truth / "review.json").read_text())
    assert {image["reviewed_by"] for image in review["images"]} == {"Label Studio user 1"}  # the export's user id
    assert all(image["reviewed_at"] for image in review["images"])
    assert sorted(review["tasks_not_annotated"]) == sorted(by_index[i]["id"] for i in chosen[2:])

    # The loop closes: the run's agreement on the reviewed images, and data a training run reads.
    cli("report", str(root / "job"), "--ground-truth", str(truth / "labels"), "--gallery", "0")
    agreement = json.loads((root / "job" / "report.json").read_text())["ground_truth"]
    assert agreement["images"] == 2 and 0 < agreement["metrics"]["pACC"] < 100
    spec = TrainSpec.model_validate(yaml.safe_load((truth / "train.yaml").read_text()))
    assert Path(spec.data.url).is_absolute() and spec.output.url.startswith(str(truth))  # runs from any folder
    items = labelled_data(spec.data).items
    assert sorted(Path(item.image_url).name for item in items) == sorted(
        Path(rows[i]["image_id"]).name for i in (corrected_index, accepted_index)
    )


READ_CVAT_XML = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import datumaro as dm
    from datumaro.components.annotation import AnnotationType
    dataset = dm.Dataset.import_from(sys.argv[1], "cvat")
    names = dataset.categories()[AnnotationType.label]
    out = {}
    for item in dataset:
        masks = {}
        for annotation in item.annotations:
            assert annotation.type == AnnotationType.mask, annotation.type
            mask = annotation.image.astype(bool)
            name = names[annotation.label].name
            masks[name] = masks.get(name, np.zeros_like(mask)) | mask
        out[item.id] = {name: [list(mask.shape), np.flatnonzero(mask).tolist()] for name, mask in masks.items()}
    json.dump(out, sys.stdout)
    """
)

WRITE_SEGMENTATION_MASKS = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import datumaro as dm
    request = json.load(open(sys.argv[1]))
    names = ["background", *request["classes"]]
    items = []
    for item in request["items"]:
        label_map = np.load(item["label_map"])
        masks = [dm.Mask(image=label_map == k, label=k + 1) for k in np.unique(label_map) if k < len(request["classes"])]
        media = dm.Image.from_numpy(np.zeros((*label_map.shape, 3), np.uint8))
        items.append(dm.DatasetItem(id=item["id"], media=media, annotations=masks))
    dataset = dm.Dataset.from_iterable(items, categories=names)
    label_map = {name: (tuple(colour), [], []) for name, colour in zip(names, [(0, 0, 0), *request["colours"]])}
    dataset.export(sys.argv[2], "voc_segmentation", save_media=False, apply_colormap=True, label_map=label_map)
    """
)


def datumaro(script: str, *arguments: str) -> str:
    if not DATUMARO_PYTHON.exists():
        pytest.skip(f"datumaro is not installed at {DATUMARO_PYTHON} (docs/development.md: python3 -m venv .venv-datumaro ...)")
    done = subprocess.run([str(DATUMARO_PYTHON), "-c", script, *arguments], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_cvat_pre_annotations_read_by_datumaro_and_segmentation_masks_back(job, s3_server):
    root, rows = job
    classes = json.loads((root / "job" / "job.json").read_text())["classes"]
    export = root / "cvat-export"
    cli("review", "export", str(root / "job"), "--to", "cvat", "--select", "random:3", "--dest", str(export), "--copy-images")
    chosen = [image["image_index"] for image in json.loads((export / "review.json").read_text())["images"]]
    assert len(chosen) == 3

    # CVAT for images 1.1, as datumaro's CVAT reader sees it: each class's mask exactly the job's.
    read = json.loads(datumaro(READ_CVAT_XML, str(export)))
    assert sorted(read) == sorted(Path(rows[i]["image_id"]).stem for i in chosen)
    for index in chosen:
        label_map = label_map_of(rows[index])
        masks = read[Path(rows[index]["image_id"]).stem]
        assert sorted(masks) == sorted(classes[label["class_id"]] for label in rows[index]["labels"])
        for name, (shape, painted) in masks.items():
            assert tuple(shape) == label_map.shape
            assert painted == np.flatnonzero(label_map == classes.index(name)).tolist()

    # Segmentation mask 1.1 of corrected maps, written by datumaro as CVAT's exporter does, imported back.
    colours = [[(37 * k + 40) % 256, (91 * k + 20) % 256, (53 * k + 200) % 256] for k in range(len(classes))]
    request = {"classes": classes, "colours": colours, "items": []}
    expected = {}
    for index in chosen:
        corrected = label_map_of(rows[index]).astype(np.int64)
        corrected[: corrected.shape[0] // 3, : corrected.shape[1] // 3] = 0
        corrected[-4:, :] = 65535  # left unpainted: CVAT's background
        np.save(root / f"corrected-{index}.npy", corrected)
        request["items"].append({"id": Path(rows[index]["image_id"]).stem, "label_map": str(root / f"corrected-{index}.npy")})
        expected[index] = as_png_ids(corrected)
    (root / "request.json").write_text(json.dumps(request))
    datumaro(WRITE_SEGMENTATION_MASKS, str(root / "request.json"), str(root / "cvat-masks"))
    assert (root / "cvat-masks" / "labelmap.txt").exists()
    truth = root / "reviewed-cvat"
    output = cli("review", "import", str(root / "cvat-masks"), "--from", "cvat", "--job", str(root / "job"), "--output", str(truth), "--reviewer", "ann")
    assert "3 reviewed images imported from cvat" in output
    for index in chosen:
        written = np.asarray(Image.open(truth / "labels" / label_name(rows[index]["image_id"])))
        np.testing.assert_array_equal(written, expected[index])
    assert {image["reviewed_by"] for image in json.loads((truth / "review.json").read_text())["images"]} == {"ann"}

    # The same export uploaded to object storage (a real S3 server on loopback) imports the same.
    import s3fs

    bucket = s3fs.S3FileSystem(**s3_server)
    bucket.mkdir("reviews")
    bucket.put(str(root / "cvat-masks") + "/", "reviews/cvat-masks/", recursive=True)
    stored = root / "reviewed-cvat-s3"
    output = cli(
        "review", "import", "s3://reviews/cvat-masks", "--from", "cvat", "--job", str(root / "job"), "--output", str(stored),
        "--export-storage-options", json.dumps(s3_server),
    )
    assert "3 reviewed images imported from cvat" in output
    for index in chosen:
        name = label_name(rows[index]["image_id"])
        assert (stored / "labels" / name).read_bytes() == (truth / "labels" / name).read_bytes()

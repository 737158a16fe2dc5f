"""The CLI's validation: bad specs and bad configuration refused before any work, naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from jobs.cli import app
from jobs.spec import SpecError, is_train_spec, load_job_spec, load_train_spec
from jobs.submit import entrypoint, submission_runtime_env
from schemas import JobSpec, TrainSpec
from schemas.export import SCHEMA_PATH, TRAIN_SCHEMA_PATH, job_schema_json, train_schema_json
from tests.helpers import REPO, TINY_CHECKPOINT


runner = CliRunner()


def test_exported_json_schema_is_current():
    assert SCHEMA_PATH.read_text() == job_schema_json(), "run `python -m schemas.export`"
    assert TRAIN_SCHEMA_PATH.read_text() == train_schema_json(), "run `python -m schemas.export`"


def demo_spec(tmp_path: Path) -> dict:
    spec = yaml.safe_load((REPO / "jobs" / "demo.yaml").read_text())
    spec["input"]["url"] = str(REPO / "jobs" / "demo_images")
    spec["output"]["url"] = str(tmp_path / "out")
    return spec


class _CodePayload:
    def __reduce__(self):
        return (print, ("code ran",))


def code_pickle(folder: Path) -> str:
    """A .pth whose unpickling would run code."""
    import torch

    path = folder / "evil.pth"
    torch.save({"model": _CodePayload()}, path)
    return str(path)


def write_spec(tmp_path: Path, spec: dict) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_demo_spec_validates(tmp_path):
    result = runner.invoke(app, ["validate", str(write_spec(tmp_path, demo_spec(tmp_path)))])
    assert result.exit_code == 0, result.output
    assert "valid (6 classes" in result.output


def test_relative_paths_resolve_against_the_current_directory(tmp_path, monkeypatch):
    spec = demo_spec(tmp_path)
    spec["output"]["url"] = "relative/out"
    path = write_spec(tmp_path, spec)
    monkeypatch.chdir(tmp_path)
    assert load_job_spec(path).output.url == str(tmp_path / "relative" / "out")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s["input"].update(colour="red"), "input.colour: Extra inputs are not permitted"),
        (lambda s: s["inference"].update(batch_size="four"), "inference.batch_size"),
        (lambda s: s["inference"].update(top_k=0), "inference.top_k"),
        (lambda s: s["inference"].update(precision="float16"), "inference.precision"),
        (lambda s: s.pop("output"), "output: Field required"),
        (lambda s: s["taxonomy"].update(classes=[]), "at least one class"),
        (lambda s: s["taxonomy"].update(classes=["sky", "sky"]), "duplicate class name 'sky'"),
        (lambda s: s["taxonomy"].update(templates=["a photo"]), "has no '{}'"),
        (lambda s: s["output"].update(formats=["coco"]), "'parquet' must be among the formats"),
        (lambda s: s["inference"].update(device="cuda"), "gpus_per_actor is 0"),
    ],
)
def test_invalid_specs_name_the_field(tmp_path, change, message):
    spec = demo_spec(tmp_path)
    change(spec)
    with pytest.raises(SpecError) as error:
        load_job_spec(write_spec(tmp_path, spec))
    assert message in str(error.value)
    result = runner.invoke(app, ["validate", str(tmp_path / "job.yaml")])
    assert result.exit_code == 2 and message in result.output


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s, t: s["model"].update(clip_model="convnext_xxl"), "model.clip_model: unknown clip_model 'convnext_xxl'"),
        (lambda s, t: s["model"].update(weights=str(t / "missing.pth")), "model.weights"),
        # another architecture: the fixture checkpoint into a wider text tower
        (lambda s, t: s["model"].update(weights=str(TINY_CHECKPOINT)) or s["model"]["clip_model"]["text_cfg"].update(width=64), "model.weights: "),
        (lambda s, t: s["model"].update(weights=code_pickle(t)), "weights_only"),
        (lambda s, t: s["taxonomy"].update(templates=["a photo of a {}."] * 3), "exactly 80 templates"),
        (lambda s, t: s["taxonomy"].update(classes=str(t / "absent.json")), "taxonomy: cannot read"),
        (lambda s, t: s["input"].update(url=str(t / "no-images-here")), "input.url"),
        (lambda s, t: (t / "file").write_text("x") and s["output"].update(url=str(t / "file" / "out")), "output.url: cannot write"),
    ],
)
def test_bad_configuration_is_refused_before_work(tmp_path, change, message):
    spec = demo_spec(tmp_path)
    change(spec, tmp_path)
    result = runner.invoke(app, ["run", str(write_spec(tmp_path, spec))])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "out").exists()


def test_an_unexpected_failure_prints_its_reason_and_with_debug_its_traceback(tmp_path, monkeypatch):
    import jobs.cli

    def broken(*args, **kwargs):
        raise KeyError("boom")

    monkeypatch.setattr(jobs.cli, "run_job", broken)
    path = str(write_spec(tmp_path, demo_spec(tmp_path)))
    result = runner.invoke(app, ["run", path])
    assert result.exit_code == 2
    assert "error: KeyError: 'boom'" in result.output and "Traceback" not in result.output
    assert "--debug prints the traceback" in result.output
    result = runner.invoke(app, ["run", path, "--debug"])
    assert result.exit_code == 2
    assert "Traceback" in result.output and 'raise KeyError("boom")' in result.output


def test_taxonomy_from_a_text_file(tmp_path):
    (tmp_path / "classes.txt").write_text("sky\nroad, street\n\nperson\n")
    spec = demo_spec(tmp_path)
    spec["taxonomy"]["classes"] = str(tmp_path / "classes.txt")
    result = runner.invoke(app, ["validate", str(write_spec(tmp_path, spec))])
    assert result.exit_code == 0 and "3 classes" in result.output, result.output


@pytest.mark.parametrize("inside", ["", "preview", "file://{out}/sub"])
def test_preview_never_writes_into_the_jobs_output(tmp_path, inside):
    spec = demo_spec(tmp_path)
    out = spec["output"]["url"]
    output = inside.format(out=out) if "://" in inside else f"{out}/{inside}" if inside else out
    result = runner.invoke(app, ["preview", str(write_spec(tmp_path, spec)), "--output", output])
    words = " ".join(result.output.replace("│", " ").split())  # the message is boxed and wrapped
    assert result.exit_code == 2 and "a preview never writes there" in words, result.output
    assert not (tmp_path / "out").exists()


def test_validate_shows_the_taxonomy_structure_and_refuses_a_prompt_used_twice(tmp_path):
    spec = demo_spec(tmp_path)
    spec["taxonomy"]["classes"] = ["sky", {"name": "vegetation", "prompts": ["tree", "bush", "grass"]}, "road"]
    spec["taxonomy"]["distractors"] = ["wall", "ceiling"]
    result = runner.invoke(app, ["validate", str(write_spec(tmp_path, spec))])
    assert result.exit_code == 0, result.output
    assert "3 classes from 5 prompts, 2 distractors" in result.output
    assert "class 1 'vegetation': prompts 'tree', 'bush', 'grass'" in result.output
    assert "distractors (unlabeled): 'wall', 'ceiling'" in result.output
    spec["taxonomy"]["distractors"] = ["wall", "grass"]
    result = runner.invoke(app, ["validate", str(write_spec(tmp_path, spec))])
    assert result.exit_code == 2
    assert "prompt 'grass' appears twice: in class 'vegetation' and in the distractors" in result.output
    spec["taxonomy"]["distractors"] = []
    spec["taxonomy"]["classes"][1]["prompts"] = []
    result = runner.invoke(app, ["validate", str(write_spec(tmp_path, spec))])
    assert result.exit_code == 2 and "group 'vegetation' has no prompts" in result.output


def test_train_refuses_a_bad_spec_naming_the_field(tmp_path):
    spec = {
        "data": {"url": str(tmp_path / "data")},
        "taxonomy": {"classes": ["sky", "tree"]},
        "model": {"clip_model": "convnext_b", "weights": None},
        "recipe": {"batch_size": 3},
        "output": {"url": str(tmp_path / "out")},
        "scaling": {"num_workers": 2},
    }
    spec_file = tmp_path / "train.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    result = runner.invoke(app, ["train", str(spec_file)])
    assert result.exit_code == 2
    assert "recipe.batch_size 3 is not divisible by scaling.num_workers 2" in result.output

    spec["recipe"] = {"batch_size": 2, "learning_rate": 1e-3}
    spec_file.write_text(yaml.safe_dump(spec))
    result = runner.invoke(app, ["train", str(spec_file)])
    assert result.exit_code == 2 and "recipe.learning_rate" in result.output

    for change, message in (
        ({"taxonomy": None}, "taxonomy is required unless data.dataset names a prepared benchmark"),
        ({"data": {"url": "x", "dataset": "coco-stuff-171", "images_dir": "jpg"}}, "images_dir, labels_dir and ignore_label apply to folders"),
        ({"recipe": {"precision": "float8"}}, "recipe.precision"),
        ({"validation": {"url": "x", "every": 0}}, "validation.every"),
    ):
        spec_file.write_text(yaml.safe_dump({**spec, "recipe": {"batch_size": 2}, **change}))
        result = runner.invoke(app, ["train", str(spec_file)])
        assert result.exit_code == 2 and message in result.output, result.output


def test_train_refuses_missing_data_before_starting_ray(tmp_path):
    spec = {
        "data": {"url": str(tmp_path / "nowhere")},
        "taxonomy": {"classes": ["sky", "tree"]},
        "model": {"clip_model": "convnext_b", "weights": None},
        "output": {"url": str(tmp_path / "out")},
    }
    spec_file = tmp_path / "train.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    result = runner.invoke(app, ["train", str(spec_file)])
    assert result.exit_code == 2
    assert f"data.url: {tmp_path / 'nowhere' / 'images'} is not a folder of images" in result.output
    assert not (tmp_path / "out").exists()


def test_bundled_training_specs_validate(monkeypatch):
    monkeypatch.chdir(REPO)  # their paths are relative to the repository, as the README runs them
    demo = load_train_spec(REPO / "jobs" / "train_demo.yaml")
    assert demo.validation is not None and demo.data.url == str(REPO / "jobs" / "demo_train" / "train")
    paper = load_train_spec(REPO / "jobs" / "train_coco_stuff.yaml")
    assert paper.taxonomy is None and paper.data.dataset == "coco-stuff-171" and paper.model.clip_weights == "pretrained"
    assert (paper.recipe.iterations, paper.recipe.batch_size, paper.recipe.lr, paper.scaling.num_workers) == (80_000, 4, 2e-4, 4)
    finetuned = load_job_spec(REPO / "jobs" / "demo_finetuned.yaml")
    assert finetuned.model.weights.endswith("iter_0000150.safetensors")


def test_clip_weights_only_without_an_sed_checkpoint(tmp_path):
    spec = demo_spec(tmp_path)
    spec["model"].update(weights=str(TINY_CHECKPOINT), clip_weights="pretrained")
    with pytest.raises(SpecError, match="clip_weights applies only when weights is null"):
        load_job_spec(write_spec(tmp_path, spec))


def test_submission_carries_either_kind_of_spec_and_runs_its_command(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    for name, command, kind in (("demo.yaml", "run", JobSpec), ("train_demo.yaml", "train", TrainSpec)):
        path = REPO / "jobs" / name
        spec = load_train_spec(path) if is_train_spec(path) else load_job_spec(path)
        assert isinstance(spec, kind) and entrypoint(spec) == f"python -m jobs.cli {command} spec.yaml"
        folder = tmp_path / name
        folder.mkdir()
        env = submission_runtime_env(spec, folder)
        carried = kind.model_validate(yaml.safe_load((folder / "spec.yaml").read_text()))
        assert carried.ray.address == "auto" and env["working_dir"] == str(folder)


def test_validate_checks_a_training_spec_and_its_data_without_training(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    result = runner.invoke(app, ["validate", "jobs/train_demo.yaml"])
    assert result.exit_code == 0, result.output
    assert "valid training spec (6 training images, 2 validation images, 4 classes" in result.output
    spec = yaml.safe_load((REPO / "jobs" / "train_demo.yaml").read_text())
    spec["validation"]["url"] = str(tmp_path / "no-such-folder")
    spec["output"]["url"] = str(tmp_path / "out")
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(spec))
    result = runner.invoke(app, ["validate", str(tmp_path / "train.yaml")])
    assert result.exit_code == 2 and f"validation.url: {tmp_path / 'no-such-folder' / 'images'} is not a folder of images" in result.output
    assert not (tmp_path / "out").exists()
    spec["validation"]["url"] = str(REPO / "jobs" / "demo_train" / "val")
    for clip_weights, message in (
        ("pretrained", "model.clip_weights 'pretrained': a pretrained tag needs an OpenCLIP architecture"),
        (str(tmp_path / "open_clip.bin"), f"model.clip_weights: '{tmp_path / 'open_clip.bin'}' does not exist"),
    ):
        spec["model"]["clip_weights"] = clip_weights
        (tmp_path / "train.yaml").write_text(yaml.safe_dump(spec))
        for command in ("validate", "train"):  # `train` refuses before starting Ray
            result = runner.invoke(app, [command, str(tmp_path / "train.yaml")])
            assert result.exit_code == 2 and message in result.output, result.output


def test_random_weights_keep_their_identity_and_clip_weights_change_it(tmp_path):
    """Outputs written before `clip_weights` existed must still match their job (resume, not conflict)."""
    import hashlib
    import json

    from pipeline.model_loading import model_config, random_weights_hash

    spec = load_job_spec(write_spec(tmp_path, demo_spec(tmp_path)))
    payload = json.dumps({"random_seed": 0, "config": model_config(spec.model).describe()}, sort_keys=True)
    assert random_weights_hash(spec.model) == "random-" + hashlib.sha256(payload.encode()).hexdigest()
    with_clip = spec.model.model_copy(update={"clip_weights": "open_clip.bin"})
    assert random_weights_hash(with_clip) != random_weights_hash(spec.model)


def test_relative_clip_weights_files_become_absolute_and_tags_stay(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    spec = yaml.safe_load((REPO / "jobs" / "train_demo.yaml").read_text())
    for clip_weights, expected in (("weights/open_clip.bin", str(REPO / "weights" / "open_clip.bin")), ("pretrained", "pretrained")):
        spec["model"]["clip_weights"] = clip_weights
        (tmp_path / "train.yaml").write_text(yaml.safe_dump(spec))
        assert load_train_spec(tmp_path / "train.yaml").model.clip_weights == expected


def test_num_actors_is_a_number_or_a_range_for_an_autoscaling_pool(tmp_path):
    from pipeline.ray_stages import _actor_pool

    spec = demo_spec(tmp_path)
    spec["ray"]["num_actors"] = {"min": 2, "max": 16}
    pool = _actor_pool(JobSpec.model_validate(spec).ray)
    assert (pool.min_size, pool.max_size) == (2, 16)
    spec["ray"]["num_actors"] = 3
    pool = _actor_pool(JobSpec.model_validate(spec).ray)
    assert (pool.min_size, pool.max_size) == (3, 3)
    for bad in ({"min": 4, "max": 2}, 0, {"min": 1}):
        spec["ray"]["num_actors"] = bad
        with pytest.raises(ValueError):
            JobSpec.model_validate(spec)

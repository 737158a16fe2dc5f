"""Checkpoints: the paper's layout, the project's format, fsspec URLs and clear errors."""

from __future__ import annotations

import json
import pickle

import fsspec
import pytest
import torch

import sed_model
from sed_model.checkpoint import CheckpointError, load_state_dict_strict, read_checkpoint
from tests.helpers import REFERENCE_DIR, TINY_CHECKPOINT

LAYOUT = json.loads((REFERENCE_DIR / "official_checkpoint_layout.json").read_text())


@pytest.mark.parametrize("preset", ["convnext_b", "convnext_l"])
def test_presets_accept_the_released_layout(preset):
    layout = LAYOUT[preset]
    config = sed_model.SEDConfig(clip_model=preset)
    with torch.device("meta"):
        model = sed_model.build_sed(config)
    assert model.open_clip_model == layout["open_clip_config"]
    assert model.pretrained_tag == layout["open_clip_pretrained_tag"]
    assert sum(p.numel() for p in model.parameters()) == layout["num_params"]
    assert sum(p.numel() for p in model.decoder.parameters()) == layout["decoder_params"]
    official = {"model": {k: torch.empty(shape, device="meta") for k, shape in layout["state_dict_shapes"].items()}}
    renamed, unknown = sed_model.checkpoint.official_to_project_keys(official["model"])
    assert not unknown
    load_state_dict_strict(model, renamed)


def test_loads_paper_format_from_path_and_fsspec_url(tmp_path, reference):
    data = TINY_CHECKPOINT.read_bytes()
    with fsspec.open("memory://ckpt/sed_tiny.pth", "wb") as f:
        f.write(data)
    config = sed_model.SEDConfig(clip_model=reference["clip_cfg"])
    for url in (str(TINY_CHECKPOINT), f"file://{TINY_CHECKPOINT}", "memory://ckpt/sed_tiny.pth"):
        model = sed_model.build_sed(config)
        info = sed_model.load_checkpoint(model, url)
        assert info.format == "official" and info.num_tensors == 245 and len(info.sha256) == 64
        torch.testing.assert_close(model.decoder.head.bias, torch.load(TINY_CHECKPOINT, weights_only=True)["model"]["sem_seg_head.predictor.transformer.head.bias"])


def test_project_format_round_trip_and_create_model(tmp_path, tiny_pooling1, reference):
    url = f"{tmp_path}/tiny.safetensors"
    saved = sed_model.save_checkpoint(tiny_pooling1, url)
    model, info = sed_model.create_model(weights=url)
    assert info.sha256 == saved.sha256 and info.format == "safetensors"
    assert model.config == tiny_pooling1.config and not model.training
    for (name, a), b in zip(tiny_pooling1.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    image, text = reference["images"][0], reference["text_features"]
    torch.testing.assert_close(model.predict(image, text), tiny_pooling1.predict(image, text))


def save_official(tmp_path, state_dict, name="bad.pth"):
    path = tmp_path / name
    torch.save({"model": state_dict, "iteration": 0}, path)
    return str(path)


@pytest.fixture()
def official_state_dict():
    return dict(torch.load(TINY_CHECKPOINT, weights_only=True)["model"])


@pytest.fixture()
def fresh_tiny(reference):
    return sed_model.build_sed(sed_model.SEDConfig(clip_model=reference["clip_cfg"]))


def test_missing_key_is_named(tmp_path, fresh_tiny, official_state_dict):
    del official_state_dict["sem_seg_head.predictor.transformer.head0.bias"]
    with pytest.raises(CheckpointError, match=r"1 missing keys: decoder\.head0\.bias"):
        sed_model.load_checkpoint(fresh_tiny, save_official(tmp_path, official_state_dict))


def test_unexpected_and_foreign_keys_are_named(tmp_path, fresh_tiny, official_state_dict):
    official_state_dict["sem_seg_head.predictor.transformer.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"unexpected keys: decoder\.extra\.weight"):
        sed_model.load_checkpoint(fresh_tiny, save_official(tmp_path, official_state_dict))
    official_state_dict["backbone.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"outside .*backbone\.weight"):
        sed_model.load_checkpoint(fresh_tiny, save_official(tmp_path, official_state_dict))


def test_wrong_shape_is_named(tmp_path, fresh_tiny, official_state_dict):
    official_state_dict["sem_seg_head.predictor.transformer.conv1.bias"] = torch.zeros(7)
    with pytest.raises(CheckpointError, match=r"decoder\.conv1\.bias: checkpoint \(7,\) vs model \(128,\)"):
        sed_model.load_checkpoint(fresh_tiny, save_official(tmp_path, official_state_dict))


def test_other_architecture_is_refused(reference):
    with torch.device("meta"):
        model = sed_model.build_sed(sed_model.SEDConfig(clip_model="convnext_b"))
    with pytest.raises(CheckpointError, match="shape mismatches"):
        sed_model.load_checkpoint(model, str(TINY_CHECKPOINT))


def test_not_a_checkpoint(tmp_path, fresh_tiny):
    path = tmp_path / "notes.pth"
    path.write_text("this is not a checkpoint")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        sed_model.load_checkpoint(fresh_tiny, str(path))
    torch.save({"weights": {}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="'model' state dict"):
        sed_model.load_checkpoint(fresh_tiny, str(tmp_path / "other.pth"))
    (tmp_path / "x.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        sed_model.load_checkpoint(fresh_tiny, str(tmp_path / "x.safetensors"))


class _Payload:
    def __reduce__(self):
        return (print, ("code ran",))


def test_pickle_with_code_is_refused(tmp_path, fresh_tiny):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": _Payload()}, f)
    with pytest.raises(CheckpointError, match="weights_only"):
        sed_model.load_checkpoint(fresh_tiny, str(path))


def test_unreadable_url_and_unknown_format(tmp_path, fresh_tiny):
    with pytest.raises(CheckpointError, match="cannot read checkpoint 'memory://nowhere/missing.pth'"):
        sed_model.load_checkpoint(fresh_tiny, "memory://nowhere/missing.pth")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        sed_model.load_checkpoint(fresh_tiny, str(tmp_path / "absent.pth"))
    with pytest.raises(CheckpointError, match="cannot tell the format"):
        sed_model.load_checkpoint(fresh_tiny, str(tmp_path / "weights.bin"))
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        sed_model.load_checkpoint(fresh_tiny, str(TINY_CHECKPOINT), format="onnx")


def test_explicit_format_overrides_extension(tmp_path, fresh_tiny):
    path = tmp_path / "weights.bin"
    path.write_bytes(TINY_CHECKPOINT.read_bytes())
    assert sed_model.load_checkpoint(fresh_tiny, str(path), format="official").format == "official"


def test_foreign_safetensors_is_refused(tmp_path, fresh_tiny):
    import safetensors.torch

    path = tmp_path / "foreign.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match="not a sed-label checkpoint"):
        read_checkpoint(str(path))

"""Training's starting point: OpenCLIP weights into SED's CLIP part, from a file, a URL or a tag."""

from __future__ import annotations

import copy

import fsspec
import open_clip
import pytest
import torch

import sed_model
from sed_model.clip_weights import pretrained_config


def openclip_checkpoint(clip_cfg: dict, path: str, seed: int = 1) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    state = open_clip.model.CLIP(**clip_cfg).state_dict()
    with fsspec.open(path, "wb") as f:
        torch.save(state, f)
    return state


@pytest.mark.parametrize("where", ["file", "memory"])
def test_openclip_weights_replace_the_clip_part_and_leave_the_decoder(reference, tmp_path, where):
    path = str(tmp_path / "open_clip_model.bin") if where == "file" else "memory://clip-weights/open_clip_model.bin"
    state = openclip_checkpoint(reference["clip_cfg"], path)
    torch.manual_seed(0)
    model = sed_model.build_sed(sed_model.SEDConfig(clip_model=reference["clip_cfg"], image_size=64))
    decoder = copy.deepcopy(model.decoder.state_dict())
    sed_model.load_clip_weights(model, path)
    loaded = model.backbone.clip.state_dict()
    assert loaded.keys() == state.keys()
    for name, value in state.items():
        assert torch.equal(loaded[name], value), name
    for name, value in model.decoder.state_dict().items():
        assert torch.equal(value, decoder[name]), name


def test_weights_of_another_architecture_are_refused(reference, tmp_path):
    other = copy.deepcopy(reference["clip_cfg"])
    other["text_cfg"]["width"] = 64
    path = str(tmp_path / "other.bin")
    openclip_checkpoint(other, path)
    model = sed_model.build_sed(sed_model.SEDConfig(clip_model=reference["clip_cfg"], image_size=64))
    with pytest.raises(sed_model.ClipWeightsError, match="do not fit this model's CLIP"):
        sed_model.load_clip_weights(model, path)
    with pytest.raises(sed_model.ClipWeightsError, match="no such file"):
        sed_model.load_clip_weights(model, str(tmp_path / "missing.bin"))


def test_tags_are_checked_against_openclips_list_before_any_download():
    config = pretrained_config("convnext_base_w_320", "laion_aesthetic_s13b_b82k", "pretrained")
    assert "laion_aesthetic" in config["hf_hub"]  # the preset's own tag
    with pytest.raises(sed_model.ClipWeightsError, match="'laion_nope' is not an OpenCLIP tag of convnext_base_w_320; known: .*laion_aesthetic_s13b_b82k"):
        pretrained_config("convnext_base_w_320", "laion_aesthetic_s13b_b82k", "laion_nope")
    with pytest.raises(sed_model.ClipWeightsError, match="needs an OpenCLIP architecture"):
        pretrained_config(None, None, "pretrained")
    with pytest.raises(sed_model.ClipWeightsError, match="not a preset"):
        pretrained_config("convnext_base_w_320", None, "pretrained")


def test_a_file_that_is_no_checkpoint_is_named(reference, tmp_path):
    (tmp_path / "page.bin").write_text("<html>403 Forbidden</html>")
    model = sed_model.build_sed(sed_model.SEDConfig(clip_model=reference["clip_cfg"], image_size=64))
    with pytest.raises(sed_model.ClipWeightsError, match="page.bin' is not a readable OpenCLIP checkpoint"):
        sed_model.load_clip_weights(model, str(tmp_path / "page.bin"))


def test_a_url_query_does_not_hide_the_file_suffix(reference):
    """OpenCLIP picks its reader by suffix: `...safetensors?signature` must be read as safetensors."""
    from safetensors.torch import save

    torch.manual_seed(1)
    state = open_clip.model.CLIP(**reference["clip_cfg"]).state_dict()
    url = "memory://clip-weights/open_clip_model.safetensors?X-Amz-Signature=abc"
    with fsspec.open(url, "wb") as f:  # the memory filesystem keeps the query as part of the name
        f.write(save({name: value.contiguous() for name, value in state.items()}))
    model = sed_model.build_sed(sed_model.SEDConfig(clip_model=reference["clip_cfg"], image_size=64))
    sed_model.load_clip_weights(model, url)
    loaded = model.backbone.clip.state_dict()
    assert all(torch.equal(loaded[name], value) for name, value in state.items())

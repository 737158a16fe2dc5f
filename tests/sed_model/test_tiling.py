"""Large images by overlapping windows (`sed_model/tiling.py`).

The streamed blend is checked against the whole canvas blended at once (the real tiny SED, exact
and with early rejection); seamlessness and small structures with `ColourModel`, a stand-in whose
windows agree exactly where they overlap (a per-pixel colour classifier: translation-equivariant,
which no real network is at its borders); bounded memory at T=150 on a 6,000 x 4,000 image in a
fresh process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import sed_model
from sed_model import tiling as tiling_module
from sed_model.model import LowResolution
from sed_model.ranking import margin
from sed_model.tiling import Tiling, label_tiled, tent

REPO = Path(__file__).resolve().parents[2]


def _image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """A smooth random colour field (structure at several scales, so windows see different things)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand((1, 3, 6, 8), generator=generator) * 255
    fine = torch.rand((1, 3, 40, 60), generator=generator) * 60
    field = F.interpolate(coarse, size=(height, width), mode="bilinear") + F.interpolate(fine, size=(height, width), mode="bilinear")
    return field.clamp(0, 255).to(torch.uint8)[0]


def _blended_at_once(model, image, text, tiling: Tiling, top_k):
    """The blend done the simple way: every class on one canvas for the whole image, resized at once."""
    height, width = image.shape[-2:]
    tiled_height, tiled_width = tiling.tiled_size(height, width)
    assert (tiled_height, tiled_width) == (height, width)
    cells = tiling.window // 4
    canvas = torch.zeros((text.shape[0], height // 4, width // 4))
    weights = torch.zeros((height // 4, width // 4))
    weight = tent(cells)
    for top in tiling.starts(height):
        for left in tiling.starts(width):
            low = model.predict_low_res([image[:, top : top + tiling.window, left : left + tiling.window]], text, top_k)[0]
            probs = F.interpolate(low.probs[None], size=(cells, cells), mode="bilinear", align_corners=False)[0]
            full = torch.zeros((text.shape[0], cells, cells))
            full[low.kept] = probs
            canvas[:, top // 4 : top // 4 + cells, left // 4 : left // 4 + cells] += full * weight
            weights[top // 4 : top // 4 + cells, left // 4 : left // 4 + cells] += weight
    canvas /= weights
    probs = F.interpolate(canvas[None], size=(height, width), mode="bilinear", align_corners=False)[0]
    margins = F.interpolate(margin(canvas, torch.arange(text.shape[0]), None)[None, None], size=(height, width), mode="bilinear", align_corners=False)[0, 0]
    return probs, margins


@pytest.mark.parametrize("top_k", [None, 2], ids=["exact", "early_rejection"])
def test_the_streamed_blend_is_the_whole_canvas_blended_at_once(tiny_pooling1, reference, top_k, monkeypatch):
    monkeypatch.setattr(tiling_module, "BLOCK_BYTES", 200_000)  # several blocks of output rows per band
    image, text = _image(440, 640), reference["text_features"]
    tiling = Tiling(window=256, overlap=0.25, min_side=300)
    with torch.inference_mode():
        tiled = label_tiled(tiny_pooling1, image, text, tiling, top_k=top_k, class_chunk=4, runner_up=True, margins=True)
        probs, margins = _blended_at_once(tiny_pooling1, image, text, tiling, top_k)
    assert tiled.windows == len(tiling.starts(440)) * len(tiling.starts(640)) == 6
    confidence, labels = probs.max(dim=0)
    assert (tiled.labels == labels).float().mean() > 0.9999
    torch.testing.assert_close(tiled.confidence, confidence, atol=1e-5, rtol=0)
    torch.testing.assert_close(tiled.margin, margins, atol=1e-5, rtol=0)
    runner_up = probs.topk(2, dim=0).indices[1]
    assert (tiled.runner_up == runner_up).float().mean() > 0.999
    if top_k is not None:  # each window rejected classes of its own; the image keeps their union
        assert 0 < len(tiled.kept_after["head0"]) <= text.shape[0]


def test_one_window_is_the_untiled_labelling(tiny_pooling1, reference):
    image, text = _image(768, 768, seed=1), reference["text_features"]
    with torch.inference_mode():
        tiled = label_tiled(tiny_pooling1, image, text, Tiling(window=768, min_side=768), runner_up=True, margins=True)
        whole = tiny_pooling1.label_batch([image], text, None, [(768, 768)], runner_up=True, margins=True)[0]
    assert tiled.windows == 1  # labels may differ only where two classes tie to float32 rounding
    assert (tiled.labels == whole.labels).float().mean() > 0.9999 and (tiled.runner_up == whole.runner_up).float().mean() > 0.999
    torch.testing.assert_close(tiled.confidence, whole.confidence, atol=1e-6, rtol=0)
    torch.testing.assert_close(tiled.margin, whole.margin, atol=1e-6, rtol=0)


COLOURS = torch.tensor([[128.0, 128.0, 128.0], [230.0, 20.0, 20.0], [20.0, 200.0, 40.0]])  # grey ground, red, green


class ColourModel:
    """A stand-in for SED that classifies each pixel by its colour: the image is resized to
    `image_size` as SED's preprocessing does, averaged over 4x4 cells (the decoder's resolution),
    and class c's probability is exp(-distance to COLOURS[c] / 40). Per pixel, so two windows
    agree exactly where they overlap."""

    device = torch.device("cpu")

    def __init__(self, image_size: int = 768) -> None:
        self.config = sed_model.SEDConfig(image_size=image_size)

    def eval(self) -> ColourModel:
        return self

    def predict_low_res(self, images, text, top_k=None, precision="float32"):
        results = []
        for image in images:
            x = F.interpolate(image[None].float(), size=(self.config.image_size,) * 2, mode="bilinear", align_corners=False)
            cells = F.avg_pool2d(x, 4)[0]
            distance = (cells[None] - COLOURS[:, :, None, None]).norm(dim=1)
            kept = torch.arange(len(COLOURS))
            results.append(LowResolution(torch.exp(-distance / 40), kept, {"head0": kept, "head1": kept, "head2": kept}))
        return results

    label_batch = sed_model.SED.label_batch


def _per_pixel_labels(image: torch.Tensor) -> torch.Tensor:
    """ColourModel's labels for the whole image at once (4x4 cells at native resolution, resized)."""
    cells = F.avg_pool2d(image[None].float(), 4)[0]
    probs = torch.exp(-(cells[None] - COLOURS[:, :, None, None]).norm(dim=1) / 40)
    return F.interpolate(probs[None], size=image.shape[-2:], mode="bilinear", align_corners=False)[0].argmax(0)


def test_windows_that_agree_blend_without_seams():
    image = _image(1600, 2400, seed=2)
    predictor = sed_model.SEDPredictor(ColourModel(), tiling=Tiling(window=768, min_side=1536))
    predictor.set_taxonomy(["ground", "red", "green"], text_features=torch.zeros(3, 80, 8))
    labelling = predictor.label_batch([image])[0]
    assert labelling.windows == 3 * 4
    assert torch.equal(labelling.labels, _per_pixel_labels(image))


def test_tiling_finds_thin_structures_the_protocol_shrinks_away():
    image = COLOURS[0].to(torch.uint8)[:, None, None].repeat(1, 3000, 4000)
    for row in range(200, 2800, 300):  # 3-pixel red lines, 6x thinner than one pixel at short side 640
        image[:, row : row + 3] = COLOURS[1].to(torch.uint8)[:, None, None]
    lines = torch.zeros(3000, 4000, dtype=torch.bool)
    for row in range(200, 2800, 300):
        lines[row : row + 3] = True
    text = torch.zeros(3, 80, 8)
    whole = sed_model.SEDPredictor(ColourModel())
    tiled = sed_model.SEDPredictor(ColourModel(), tiling=Tiling(window=768, min_side=1536))
    found = {}
    for name, predictor in (("whole", whole), ("tiled", tiled)):
        predictor.set_taxonomy(["ground", "red", "green"], text_features=text)
        labels = predictor.label_batch([image])[0].labels
        found[name] = float((labels[lines] == 1).float().mean())
    assert found["whole"] < 0.05 and found["tiled"] > 0.6, found


def test_tiling_applies_to_large_images_only_and_validates_its_settings():
    tiling = Tiling()
    assert not tiling.applies(1536, 4000) and tiling.applies(1537, 1600)
    assert tiling.tiled_size(4001, 6003) == (4000, 6004)
    starts = tiling.starts(4000)
    assert starts[0] == 0 and starts[-1] == 4000 - 768 and all(s % 4 == 0 for s in starts)
    assert max(b - a for a, b in zip(starts, starts[1:])) <= 768 * 0.75
    for bad in ({"window": 770}, {"overlap": 0.9}, {"scale": 0.0}, {"min_side": 500}):
        with pytest.raises(ValueError, match="tiling"):
            Tiling(**bad)


MEMORY_SCRIPT = """
import json, resource, sys, torch
sys.path.insert(0, {repo!r})
import sed_model
from tests.helpers import load_reference, tiny_model
reference = load_reference("sed_tiny_reference_outputs.pt")
model = tiny_model(reference["clip_cfg"], eval_pooling=1)
text = torch.nn.functional.normalize(torch.randn(150, 80, reference["text_features"].shape[-1]), dim=-1)
image = torch.randint(0, 256, (3, 4000, 6000), dtype=torch.uint8)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
with torch.inference_mode():
    labelling = sed_model.label_tiled(model, image, text, sed_model.Tiling(scale=0.25, min_side=3072), margins=True)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({{"windows": labelling.windows, "before_mb": before, "peak_mb": after, "shape": list(labelling.labels.shape)}}))
"""


@pytest.mark.slow
def test_a_6000_by_4000_image_at_150_classes_stays_in_bounded_memory():
    """The (T, H, W) probabilities would be 14 GB; labels, confidence and margin at full size 384 MB."""
    completed = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT.format(repo=str(REPO))], capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-2000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result["shape"] == [4000, 6000] and result["windows"] == 6
    assert result["peak_mb"] - result["before_mb"] < 1500, result

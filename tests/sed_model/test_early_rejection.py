"""Early rejection per image: a batch gives every image exactly what it would get alone."""

from __future__ import annotations

import pytest
import torch

from sed_model.decoder import Rows, early_reject


def test_early_reject_keeps_union_of_per_pixel_top_k_within_each_image():
    # Two images with 3 and 2 rows; 1x2 pixel maps.
    logits = torch.tensor(
        [
            [[5.0, 0.0]],  # image 0, class 0: best at pixel 0
            [[1.0, 9.0]],  # image 0, class 1: best at pixel 1
            [[0.0, 1.0]],  # image 0, class 2: never best
            [[-1.0, -1.0]],  # image 1, class 0: never best
            [[0.0, 0.0]],  # image 1, class 1: best everywhere
        ]
    )
    rows = Rows(torch.tensor([0, 0, 0, 1, 1]), torch.tensor([0, 1, 2, 0, 1]), [3, 2])
    assert early_reject(logits, rows, top_k=1).tolist() == [True, True, False, False, True]
    assert early_reject(logits, rows, top_k=2).tolist() == [True, True, True, True, True]
    kept = rows.select(early_reject(logits, rows, top_k=1))
    assert kept.counts == [2, 1] and kept.class_index.tolist() == [0, 1, 1]


@pytest.mark.parametrize("top_k", [1, 3])
def test_batched_equals_per_image(tiny_pooling1, reference, cer_cases, top_k):
    text = cer_cases["text_features"][:30]  # 30 of the 150 classes: enough for kept sets to differ
    # Different sizes and contents: the kept sets differ between the images.
    images = [reference["images"][0], reference["images"][1], reference["images"][0][:, 40:, :200].contiguous()]
    batched = tiny_pooling1.predict_batch(images, text, top_k=top_k)
    assert len({tuple(p.kept.tolist()) for p in batched}) > 1
    for image, together in zip(images, batched):
        alone = tiny_pooling1.predict(image, text, top_k=top_k)
        single = tiny_pooling1.predict_batch([image], text, top_k=top_k)[0]
        assert together.kept.tolist() == single.kept.tolist()
        for stage in ("head0", "head1", "head2"):
            assert together.kept_after[stage].tolist() == single.kept_after[stage].tolist()
        # Bit for bit: chunks never mix images, so batch-mates cannot change the rounding.
        assert torch.equal(together.probs, alone)


def test_top_k_at_least_num_classes_is_exact(tiny_pooling1, reference):
    image, text = reference["images"][0], reference["text_features"]
    exact = tiny_pooling1.predict(image, text)
    torch.testing.assert_close(tiny_pooling1.predict(image, text, top_k=len(text)), exact)


def test_forward_logits_marks_rejected_classes_minus_inf(tiny_pooling2, reference, cer_cases):
    case = cer_cases["cases"][1]
    image = reference["images"][case["image_index"]]
    with torch.no_grad():
        head, head0, head1, head2 = tiny_pooling2.forward_logits(image[None], cer_cases["text_features"], top_k=1)
    assert torch.isfinite(head0).all()
    for logits, kept in ((head1, case["kept_after_head0"]), (head2, case["kept_after_head1"]), (head, case["kept_after_head2"])):
        finite = torch.isfinite(logits[0]).all(dim=(1, 2)).nonzero().flatten().tolist()
        assert finite == kept


def test_rejects_bad_top_k(tiny_pooling1, reference):
    with pytest.raises(ValueError, match="top_k"):
        tiny_pooling1.predict(reference["images"][0], reference["text_features"], top_k=0)

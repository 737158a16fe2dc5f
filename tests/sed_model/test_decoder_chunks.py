"""The decoder's chunked schedule: any chunk size gives the same outputs, and row bookkeeping."""

from __future__ import annotations

import pytest
import torch

import sed_model
from sed_model.decoder import Rows, _regroup


def test_chunk_spans_never_span_images_and_cut_each_image_alike_in_every_batch():
    rows = Rows(torch.zeros(16, dtype=torch.long), torch.zeros(16, dtype=torch.long), [5, 0, 8, 3])
    assert rows.chunk_spans(3) == [(0, 0, 3), (0, 3, 5), (2, 5, 8), (2, 8, 11), (2, 11, 13), (3, 13, 16)]
    alone = Rows(torch.zeros(5, dtype=torch.long), torch.zeros(5, dtype=torch.long), [5])
    assert alone.chunk_spans(3) == [(0, 0, 3), (0, 3, 5)]  # image 0 is cut as in the batch above


def test_regroup_keeps_order_and_regroups_to_the_given_sizes():
    chunks = [torch.arange(5.0).view(5, 1, 1, 1), torch.arange(5.0, 8.0).view(3, 1, 1, 1), torch.arange(8.0, 12.0).view(4, 1, 1, 1)]
    keep = torch.tensor([1, 0, 1, 1, 0, 1, 1, 0, 1, 1, 1, 0], dtype=torch.bool)
    groups = _regroup(chunks, keep, [3, 2, 3])
    assert [g.shape[0] for g in groups] == [3, 2, 3]
    assert torch.cat(groups).flatten().tolist() == [0.0, 2.0, 3.0, 5.0, 6.0, 8.0, 9.0, 10.0]
    assert chunks == [None, None, None]  # consumed: each input chunk is released once read


@pytest.mark.parametrize("top_k", [None, 1])
def test_chunk_size_does_not_change_the_outputs(tiny_pooling2, reference, cer_cases, top_k):
    # 40 classes x 2 images: chunks of 7 rows cut through images and through kept sets.
    images = [reference["images"][0], reference["images"][1]]
    text = cer_cases["text_features"][:40]
    model = tiny_pooling2
    with torch.no_grad():
        features = model.dense_features(images)
        cost = sed_model.cost_volume(features["clip_vis_dense"], text)
        appearance = (features["res4"], features["res3"], features["res2"])
        one_chunk = model.decoder(cost, appearance, model.pooling, top_k, chunk_rows=10_000)
        for chunk_rows in (3, 7):
            chunked = model.decoder(cost, appearance, model.pooling, top_k, chunk_rows=chunk_rows)
            for expected, actual in zip(one_chunk, chunked):
                assert actual.rows.class_index.tolist() == expected.rows.class_index.tolist()
                assert actual.rows.counts == expected.rows.counts
                torch.testing.assert_close(actual.logits, expected.logits, atol=1e-5, rtol=0)


def test_rejects_bad_chunk_size(tiny_pooling2, reference):
    text = reference["text_features"]
    with torch.no_grad():
        features = tiny_pooling2.dense_features(reference["images"][0])
        cost = sed_model.cost_volume(features["clip_vis_dense"], text)
        with pytest.raises(ValueError, match="chunk_rows"):
            tiny_pooling2.decoder(cost, (features["res4"], features["res3"], features["res2"]), 2, None, chunk_rows=0)

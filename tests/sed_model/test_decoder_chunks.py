"""The decoder's chunked schedule: any chunk size gives the same outputs, and row bookkeeping."""

from __future__ import annotations

import pytest
import torch

import sed_model
from sed_model import decoder as decoder_module
from sed_model.cpu.allocator import advise_huge_pages
from sed_model.decoder import ConvNeXtBlock, Rows, _chunk_stores, _regroup
from tests.helpers import two_images_40_classes


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
    model = tiny_pooling2
    cost, appearance = two_images_40_classes(model, reference, cer_cases)
    with torch.no_grad():
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


def test_chunk_stores_carve_whole_chunks_out_of_large_stores(monkeypatch):
    monkeypatch.setattr(decoder_module, "STORE_BYTES", 10 * 4 * 4)  # 10 rows of (4,) float32 per store
    spans = Rows(torch.zeros(23, dtype=torch.long), torch.zeros(23, dtype=torch.long), [16, 7]).chunk_spans(3)
    chunks = _chunk_stores(spans, (4, 1, 1), torch.zeros(1))
    assert [c.shape[0] for c in chunks] == [end - first for _, first, end in spans]
    assert all(c.is_contiguous(memory_format=torch.channels_last) for c in chunks)
    stores = {c.untyped_storage().data_ptr(): c.untyped_storage().nbytes() for c in chunks}
    # Stores fill up to at least 10 rows with whole chunks: 12 + 10 (4 + 3 + 3) + 1 rows.
    assert sorted(stores.values(), reverse=True) == [12 * 16, 10 * 16, 1 * 16]


def test_inference_stores_do_not_change_the_outputs(tiny_pooling2, reference, cer_cases, monkeypatch):
    model = tiny_pooling2
    cost, appearance = two_images_40_classes(model, reference, cer_cases)
    with torch.no_grad():
        one_store = model.decoder(cost, appearance, model.pooling, 1, chunk_rows=7)
        monkeypatch.setattr(decoder_module, "STORE_BYTES", 1)  # a store per chunk
        many_stores = model.decoder(cost, appearance, model.pooling, 1, chunk_rows=7)
    for a, b in zip(one_store, many_stores):
        assert torch.equal(a.logits, b.logits)


@pytest.mark.parametrize("model_name", ["tiny_pooling1", "tiny_pooling2"])
def test_inference_buffers_give_the_outputs_of_the_plain_path(model_name, request, reference, cer_cases):
    """Stores, the shared concatenation buffer (chunks of 7 rows: the last of each image is shorter)
    and the in-place blocks of inference against the grad-enabled path, which uses none of them."""
    model = request.getfixturevalue(model_name)
    cost, appearance = two_images_40_classes(model, reference, cer_cases)
    with torch.no_grad():
        inference = model.decoder(cost, appearance, model.pooling, 1, chunk_rows=7)
    plain = model.decoder(cost, appearance, model.pooling, 1, chunk_rows=7)
    for a, b in zip(inference, plain):
        assert a.rows.class_index.tolist() == b.rows.class_index.tolist()
        torch.testing.assert_close(a.logits, b.logits.detach(), atol=1e-5, rtol=0)


def test_huge_page_advice_for_large_cpu_tensors():
    assert advise_huge_pages(torch.empty(8 * 2**20, dtype=torch.uint8))  # 8 MB: at least one aligned 2 MB page
    assert not advise_huge_pages(torch.empty(1024, dtype=torch.uint8))  # smaller than a huge page


def test_convnext_block_in_place_writes_over_its_input():
    torch.manual_seed(0)
    block = ConvNeXtBlock(16, 9).eval()
    x = torch.randn(2, 16, 12, 12).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = block(x)
        y = block(x, inplace=True)
    assert y.data_ptr() == x.data_ptr()
    torch.testing.assert_close(y, expected, atol=0, rtol=0)

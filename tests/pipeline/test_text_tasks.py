"""How the taxonomy's classes are split over the text tasks (`ray_stages.text_task_slices`)."""

from __future__ import annotations

import pytest

from pipeline.ray_stages import TEXT_CLASSES_PER_TASK, text_task_slices


@pytest.mark.parametrize("classes", [1, TEXT_CLASSES_PER_TASK - 1, TEXT_CLASSES_PER_TASK, 150, 847])
@pytest.mark.parametrize("cpus", [1, 2, 16, 256])
def test_slices_cover_every_class_once_and_are_never_too_small(classes, cpus):
    slices = text_task_slices(classes, cpus)
    assert [c for first, end in slices for c in range(first, end)] == list(range(classes))
    assert len(slices) <= cpus
    assert len(slices) == 1 or min(end - first for first, end in slices) >= TEXT_CLASSES_PER_TASK


def test_a_large_taxonomy_uses_every_cpu():
    assert len(text_task_slices(847, 16)) == 16
    assert len(text_task_slices(150, 256)) == 150 // TEXT_CLASSES_PER_TASK

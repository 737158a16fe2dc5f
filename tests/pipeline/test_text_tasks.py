"""How the taxonomy's classes are split over the text tasks (`ray_stages.text_task_slices`), and
the memory each asks for (`text_task_memory`)."""

from __future__ import annotations

import pytest

from pipeline.ray_stages import TEXT_CLASSES_PER_TASK, TEXT_TASK_MEMORY, text_task_memory, text_task_slices


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


def node(memory: float, alive: bool = True) -> dict:
    """A node as `ray.nodes()` lists it (the fields read)."""
    return {"Alive": alive, "Resources": {"CPU": 2.0, "memory": memory}}


def test_a_text_task_never_asks_more_memory_than_a_node_has():
    assert text_task_memory([node(16e9), node(8e9)]) == TEXT_TASK_MEMORY
    assert text_task_memory([node(1.5e9), node(1e9), node(64e9, alive=False)]) == int(1.5e9)
    assert text_task_memory([]) == 0  # no request at all

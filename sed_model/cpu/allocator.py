"""Keep freed memory in the process for reuse: a process-wide setting for fast CPU inference.

(`advise_huge_pages` is the other half: large buffers that are mapped fresh fill with 2 MB pages.)

SED allocates and frees tens of MB per layer call. glibc's malloc serves large allocations with
fresh `mmap` pages and hands freed heap tops back to the OS, so each call faults in new zeroed
pages: measured on a 2-core AMD EPYC (ConvNeXt-B, T=32), about 150,000 page faults per decoder call
and 10-16% of the backbone's and decoder's time. With the mmap threshold fixed at its maximum
(32 MiB: every per-chunk temporary of the decoder stays in the heap) and trimming deferred, freed
memory is reused instead. Larger one-off buffers still come from mmap and go back to the OS when
freed; the heap keeps its high-water mark instead of returning it between calls.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

import torch

# mallopt(3) parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_BYTES = 32 * 2**20  # glibc's upper bound for this setting on 64-bit
_TRIM_THRESHOLD_BYTES = 2**31 - 1  # the largest value mallopt takes


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The process's C library on Linux, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to reuse freed memory; False (and nothing done) on other C libraries."""
    mallopt = getattr(_libc(), "mallopt", None)  # musl and others have no mallopt
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES))


_MADV_HUGEPAGE = 14  # madvise(2)
_HUGE_PAGE_BYTES = 2 * 2**20


def advise_huge_pages(tensor: torch.Tensor) -> bool:
    """Ask Linux to back a large CPU tensor's memory with transparent huge pages; best effort.

    A fresh 1 GB mapping faults in 262,144 pages of 4 KB one by one; with huge pages 512. Only
    the 2 MB-aligned part of the tensor's memory is advised. Returns whether the advice was taken.
    """
    madvise = getattr(_libc(), "madvise", None)
    if tensor.device.type != "cpu" or madvise is None:
        return False
    start = tensor.data_ptr()
    end = start + tensor.untyped_storage().nbytes()
    first = -(-start // _HUGE_PAGE_BYTES) * _HUGE_PAGE_BYTES
    last = end // _HUGE_PAGE_BYTES * _HUGE_PAGE_BYTES
    if last <= first:
        return False
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return madvise(first, last - first, _MADV_HUGEPAGE) == 0

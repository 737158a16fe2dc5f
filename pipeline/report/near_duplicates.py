"""Near-duplicate groups from 64-bit perceptual hashes (`fingerprints.perceptual_hash`), without
comparing all pairs.

Two images are near-duplicates when their pHashes differ in at most `MAX_DISTANCE` bits. 4: the
re-encodes (JPEG at quality 50) and resizes (1/2, 1/3) of the demo photos stayed within 2 bits of
their originals, while distinct images were 6 bits apart at the least (the synthetic training
scenes, which share one layout) and 31 on average; a 5% crop moved a hash by 0 to 10 bits, so crops
are mostly not caught, by design: they are other pictures to a segmentation model.

Pigeonhole bands: the 64 bits are cut into `MAX_DISTANCE + 1` bands; two hashes within the distance
differ in at most that many bands, so they agree exactly on one at least. Per band, the distinct
hashes are sorted by the band's value and only hashes of one run are compared (vectorised, offset
by offset); the pairs within the distance are the edges of a graph whose connected components
(scipy's) are the groups: each member is within the distance of another member, not of all.
The work is the pairs that share a band, about (d + 1) N^2 / 2^14 for N hashes spread evenly over
13-bit bands: a million distinct random hashes took 5.6 s (2 cores), ten million would take about
a hundred times that. Memory: tens of bytes per image (hashes, sort orders, the pairs found).
"""

from __future__ import annotations

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

MAX_DISTANCE = 4
HASH_BITS = 64


def _bands(max_distance: int) -> list[tuple[int, int]]:
    """(shift, width) of `max_distance + 1` bands covering the 64 bits, as even as can be."""
    count = max_distance + 1
    widths = [HASH_BITS // count + (1 if i < HASH_BITS % count else 0) for i in range(count)]
    shifts = np.cumsum([0, *widths[:-1]]).tolist()
    return list(zip(shifts, widths))


def close_pairs(hashes: np.ndarray, max_distance: int = MAX_DISTANCE) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i, j), i != j, of `hashes` (uint64, distinct) within `max_distance` bits; a pair
    may be found by several bands."""
    firsts, seconds = [], []
    n = len(hashes)
    for shift, width in _bands(max_distance):
        values = (hashes >> np.uint64(shift)) & np.uint64((1 << width) - 1)
        order = np.argsort(values, kind="stable")
        band, ordered = values[order], hashes[order]
        offset = 1
        active = np.flatnonzero(band[:-1] == band[1:])  # positions whose next hash shares the band
        while active.size:
            other = active + offset
            close = np.bitwise_count(ordered[active] ^ ordered[other]) <= max_distance
            firsts.append(order[active[close]])
            seconds.append(order[other[close]])
            offset += 1
            active = active[active + offset < n]
            active = active[band[active] == band[active + offset]]  # sorted: runs only shrink
    if not firsts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(firsts), np.concatenate(seconds)


def near_duplicate_groups(hashes: np.ndarray, max_distance: int = MAX_DISTANCE) -> np.ndarray:
    """A group number per hash (uint64 array, repeats allowed): equal numbers are near-duplicates;
    -1 for a hash with no near-duplicate. Groups are numbered by size, largest first."""
    distinct, inverse = np.unique(np.asarray(hashes, dtype=np.uint64), return_inverse=True)
    first, second = close_pairs(distinct, max_distance)
    graph = coo_matrix((np.ones(len(first), np.int8), (first, second)), shape=(len(distinct), len(distinct)))
    _, component = connected_components(graph, directed=False)
    per_hash = component[inverse.reshape(-1)]
    labels, sizes = np.unique(per_hash, return_counts=True)
    grouped = labels[sizes > 1][np.argsort(-sizes[sizes > 1], kind="stable")]
    number = np.full(component.max() + 1 if len(component) else 0, -1, np.int64)
    number[grouped] = np.arange(len(grouped))
    return number[per_hash]

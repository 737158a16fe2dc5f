"""pipeline.report.near_duplicates: every pair within the distance found, without all pairs."""

from __future__ import annotations

import itertools

import numpy as np

from pipeline.report.near_duplicates import MAX_DISTANCE, close_pairs, near_duplicate_groups


def flip(value: int, bits: list[int]) -> int:
    for bit in bits:
        value ^= 1 << bit
    return value


def random_hashes(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2**64 - 1, count, dtype=np.uint64, endpoint=True)


def test_close_pairs_equal_a_brute_force_search():
    rng = np.random.default_rng(1)
    hashes = [int(h) for h in random_hashes(400, 0)]
    # Near copies at every distance up to MAX_DISTANCE + 2, the flipped bits anywhere.
    for i in range(200):
        hashes.append(flip(hashes[i], rng.choice(64, i % (MAX_DISTANCE + 3), replace=False).tolist()))
    distinct = np.unique(np.array(hashes, dtype=np.uint64))
    first, second = close_pairs(distinct)
    found = {(min(a, b), max(a, b)) for a, b in zip(first.tolist(), second.tolist())}
    brute = {
        (i, j) for i, j in itertools.combinations(range(len(distinct)), 2)
        if bin(int(distinct[i]) ^ int(distinct[j])).count("1") <= MAX_DISTANCE
    }
    assert found == brute and len(brute) > 100


def test_groups_join_chains_and_number_the_largest_first():
    base, other = 0x0123456789ABCDEF, 0xFEDCBA9876543210
    hashes = np.array(
        [
            base,
            flip(base, [0, 20, 40, 60]),  # 4 bits from base: joined
            flip(base, [0, 20, 40, 60, 63]),  # 1 bit from the previous one, 5 from base: joined through it
            other,
            other,  # the same hash twice: a group of exact copies
            flip(other, [1, 2, 3, 4, 5]),  # 5 bits away: alone
        ],
        dtype=np.uint64,
    )
    groups = near_duplicate_groups(hashes)
    assert groups.tolist() == [0, 0, 0, 1, 1, -1]


def test_no_groups_among_distinct_hashes():
    groups = near_duplicate_groups(random_hashes(5000, 2))
    assert (groups == -1).all()
    assert near_duplicate_groups(np.zeros(0, np.uint64)).tolist() == []

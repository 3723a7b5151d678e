"""Prompt lookup by an index grown with the row: the same proposals as searching the whole row
every step (the reference below), over rows that grow token by token and in bursts."""

import numpy as np
import pytest

from spd_cluster.engine.proposers import NgramIndex, PromptLookupProposer


def search(seq: np.ndarray, max_n: int, k: int) -> np.ndarray:
    """The longest suffix n-gram's latest earlier occurrence, by scanning every window."""
    if k <= 0 or len(seq) < 2:
        return np.zeros(0, np.int64)
    for n in range(min(max_n, len(seq) - 1), 0, -1):
        suffix = seq[len(seq) - n:]
        starts = [s for s in range(len(seq) - n) if (seq[s:s + n] == suffix).all()]
        if starts:
            return seq[starts[-1] + n: starts[-1] + n + k]
    return np.zeros(0, np.int64)


@pytest.mark.parametrize("max_n", [1, 2, 3, 5])
@pytest.mark.parametrize("vocab", [3, 8, 50])
def test_index_finds_what_a_full_search_finds(max_n, vocab):
    rng = np.random.default_rng(max_n * 100 + vocab)
    for _ in range(20):
        seq = rng.integers(0, vocab, 120)
        index = NgramIndex(max_n)
        n = int(rng.integers(1, 10))
        while n <= len(seq):
            k = int(rng.integers(0, 7))
            np.testing.assert_array_equal(index.find(seq[:n], k), search(seq[:n], max_n, k))
            n += int(rng.integers(1, 5))  # rows grow by 1..k+1 tokens a step


def test_a_slot_starts_afresh_and_a_shorter_row_is_reindexed():
    p = PromptLookupProposer(max_ngram_size=2)
    a = np.array([1, 2, 3, 1, 2])
    p.start(0, a)
    assert p.propose([0], [a], [3]).tokens[0].tolist() == [3, 1, 2]
    b = np.array([7, 8, 7])
    p.start(0, b)  # a new prompt in slot 0: nothing of a's index is left
    assert p.propose([0], [b], [3]).tokens[0].tolist() == [8, 7]
    index = NgramIndex(2)
    index.find(a, 3)
    np.testing.assert_array_equal(index.find(b, 3), search(b, 2, 3))

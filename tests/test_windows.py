"""Stage one's unit of work: windows dealt to ranks, and the pair budget that makes any number of
processes, and any interruption, store what one uninterrupted process stores."""

import itertools

import numpy as np
import pytest

from pipeline.corpus import Document
from pipeline.windows import PairLedger, read_windows, window_rounds


def test_rounds_deal_the_windows_not_yet_completed_in_order():
    rounds = window_rounds({0, 1, 3, 7}, 3)
    assert [next(rounds) for _ in range(3)] == [[2, 4, 5], [6, 8, 9], [10, 11, 12]]


def sequential(counts: list[int], n_tokens: int) -> dict[int, int]:
    """What one uninterrupted process stores per window: everything until --n-tokens, cut there."""
    stored, total = {}, 0
    for window, count in enumerate(counts):
        if total >= n_tokens:
            break
        stored[window] = min(count, n_tokens - total)
        total += stored[window]
    return stored


def run(counts: list[int], n_tokens: int, world_size: int, stored: dict[int, int], stop_after_rounds: int | None = None) -> dict[int, int]:
    """The cache's round loop over windows with known pair counts (an empty window past the corpus end)."""
    ledger, result = PairLedger(stored, n_tokens), dict(stored)
    for round_index, windows in enumerate(window_rounds(stored, world_size)):
        if round_index == stop_after_rounds or ledger.budget(windows[0]) == 0:
            break
        window_counts = [counts[w] if w < len(counts) else 0 for w in windows]
        ledger.record(windows, window_counts)
        for window in windows:  # each rank
            if window < len(counts) and ledger.budget(window):
                result[window] = min(counts[window], ledger.budget(window))
        if any(w >= len(counts) for w in windows):
            break
    return result


@pytest.mark.parametrize("seed", range(20))
def test_any_number_of_processes_and_interruptions_store_what_one_process_stores(seed):
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 50, size=int(rng.integers(1, 40))).tolist()
    n_tokens = int(rng.integers(1, sum(counts) + 60))
    expected = sequential(counts, n_tokens)
    for world_size in (1, 2, 3, 5):
        assert run(counts, n_tokens, world_size, {}) == expected
        # A first job dies after a few rounds, keeping a random subset of what its ranks finished
        # (each rank loses its unwritten windows); a restart with another number of processes completes it.
        partial = run(counts, n_tokens, world_size, {}, stop_after_rounds=int(rng.integers(0, 5)))
        kept = {w: p for w, p in partial.items() if rng.random() < 0.6}
        assert run(counts, n_tokens, int(rng.integers(1, 5)), kept) == expected


def test_a_longer_run_extends_after_the_window_the_shorter_one_cut():
    counts = [10, 10, 10, 10]
    first = run(counts, 15, 2, {})
    assert first == {0: 10, 1: 5}
    assert run(counts, 35, 2, first) == {0: 10, 1: 5, 2: 10, 3: 10}  # window 1 stays as cut


def test_windows_are_read_in_order_and_only_wanted_ones_are_tokenized():
    tokenized = []

    def documents(start):
        return (Document(i, None, f"doc {i}") for i in range(start, 23))

    def tokenize(doc):
        tokenized.append(doc.index)
        return np.array([doc.index])

    windows = list(itertools.islice(read_windows(documents, tokenize, 5, iter([1, 3, 4, 6, 9])), 5))
    assert [w.index for w in windows] == [1, 3, 4, 6, 9]
    assert [[d for d, _ in w.docs] for w in windows] == [[5, 6, 7, 8, 9], [15, 16, 17, 18, 19], [20, 21, 22], [], []]
    assert tokenized == [5, 6, 7, 8, 9, 15, 16, 17, 18, 19, 20, 21, 22]


@pytest.mark.parametrize("seed", range(20))
def test_a_smaller_n_tokens_after_an_interruption_redoes_the_lost_windows_whole(seed):
    """A killed run may have committed a window after one it lost; a rerun asking for fewer pairs must not cut the lost
    one (the killed run would have kept it whole), nor stop before it and leave a hole the store never fills."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 50, size=int(rng.integers(4, 40))).tolist()
    n_tokens = int(rng.integers(1, sum(counts) + 60))
    expected = sequential(counts, n_tokens)
    partial = run(counts, n_tokens, 3, {}, stop_after_rounds=int(rng.integers(1, 5)))
    kept = {w: p for w, p in partial.items() if rng.random() < 0.6}
    smaller = run(counts, int(rng.integers(1, n_tokens + 1)), int(rng.integers(1, 4)), kept)
    assert set(smaller) == set(range(len(smaller)))  # no hole
    last_kept = max(kept, default=-1)
    assert all(smaller[w] == expected[w] for w in range(last_kept + 1))
    if max(smaller) <= last_kept:  # the smaller run cut no window of its own
        assert run(counts, n_tokens, 2, smaller) == expected


def test_a_smaller_n_tokens_fills_a_lost_window_whole_then_stops():
    counts = [10] * 6
    assert run(counts, 15, 1, {0: 10, 2: 10, 3: 10}) == {0: 10, 1: 10, 2: 10, 3: 10}

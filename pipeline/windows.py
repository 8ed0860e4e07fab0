"""The corpus cut into packing windows, the unit of work, resumption and rank assignment of stage one.

Window w holds documents [w * size, (w + 1) * size) of the corpus stream. A run (of any number of
processes) takes the windows the store has not completed, in corpus order, dealt round-robin to
ranks; the pairs a window may store are what remains of --n-tokens after every earlier window,
so the store ends up with the same pairs however many processes wrote it and however often it
was interrupted.
"""

import bisect
import itertools
import sys
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np

from pipeline.corpus import CorpusConfig, Document, iter_documents, tokenize_document
from pipeline.positions import SkippedPositions


@dataclass
class Window:
    index: int
    docs: list[tuple[int, np.ndarray]]  # (document index, token ids) in corpus order; empty past the corpus end


def window_rounds(completed: Iterable[int], world_size: int) -> Iterator[list[int]]:
    """Lists of `world_size` window indices, ascending: the windows not yet completed, dealt to ranks 0..N-1."""
    done = set(completed)
    remaining = (w for w in itertools.count() if w not in done)
    while True:
        yield list(itertools.islice(remaining, world_size))


def read_windows(
    documents: Callable[[int], Iterator[Document]],
    tokenize: Callable[[Document], np.ndarray],
    size: int,
    wanted: Iterator[int],
) -> Iterator[Window]:
    """The windows listed by `wanted` (ascending), tokenized; the documents of other windows are read
    but never tokenized. `documents(start)` streams the corpus from document index `start`."""
    wanted = iter(wanted)
    first = next(wanted)
    stream = documents(first * size)
    pending = next(stream, None)
    for index in itertools.chain([first], wanted):
        while pending is not None and pending.index < index * size:
            pending = next(stream, None)
        docs = []
        while pending is not None and pending.index < (index + 1) * size:
            docs.append((pending.index, tokenize(pending)))
            pending = next(stream, None)
        yield Window(index, docs)


@dataclass(frozen=True)
class WindowRecipe:
    """What planned_windows needs, sent to the process that runs it."""

    corpus: CorpusConfig
    tokenizer: object  # a transformers tokenizer
    max_seq_len: int
    pack_window: int
    layers: list[int]
    per_token: int
    skipped: SkippedPositions
    completed: frozenset[int]  # windows the store holds
    rank: int
    world_size: int


def planned_windows(recipe: WindowRecipe) -> Iterator[tuple[Window, list[tuple[np.ndarray, np.ndarray]]]]:
    """This rank's windows not yet stored, each read, tokenized, and with each document's pairs chosen (choose_pairs)."""
    windows = read_windows(
        lambda start: iter_documents(recipe.corpus, start=start),
        lambda doc: np.asarray(tokenize_document(doc, recipe.tokenizer, recipe.max_seq_len), dtype=np.int32),
        recipe.pack_window,
        (windows[recipe.rank] for windows in window_rounds(recipe.completed, recipe.world_size)),
    )
    for window in windows:
        yield window, [choose_pairs(doc, recipe.layers, recipe.per_token, recipe.skipped.mask(tokens), recipe.corpus.seed)
                       for doc, tokens in window.docs]


def choose_pairs(doc_index: int, layers: list[int], per_token: int, skip: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(positions, layers) recorded for one document, ordered by position then layer.

    The layer draw depends only on (seed, document), not on batching, so resumed runs match.
    `skip` marks positions never recorded (pipeline/positions.py).
    """
    rng = np.random.default_rng([seed, doc_index])
    positions = np.flatnonzero(~skip)
    if per_token == 1:
        choice = rng.integers(0, len(layers), size=(len(positions), 1))
    else:
        choice = np.argsort(rng.random((len(positions), len(layers))), axis=1)[:, :per_token]
    chosen = np.sort(np.asarray(layers)[choice], axis=1)
    return np.repeat(positions, per_token), chosen.reshape(-1)


class PairLedger:
    """Pairs stored before each window: the store's completed windows plus those this run has counted,
    and from that each window's share of the --n-tokens budget."""

    def __init__(self, stored: dict[int, int], n_tokens: int):
        self.n_tokens = n_tokens
        # a window before one that stored pairs was whole under the budget of the run that stored those: one lost
        # when that run was killed is redone whole, whatever this run's --n-tokens, so the store stays a prefix
        self.whole_before = max((window for window, pairs in stored.items() if pairs), default=-1)
        self.stored_windows = sorted(stored)
        self.stored_prefix = [0, *itertools.accumulate(stored[w] for w in self.stored_windows)]
        self.new_windows: list[int] = []
        self.new_prefix = [0]

    def pairs_before(self, window: int) -> int:
        return (self.stored_prefix[bisect.bisect_left(self.stored_windows, window)]
                + self.new_prefix[bisect.bisect_left(self.new_windows, window)])

    def budget(self, window: int) -> int:
        """Pairs the window may store; 0 once the windows before it hold --n-tokens."""
        if window < self.whole_before:
            return sys.maxsize
        return max(self.n_tokens - self.pairs_before(window), 0)

    def record(self, windows: list[int], counts: list[int]) -> None:
        """Enters a round's windows (ascending, after every window entered so far) with the pairs each
        would store uncut; each stores what its budget allows."""
        for window, count in zip(windows, counts):
            self.new_prefix.append(self.new_prefix[-1] + min(count, self.budget(window)))
            self.new_windows.append(window)

    @property
    def n_new(self) -> int:
        return self.new_prefix[-1]

    @property
    def total(self) -> int:
        return self.stored_prefix[-1] + self.new_prefix[-1]

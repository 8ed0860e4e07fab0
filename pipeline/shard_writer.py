"""A background thread that groups recorded batches into shards, and threads that gather, compress and write them.

The model keeps running while earlier batches are copied, compressed and written; the bounded
queue stops the producer from running ahead of the disk. Shards end where a packing window ends,
so a resumed run, which redoes the windows no shard completed, forms exactly the batches that an
uninterrupted run would have. Two shards are written at once, so that one's compression overlaps the
other's writing and flushing; each commits when it is whole, in whatever order, as the shards of several
processes do.
"""

import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.chunk_file import GatheredRows
from pipeline.store import SPLITS, ShardData, SplitRows, Store, storage_bits

FLUSH, DISCARD = object(), object()  # how close() ends the writer thread
SHARDS_AT_ONCE = 2  # shards being written at a time, each holding its rows in memory


@dataclass
class RecordedBatch:
    """What one forward pass recorded, on the host (or on its way there)."""

    acts: torch.Tensor  # [rows, d_model] storage dtype, maybe still being copied from the device
    layer: np.ndarray  # [rows]
    token: np.ndarray  # [rows]
    doc: np.ndarray  # [rows]
    pos: np.ndarray  # [rows]
    split: np.ndarray  # [rows] 0 train, 1 val
    doc_index: np.ndarray  # [n_docs]
    doc_split: np.ndarray  # [n_docs]
    doc_tokens: list[np.ndarray]  # token ids per document
    # the training rows' count [n_layers], sum [n_layers, d_model] and sum of squared norms [n_layers] (store.layer_sums),
    # summed where the rows were made: on a GPU, that leaves the writer thread only compression and writing
    stats: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    copied: torch.cuda.Event | None = None
    window: int = -1  # the packing window the batch belongs to
    ends_window: bool = False  # the window's last batch: a shard may end after it


@dataclass
class _Pending:
    batches: list[RecordedBatch] = field(default_factory=list)
    train_rows: int = 0


class ShardWriter:
    """Accepts RecordedBatch objects; writes a shard at the end of the first packing window that brings the pending
    training rows to `shard_rows`."""

    def __init__(self, store: Store, shard_rows: int, queue_size: int = 4):
        self.store, self.shard_rows = store, shard_rows
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.error: BaseException | None = None
        self.closing = False
        self.writes = ThreadPoolExecutor(SHARDS_AT_ONCE, thread_name_prefix="shard-write")
        self.free_writers = threading.Semaphore(SHARDS_AT_ONCE)  # a shard waits for a free writer: memory stays bounded
        self.thread = threading.Thread(target=self._run, name="shard-writer", daemon=True)
        self.thread.start()

    def submit(self, batch: RecordedBatch) -> None:
        self._raise_if_failed()
        self.queue.put(batch)

    def close(self, flush: bool = True) -> None:
        """Waits for the writes to finish; with flush, the pending batches become a last shard.

        An interrupted run closes without flush: its pending batches may end inside a packing
        window, which the rerun then redoes whole. Closing again waits for the same end.
        """
        if not self.closing:
            self.closing = True
            self.queue.put(FLUSH if flush else DISCARD)
        self.thread.join()
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        pending, batch = _Pending(), None
        try:
            while (batch := self.queue.get()) not in (FLUSH, DISCARD):
                if batch.copied is not None:
                    batch.copied.synchronize()
                pending.batches.append(batch)
                pending.train_rows += int((batch.split == 0).sum())
                if pending.train_rows >= self.shard_rows and batch.ends_window:
                    self._write(pending.batches)
                    pending = _Pending()
            if batch is FLUSH and pending.batches:
                self._write(pending.batches)
        except BaseException as error:  # handed to the producer thread, which raises it
            self.error = error
            while batch not in (FLUSH, DISCARD):  # the producer's close() ends with one; the last shard's write came after it
                batch = self.queue.get()
        finally:
            self.writes.shutdown()  # waits for the writes in flight: an interrupted run keeps whole shards only

    def _write(self, batches: list[RecordedBatch]) -> None:
        """Hands a shard's batches to a writer thread once one is free; raises an earlier write's error instead."""
        self.free_writers.acquire()
        self._raise_if_failed()
        write = self.writes.submit(lambda: self.store.write_shard(self._assemble(batches)))
        write.add_done_callback(self._written)

    def _written(self, write: Future) -> None:
        if write.exception() is not None and self.error is None:  # the producer raises it at its next batch
            self.error = write.exception()
        self.free_writers.release()

    def _assemble(self, batches: list[RecordedBatch]) -> ShardData:
        columns = {name: np.concatenate([getattr(b, name) for b in batches]) for name in ("layer", "token", "doc", "pos", "split")}
        splits = {}
        for split_id, split in enumerate(SPLITS):
            mask = columns["split"] == split_id
            splits[split] = SplitRows(acts=_gathered(batches, split_id),
                                      **{name: columns[name][mask] for name in ("layer", "token", "doc", "pos")})
        doc_tokens = [tokens for b in batches for tokens in b.doc_tokens]
        windows = list(dict.fromkeys(b.window for b in batches))
        count, total, sq = (sum(b.stats[i] for b in batches).numpy() for i in range(3))
        return ShardData(
            splits=splits,
            doc_index=np.concatenate([b.doc_index for b in batches]),
            doc_split=np.concatenate([b.doc_split for b in batches]),
            doc_offsets=np.concatenate([[0], np.cumsum([len(t) for t in doc_tokens])]),
            doc_tokens=np.concatenate(doc_tokens) if doc_tokens else np.zeros(0, np.int32),
            stats_count=count,
            stats_sum=total,
            stats_sum_sq_norm=sq,
            windows=windows,
            window_pairs=[sum(len(b.layer) for b in batches if b.window == w) for w in windows],
        )


def _gathered(batches: list[RecordedBatch], split_id: int) -> GatheredRows:
    """The stored bits of the batches' rows of one split, to be gathered chunk by chunk."""
    pieces = []
    for batch in batches:
        kept = batch.split == split_id
        if kept.any():
            pieces.append((storage_bits(batch.acts), None if kept.all() else np.flatnonzero(kept)))
    if not pieces:
        return GatheredRows([(storage_bits(batches[0].acts)[:0], None)])
    return GatheredRows(pieces)

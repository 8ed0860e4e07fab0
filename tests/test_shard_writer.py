"""ShardWriter: each window's pairs counted over both splits, layer statistics of training rows only, two shards
written at once, and a failed write raised, not lost."""

import threading
import time

import numpy as np
import pytest
import torch
from test_store import METADATA

from pipeline.shard_writer import RecordedBatch, ShardWriter
from pipeline.store import Store, create_or_open, layer_sum_tensors


def batch(window, n, split, ends=True, seed=0):
    """A recorded batch of n rows of one window, split by split (0 train, 1 val)."""
    rng = np.random.default_rng(seed)
    acts = torch.from_numpy(rng.normal(size=(n, 16)).astype(np.float32)).bfloat16()
    layer, split = rng.integers(0, 3, n), np.broadcast_to(split, n)
    stats = layer_sum_tensors(acts, torch.from_numpy(layer), 3, torch.from_numpy(split == 0))
    return RecordedBatch(acts, layer, np.zeros(n), np.full(n, window), np.arange(n), split, np.array([window]),
                         np.array([int(split.max())]), [np.arange(n)], stats, None, window, ends)


def test_writer_counts_both_splits_and_stats_only_training_rows(tmp_path):
    store = create_or_open(tmp_path / "w", METADATA)
    writer = ShardWriter(store, shard_rows=1000)
    split = np.array([0] * 30 + [1] * 10)
    writer.submit(batch(0, 40, split))
    writer.close()
    store = Store(tmp_path / "w")
    assert store.window_pairs() == {0: 40} and store.n_rows("train") == 30 and store.n_rows("val") == 10
    count, total, _ = store.layer_stats_sums()
    assert count.sum() == 30
    train = store.read_acts(store.shards[0], "train").double()
    np.testing.assert_allclose(total.sum(0), train.sum(0).numpy())


@pytest.mark.parametrize("shard_rows", [1, 1000])  # the write fails while batches arrive, or as the last shard on close
def test_a_failed_write_is_raised_by_close(tmp_path, monkeypatch, shard_rows):
    store = create_or_open(tmp_path / "w", METADATA)
    monkeypatch.setattr(Store, "write_shard", lambda self, shard: (_ for _ in ()).throw(OSError("disk full")))
    writer = ShardWriter(store, shard_rows=shard_rows)
    writer.submit(batch(0, 5, np.zeros(5, int)))
    assert close_in_a_thread(writer) == ["disk full"]


def close_in_a_thread(writer: ShardWriter) -> list[str]:
    """The OSErrors close() raised; run in a thread, so that a hang fails the test instead of stalling it."""
    errors = []

    def close():
        try:
            writer.close()
        except OSError as error:
            errors.append(str(error))

    thread = threading.Thread(target=close, daemon=True)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive(), "close() hangs after a failed write"
    return errors


def test_two_shards_are_written_at_once_and_both_commit(tmp_path, monkeypatch):
    store = create_or_open(tmp_path / "w", METADATA)
    both, write = threading.Barrier(2, timeout=20), Store.write_shard

    def meeting(self, shard):
        both.wait()  # broken, and the write failed, unless the other shard's write runs meanwhile
        return write(self, shard)

    monkeypatch.setattr(Store, "write_shard", meeting)
    writer = ShardWriter(store, shard_rows=30)
    batches = [batch(window, 40, np.array([0] * 35 + [1] * 5), seed=window) for window in (0, 1)]
    for recorded in batches:
        writer.submit(recorded)
    writer.close()
    store = Store(tmp_path / "w")
    assert store.window_pairs() == {0: 40, 1: 40}
    for shard, recorded in zip(store.shards, batches):
        assert torch.equal(store.read_acts(shard, "train"), recorded.acts[:35])
        assert torch.equal(store.read_acts(shard, "val"), recorded.acts[35:])


def test_a_failed_write_stops_the_next_batch_without_waiting_for_another_shard(tmp_path, monkeypatch):
    store = create_or_open(tmp_path / "w", METADATA)
    monkeypatch.setattr(Store, "write_shard", lambda self, shard: (_ for _ in ()).throw(OSError("disk full")))
    writer = ShardWriter(store, shard_rows=5)
    writer.submit(batch(0, 5, np.zeros(5, int)))  # a whole shard, whose write fails
    deadline = time.monotonic() + 30
    while writer.error is None and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(OSError, match="disk full"):
        writer.submit(batch(1, 2, np.zeros(2, int), ends=False))  # not a shard's end: no write of its own to fail
    assert close_in_a_thread(writer) == ["disk full"]

"""ShardWriter: each window's pairs counted over both splits, layer statistics of training rows only, and a
failed write raised, not lost."""

import numpy as np
import pytest
import torch
from test_store import METADATA

from pipeline.shard_writer import RecordedBatch, ShardWriter
from pipeline.store import Store, create_or_open


def batch(window, n, split, ends=True, seed=0):
    """A recorded batch of n rows of one window, split by split (0 train, 1 val)."""
    rng = np.random.default_rng(seed)
    acts = torch.from_numpy(rng.normal(size=(n, 16)).astype(np.float32)).bfloat16()
    return RecordedBatch(acts, rng.integers(0, 3, n), np.zeros(n), np.full(n, window), np.arange(n), np.asarray(split),
                         np.array([window]), np.array([int(np.asarray(split).max())]), [np.arange(n)], None, window, ends)


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


def test_a_failed_write_is_raised_by_close(tmp_path, monkeypatch):
    store = create_or_open(tmp_path / "w", METADATA)
    monkeypatch.setattr(Store, "write_shard", lambda self, shard: (_ for _ in ()).throw(OSError("disk full")))
    writer = ShardWriter(store, shard_rows=1)
    writer.submit(batch(0, 5, np.zeros(5, int)))
    with pytest.raises(OSError, match="disk full"):
        writer.close()

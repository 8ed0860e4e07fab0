"""The shard loader: every row once per epoch, shards mixed in a batch, deterministic, resumable."""

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_store import write_store as write_random_store

from pipeline import loader as loader_module
from pipeline.errors import CrosscodersError
from pipeline.loader import MemoryLoader, ShardLoader, reader_threads
from pipeline.store import ShardData, SplitRows, Store, create_or_open, layer_sums, to_storage

D_MODEL, N_STATES = 8, 4


def write_store(path, shard_sizes: list[int], val_per_shard: int = 50) -> Store:
    """Rows whose first feature is their global id, so a batch says which rows it holds."""
    store = create_or_open(path, {"model": {"name": "m", "fingerprint": "f", "d_model": D_MODEL, "n_hidden_states": N_STATES}, "dtype": "float32", "layers": list(range(N_STATES))})
    next_id = 0
    for index, rows in enumerate(shard_sizes):
        def split_rows(n: int, first_id: int) -> SplitRows:
            acts = torch.zeros(n, D_MODEL)
            acts[:, 0] = torch.arange(first_id, first_id + n)
            acts[:, 1] = index
            return SplitRows(to_storage(acts, "float32"), np.arange(first_id, first_id + n) % N_STATES,
                             np.zeros(n), np.full(n, index), np.arange(n))

        train, val = split_rows(rows, next_id), split_rows(val_per_shard, 10**6 + next_id)
        next_id += rows
        sums = layer_sums(torch.from_numpy(train.acts), torch.from_numpy(train.layer), N_STATES)
        store.write_shard(ShardData({"train": train, "val": val}, np.array([index]), np.array([0]), np.array([0, 1]),
                                    np.array([7]), *sums, [index], [rows + val_per_shard]))
    return Store(path)


@pytest.fixture
def store(tmp_path) -> Store:
    return write_store(tmp_path / "s", [3000, 2500, 4100, 700])


def ids(batches) -> list[np.ndarray]:
    return [x[:, 0].long().numpy() for x, _ in batches]


def test_every_training_row_once_per_epoch_in_a_new_order(store):
    loader = ShardLoader(store, batch_size=512, seed=1, window_chunks=3)
    epochs = [np.concatenate(ids(loader.train_batches(epoch))) for epoch in (0, 1)]
    for seen in epochs:
        assert np.array_equal(np.sort(seen), np.arange(10300))
    assert not np.array_equal(epochs[0], epochs[1])
    assert loader.n_train_batches() == len(ids(loader.train_batches(0))) == 21


@pytest.mark.parametrize("workers", [1, 2])
def test_few_reader_threads_still_read_every_window(store, workers):
    batches = []
    reader = threading.Thread(target=lambda: batches.extend(ShardLoader(store, 512, window_chunks=2, workers=workers).train_batches(0)),
                              daemon=True)
    reader.start()
    reader.join(timeout=60)
    assert not reader.is_alive(), "the loader hung"
    assert np.array_equal(np.sort(np.concatenate(ids(batches))), np.arange(10300))


def test_layers_travel_with_their_rows(store):
    for x, layer in ShardLoader(store, batch_size=700, window_chunks=2).train_batches(0):
        assert torch.equal(layer, x[:, 0].long() % N_STATES)


def test_a_batch_mixes_rows_of_different_shards(store):
    loader = ShardLoader(store, batch_size=1024, seed=0, window_chunks=4)
    shards_per_batch = [len(torch.unique(x[:, 1])) for x, _ in loader.train_batches(0)]
    assert np.mean(shards_per_batch) > 2


def test_same_seed_same_order_and_other_seed_other_order(store):
    first = np.concatenate(ids(ShardLoader(store, 256, seed=3).train_batches(0)))
    assert np.array_equal(first, np.concatenate(ids(ShardLoader(store, 256, seed=3).train_batches(0))))
    assert not np.array_equal(first, np.concatenate(ids(ShardLoader(store, 256, seed=4).train_batches(0))))


@pytest.mark.parametrize("start_batch", [1, 5, 13, 20])
def test_resuming_mid_epoch_yields_the_remaining_batches_exactly(store, start_batch):
    loader = ShardLoader(store, batch_size=500, seed=2, window_chunks=3)
    full = ids(loader.train_batches(1))
    resumed = ids(loader.train_batches(1, start_batch=start_batch))
    assert len(resumed) == len(full) - start_batch
    for a, b in zip(full[start_batch:], resumed):
        assert np.array_equal(a, b)


def test_validation_rows_come_from_the_held_out_split(store):
    loader = ShardLoader(store, batch_size=64, val_rows=120)
    val = np.concatenate(ids(loader.val_batches()))
    assert len(val) == 120 and (val >= 10**6).all()


def test_statistics_are_the_exact_per_layer_moments(store):
    loader = ShardLoader(store, batch_size=64)
    rows = torch.cat([x for x, _ in loader.train_batches(0)])
    layers = torch.cat([layer for _, layer in loader.train_batches(0)])
    for layer in range(N_STATES):
        mine = rows[layers == layer].double()
        torch.testing.assert_close(loader.stats.mean[layer], mine.double().mean(0))
        torch.testing.assert_close(loader.stats.mean_sq_norm[layer], mine.double().pow(2).sum(1).mean())


@pytest.mark.parametrize("layers", [[1], [0, 3]])
def test_a_layer_filter_yields_those_layers_rows_once_per_epoch_and_only_theirs_held_out(store, layers):
    loader = ShardLoader(store, batch_size=300, seed=5, window_chunks=2, val_rows=70, layers=layers)
    wanted = np.flatnonzero(np.isin(np.arange(10300) % N_STATES, layers))
    batches = ids(loader.train_batches(0))
    assert np.array_equal(np.sort(np.concatenate(batches)), wanted)
    assert [len(b) for b in batches[:-1]] == [300] * (len(batches) - 1) and len(batches) == loader.n_train_batches() == -(-len(wanted) // 300)
    for x, layer in loader.train_batches(1, start_batch=2):
        assert torch.equal(layer, x[:, 0].long() % N_STATES)
    assert all(np.array_equal(a, b) for a, b in zip(batches[3:], ids(loader.train_batches(0, start_batch=3)), strict=True))
    val_ids = [np.arange(10**6 + first, 10**6 + first + 50) for first in (0, 3000, 5500, 9600)]  # by shard, in store order
    kept = [ids[np.isin(ids % N_STATES, layers)] for ids in val_ids]
    if layers == [0, 3]:  # 36 and 34 of their 52 and 48 rows: shards 0 and 2 (spread_order) give 26 and 24, shard 1 the rest
        of_layer = [kept[1][kept[1] % N_STATES == layer] for layer in layers]
        kept[1], kept[3] = np.sort(np.concatenate([of_layer[0][:10], of_layer[1][:10]])), kept[3][:0]
    val = torch.cat([x for x, _ in loader.val_batches()])
    assert val[:, 0].long().tolist() == np.concatenate(kept).tolist()
    assert torch.equal(torch.cat([layer for _, layer in loader.val_batches()]), val[:, 0].long() % N_STATES)


def test_a_layer_filter_of_every_stored_layer_reads_as_none(store):
    loader = ShardLoader(store, 300, seed=5, layers=[3, 2, 1, 0])
    assert loader.layers is None and all(chunk.kept is None for chunk in loader.chunks)  # no layer ids read ahead
    assert all(np.array_equal(a, b) for a, b in zip(ids(loader.train_batches(0)), ids(ShardLoader(store, 300, seed=5).train_batches(0)), strict=True))
    picked = store.rows_of_layers("val", 120, [0, 1, 2, 3])
    assert [len(rows) for rows, _ in picked] == [50, 20, 50, 0]  # shards taken in spread_order: 0, 2, 1, 3
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(picked, store.rows_of_layers("val", 120)))


def test_a_layer_filter_that_keeps_no_row_is_a_clear_error(store):
    with pytest.raises(CrosscodersError, match=r"holds no training rows of hidden states \[7\]; pick others with --layers"):
        ShardLoader(store, 64, layers=[7])


def test_memory_loader_sees_every_row_once_in_an_order_of_its_seed_and_epoch(store):
    acts = torch.arange(1000.0)[:, None].repeat(1, D_MODEL)

    def order(seed: int, epoch: int) -> np.ndarray:
        loader = MemoryLoader(acts, torch.zeros(1000, dtype=torch.long), N_STATES, 300, seed=seed)
        return np.concatenate(ids(loader.train_batches(epoch)))

    seen = order(0, 0)
    assert np.array_equal(np.sort(seen), np.arange(1000)) and np.array_equal(seen, order(0, 0))
    assert (seen != np.arange(1000)).mean() > 0.9  # shuffled
    assert (seen != order(0, 1)).mean() > 0.9 and (seen != order(1, 0)).mean() > 0.9


def test_windows_of_the_same_size_are_shuffled_differently(tmp_path):
    loader = ShardLoader(write_store(tmp_path / "s", [2048, 2048]), batch_size=1024, window_chunks=1)
    local_orders = [batch % 1024 for batch in ids(loader.train_batches(0))]  # one window of one chunk per batch
    assert len(local_orders) == 4 and all(np.array_equal(np.sort(order), np.arange(1024)) for order in local_orders)
    assert all((a != b).mean() > 0.9 for i, a in enumerate(local_orders) for b in local_orders[i + 1:])


def test_an_empty_store_is_a_clear_error(tmp_path):
    empty = create_or_open(tmp_path / "e", {"model": {"name": "m", "fingerprint": "f", "d_model": D_MODEL, "n_hidden_states": N_STATES}, "dtype": "float32", "layers": list(range(N_STATES))})
    with pytest.raises(CrosscodersError, match="holds no complete shard yet; run cache-acts"):
        ShardLoader(empty, 64)


def test_a_damaged_chunk_stops_the_epoch_with_a_clear_error(store):
    data = next(p for p in (Path(store.url) / "shard-00000002" / "train" / "acts").rglob("*") if p.is_file() and p.name != "zarr.json")
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(CrosscodersError, match="shard-00000002/train/acts is damaged"):
        list(ShardLoader(store, 512).train_batches(0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batches_sent_ahead_to_a_gpu_equal_the_cpu_batches(store):
    """On CUDA each batch is copied on a side stream while the previous one is used; reading it on the compute
    stream must wait for its copy."""
    on_cpu, on_gpu = ShardLoader(store, 32, seed=3), ShardLoader(store, 32, seed=3, device="cuda")
    for cpu_batches, gpu_batches in [(on_cpu.train_batches(1), on_gpu.train_batches(1)),
                                     (on_cpu.val_batches(), on_gpu.val_batches())]:
        pairs = list(zip(cpu_batches, gpu_batches, strict=True))
        assert pairs
        for (x, layer), (x_gpu, layer_gpu) in pairs:
            assert x_gpu.is_cuda and x_gpu.dtype == torch.float32
            assert torch.equal(x, x_gpu.cpu()) and torch.equal(layer, layer_gpu.cpu())


def test_row_order_within_a_window_changes_per_epoch(tmp_path):
    loader = ShardLoader(write_store(tmp_path / "s", [1000]), 100)   # one chunk: only the row shuffle can change
    assert not np.array_equal(np.concatenate(ids(loader.train_batches(0))), np.concatenate(ids(loader.train_batches(1))))


def test_chunk_order_changes_per_epoch(tmp_path):
    loader = ShardLoader(write_store(tmp_path / "s", [1024] * 6), 1024, window_chunks=1)  # a batch == a chunk
    chunk_seq = [[int(b[0]) // 1024 for b in ids(loader.train_batches(e))] for e in (0, 1, 2)]
    assert len({tuple(c) for c in chunk_seq}) > 1


def test_val_layers_travel_with_val_rows(tmp_path):
    store = write_random_store(tmp_path / "s")  # random, independent train and val layers
    loader = ShardLoader(store, 4, val_rows=4)
    got = torch.cat([layer for _, layer in loader.val_batches()])
    assert got.tolist() == np.concatenate([store.read(s, "val/layer") for s in store.shards]).tolist()


def test_bf16_store_batches_are_float32_values(tmp_path):
    store = write_random_store(tmp_path / "b")  # bf16
    loader = ShardLoader(store, 64, val_rows=4)
    train = torch.cat([x for x, _ in loader.train_batches(0)])
    assert train.dtype == torch.float32
    expected = torch.cat([store.read_acts(s, "train").float() for s in store.shards])
    assert sorted(map(tuple, train.tolist())) == sorted(map(tuple, expected.tolist()))
    val = torch.cat([x for x, _ in loader.val_batches()])
    assert val.dtype == torch.float32 and torch.equal(val, torch.cat([store.read_acts(s, "val").float() for s in store.shards]))


def test_an_epoch_left_early_leaves_no_window_read_running(store):
    """A run's last epoch, or a benchmark's loop, ends before its windows do: the reads sent ahead must not go on
    competing for the CPU with what comes next."""
    loader = ShardLoader(store, 300, seed=5, window_chunks=1)
    spans, read = [], loader._read_window

    def slow_read(*args):
        start = time.perf_counter()
        time.sleep(0.05)
        result = read(*args)
        spans.append((start, time.perf_counter()))
        return result

    loader._read_window = slow_read
    batches = loader.train_batches(0)
    next(batches)
    batches.close()
    closed = time.perf_counter()
    time.sleep(0.3)
    assert len(spans) < len(loader._windows(0)) and all(end <= closed for _, end in spans)


@pytest.mark.parametrize("cpus, threads", [(1, 4), (2, 4), (6, 6), (16, 8), (128, 8)])
def test_the_loader_reads_with_one_thread_per_cpu_from_4_to_8_unless_told(monkeypatch, cpus, threads):
    monkeypatch.setattr(loader_module, "usable_cpus", lambda: cpus)
    assert reader_threads(None) == threads and reader_threads(3) == 3

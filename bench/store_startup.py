"""What a command pays before its first step, as a store grows: opening it, summing its statistics, setting up the
shuffled loader (all hidden states, and one), picking the held-out rows.

Usage: python -m bench.store_startup --n-shards 250,1000,4000
Each store is one real shard (d_model 16, 25 hidden states, 2,048 training and 128 held-out rows) copied n times,
each copy its own window: the costs measured depend on the number of shards and rows, not on d_model. Prints one
row per store and measure, with the milliseconds each shard adds.
"""

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import typer
from rich.console import Console
from rich.table import Table

from bench.tables import add_row
from pipeline.loader import ShardLoader
from pipeline.store import ShardData, SplitRows, Store, create_or_open, layer_sums, shard_name, to_storage

D_MODEL, N_STATES, TRAIN_ROWS, VAL_ROWS = 16, 25, 2048, 128


def copied_store(path: Path, n_shards: int) -> None:
    """A store of n_shards copies of one shard written through the Store API, each recording its own window."""
    store = create_or_open(path, {"model": {"name": "synthetic", "fingerprint": "synthetic", "d_model": D_MODEL,
                                            "n_hidden_states": N_STATES}, "dtype": "bf16", "layers": list(range(N_STATES))})
    rng = np.random.default_rng(0)

    def split(n: int) -> SplitRows:
        return SplitRows(to_storage(torch.randn(n, D_MODEL), "bf16"), rng.integers(0, N_STATES, n).astype(np.int16),
                         rng.integers(0, 400, n), rng.integers(0, 32, n), rng.integers(1, 60, n))

    train, val = split(TRAIN_ROWS), split(VAL_ROWS)
    sums = layer_sums(torch.from_numpy(train.acts.view(np.int16)).view(torch.bfloat16).float(),
                      torch.from_numpy(train.layer.astype(np.int64)), N_STATES)
    store.write_shard(ShardData({"train": train, "val": val}, np.arange(32), (np.arange(32) % 16 == 0).astype(np.uint8),
                                np.arange(33) * 64, rng.integers(0, 400, 32 * 64).astype(np.int32), *sums, [0],
                                [TRAIN_ROWS + VAL_ROWS]))
    for window in range(1, n_shards):
        copy = shutil.copytree(path / shard_name(0), path / shard_name(window))
        record = json.loads((copy / "zarr.json").read_text())
        record["attributes"]["windows"] = [window]
        (copy / "zarr.json").write_text(json.dumps(record))


def seconds(measure: Callable[[Store], object], store: Store) -> float:
    start = time.perf_counter()
    measure(store)
    return time.perf_counter() - start


def main(n_shards: str = typer.Option("250,1000,4000", help="Store sizes in shards, comma-separated.")):
    counts = [int(n) for n in n_shards.split(",")]
    table = Table(title=f"start-up costs by store size (shards of {TRAIN_ROWS:,} training rows, d_model {D_MODEL})")
    for column in ("shards", "rows", "measure", "seconds", "ms per shard"):
        table.add_column(column, justify="right")
    with tempfile.TemporaryDirectory() as scratch:
        for count in counts:
            path = Path(scratch) / f"s{count}"
            copied_store(path, count)
            measures = {  # each on a store opened afresh, untimed but for the first, as a command opens it
                "open the store": lambda store: Store(path),
                "sum its statistics": lambda store: store.layer_stats_sums(),
                "set up the loader (statistics included)": lambda store: ShardLoader(store, 4096),
                "the same, one hidden state kept": lambda store: ShardLoader(store, 4096, layers=[12]),
                "pick 65,536 held-out rows": lambda store: store.rows_of_layers("val", 65536),
            }
            for name, measure in measures.items():
                taken = seconds(measure, Store(path))
                add_row(table, f"{count:,}", f"{count * TRAIN_ROWS:,}", name, f"{taken:.2f}", f"{taken / count * 1e3:.2f}")
            shutil.rmtree(path)
    Console().print(table)


if __name__ == "__main__":
    typer.run(main)

"""Stage one's writer: how many rows/s its thread gathers into shards, compresses and writes, the ceiling of stage one
whatever the model's speed; and what the per-layer statistics cost where cache-acts computes them, beside the model.

Usage: python -m bench.shard_writer --d-model 1536 --n-rows 256K [--device cuda]
Random bf16 rows at the store's default shard size, 5% of them held out, written to a temporary store on disk.
Compare the writer's rows/s with the forward pass's tokens/s (bench.cache_throughput): one pair per token by default.
"""

import os
import tempfile
import time

import numpy as np
import torch
import typer
from rich.console import Console
from rich.table import Table

from bench.tables import add_row
from pipeline.devices import resolve_device
from pipeline.shard_writer import RecordedBatch, ShardWriter
from pipeline.store import create_or_open, layer_sum_tensors
from pipeline.units import parse_count


def recorded_batches(n_rows: int, batch_rows: int, d_model: int, n_layers: int, device: torch.device):
    """(batch, seconds its statistics took on device) per batch of random rows, grouped by layer as cache-acts
    records them."""
    rng = np.random.default_rng(0)
    warm = torch.zeros(8, d_model, device=device, dtype=torch.bfloat16)  # untimed: cuBLAS's handle and kernels
    layer_sum_tensors(warm, torch.zeros(8, dtype=torch.int64, device=device), n_layers, torch.ones(8, dtype=torch.bool, device=device))
    for window, start in enumerate(range(0, n_rows, batch_rows)):
        n = min(batch_rows, n_rows - start)
        acts = (torch.randn(n, d_model, device=device) * 3).bfloat16()
        layer, split = np.sort(rng.integers(0, n_layers, n)), (rng.random(n) < 0.05).astype(np.uint8)
        layer_on_device, kept = torch.from_numpy(layer).to(device), torch.from_numpy(split == 0).to(device)
        synchronize(device)
        start_time = time.perf_counter()
        stats = layer_sum_tensors(acts, layer_on_device, n_layers, kept)
        synchronize(device)
        seconds = time.perf_counter() - start_time
        batch = RecordedBatch(acts.cpu(), layer, rng.integers(0, 1000, n), np.full(n, window), np.arange(n) % 1000, split,
                              np.array([window]), np.array([0]), [np.arange(1000)], tuple(t.cpu() for t in stats), None,
                              window, True)
        yield batch, seconds


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(
    d_model: int = typer.Option(1536, help="Width of the rows (1536: Qwen2.5-Coder-1.5B)."),
    n_rows: str = typer.Option("256K", help="Rows to write, e.g. 256K."),
    batch_rows: int = typer.Option(16384, help="Rows per recorded batch (cache-acts' default --batch-tokens)."),
    shard_rows: int = typer.Option(65536, help="Training rows per shard (cache-acts' default)."),
    n_layers: int = typer.Option(29, help="Hidden states (29: the 1.5B model)."),
    device: str = typer.Option("cpu", help="Where the statistics are computed, as cache-acts does beside the model."),
):
    torch_device, rows = resolve_device(device), parse_count(n_rows)
    batches = list(recorded_batches(rows, batch_rows, d_model, n_layers, torch_device))
    metadata = {"model": {"name": "random", "fingerprint": "-", "d_model": d_model, "n_hidden_states": n_layers},
                "dtype": "bf16", "layers": list(range(n_layers))}
    table = Table(title=f"stage one's writer: {rows:,} rows of d_model {d_model}, batches of {batch_rows:,}, shards of "
                        f"{shard_rows:,}, {os.cpu_count()} CPUs")
    for column in ("measure", "seconds", "rows/s"):
        table.add_column(column, justify="right")
    stats_seconds = sum(seconds for _, seconds in batches)
    add_row(table, f"per-layer statistics on {torch_device}", f"{stats_seconds:.3f}", f"{rows / stats_seconds:,.0f}")
    with tempfile.TemporaryDirectory() as scratch:
        store = create_or_open(f"{scratch}/store", metadata)
        start = time.perf_counter()
        writer = ShardWriter(store, shard_rows)
        for batch, _ in batches:
            writer.submit(batch)
        writer.close()
        seconds = time.perf_counter() - start
        add_row(table, f"writer thread: {len(store.shards)} shards gathered, compressed, written", f"{seconds:.3f}",
                f"{rows / seconds:,.0f}")
    Console(width=160).print(table)


if __name__ == "__main__":
    typer.run(main)

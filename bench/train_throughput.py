"""Stage two: training from shards against training from memory, the loader alone, the SAE step alone.

Usage: python -m bench.train_throughput --shards /tmp/s --steps 30 --batch-size 1024
       python -m bench.train_throughput --synthetic-rows 2M --d-model 1536 --batch-size 4096   (GPU: a random store)

One run measures: training rows/s reading shards (ShardLoader) and reading the very same batches
already in memory on the device (so both do the same training work), in the steady state from the
third batch on, their ratio and how long each run waited for its first batch; rows/s of the loader alone, in its steady state from
its third shuffled window on where the steps reach four windows, else from its start (and, with
--layers, keeping only those hidden states' rows, as train-sae --layers does); and rows/s of one
SAE training step alone, dense, sparse and the step trained with (see bench/sae_step.py), at the seed's size
(expansion 4, k 32) and a large one (expansion 16, k 64). --decoder and --cuda-graph pick the training step.
The runs from memory and from shards alternate --repeats times and the fastest of each counts, so a slow
spell of a shared machine does not land on one side of the ratio only.
"""

import itertools
import multiprocessing
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
import typer
from rich.console import Console
from rich.table import Table

from bench.tables import add_row
from pipeline.devices import resolve_device
from pipeline.errors import CrosscodersError
from pipeline.layers import stored_layers
from pipeline.loader import WINDOWS_AHEAD, ShardLoader
from pipeline.store import ShardData, SplitRows, Store, create_or_open, layer_sums, to_storage
from pipeline.train import Run, TrainConfig, train
from pipeline.train_step import check_device
from pipeline.units import parse_count

SIZES = [(4, 32), (16, 64)]


def synthetic_store(path: Path, n_rows: int, d_model: int, n_layers: int = 29, shard_rows: int = 65536) -> Store:
    """A bf16 store of random rows, for loader speed where no real store is at hand. Up to 8 processes write its
    shards (cache-acts' default of 65536 rows) at once: one process makes a shard in 3.5 s of CPU time at d_model
    1536 on dev-cpu (random numbers, exact layer statistics, compression on zarr's one writing thread), so one
    process would spend one to two minutes on 2M rows, more than bench/gpu.sh gives the whole step."""
    create_or_open(path, synthetic_metadata(d_model, n_layers))
    starts = range(0, n_rows, shard_rows)
    n_processes = min(len(starts), os.cpu_count() or 1, 8)  # each holds a few GB
    write = partial(write_random_shard, path, n_rows, d_model, n_layers, shard_rows, max(1, (os.cpu_count() or 1) // n_processes))
    # spawned, not forked: torch's threads and CUDA may be running in this process already
    with ProcessPoolExecutor(n_processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(write, starts))
    return Store(path)


def synthetic_metadata(d_model: int, n_layers: int) -> dict:
    return {"model": {"name": "synthetic", "fingerprint": "synthetic", "d_model": d_model, "n_hidden_states": n_layers},
            "dtype": "bf16", "layers": list(range(n_layers))}


def write_random_shard(path: Path, n_rows: int, d_model: int, n_layers: int, shard_rows: int, threads: int, start: int):
    """The shard of synthetic_store holding rows [start, start + shard_rows), from its own seed."""
    torch.set_num_threads(threads)
    store = create_or_open(path, synthetic_metadata(d_model, n_layers), clean=False)
    generator = torch.Generator().manual_seed(start)
    rows = min(shard_rows, n_rows - start)
    acts = torch.randn(rows, d_model, generator=generator) * torch.linspace(0.5, 20, n_layers)[torch.arange(rows) % n_layers, None]
    layer = (np.arange(rows) % n_layers).astype(np.int16)
    train_rows = SplitRows(to_storage(acts, "bf16"), layer, np.zeros(rows), np.zeros(rows), np.zeros(rows))
    val_rows = SplitRows(to_storage(acts[:256], "bf16"), layer[:256], np.zeros(256), np.zeros(256), np.zeros(256))
    sums = layer_sums(acts.bfloat16(), torch.from_numpy(layer.astype(np.int64)), n_layers)
    store.write_shard(ShardData({"train": train_rows, "val": val_rows}, np.array([0]), np.array([0]), np.array([0, 1]),
                                np.zeros(1, np.int32), *sums, [start // shard_rows], [rows + 256]))


class Prefetched:
    """The shard loader's first batches of epoch 0, held on the device: training from them does exactly
    the work training from the loader does, without reading anything."""

    def __init__(self, loader: ShardLoader, n_batches: int):
        self.d_model, self.n_layers, self.stats = loader.d_model, loader.n_layers, loader.stats
        self.batches = list(itertools.islice(loader.train_batches(0), n_batches))

    def n_train_batches(self) -> int:
        return len(self.batches)

    def train_batches(self, epoch: int, start_batch: int = 0):
        return iter(self.batches[start_batch:])

    def val_batches(self):
        return iter(())


class BatchClock:
    """A batch source that notes when each batch reached the trainer, and how long the first one took to come."""

    def __init__(self, source):
        self.source, self.asked, self.first_wait = source, [], None
        self.d_model, self.n_layers, self.stats = source.d_model, source.n_layers, source.stats

    def n_train_batches(self) -> int:
        return self.source.n_train_batches()

    def train_batches(self, epoch: int, start_batch: int = 0):
        requested = time.perf_counter()  # the trainer asks for the first batch: its set-up is done
        for batch in self.source.train_batches(epoch, start_batch):
            self.asked.append(time.perf_counter())
            if self.first_wait is None:
                self.first_wait = self.asked[-1] - requested
            yield batch

    def val_batches(self):
        return self.source.val_batches()


def timed_training(source, cfg: TrainConfig, device: torch.device) -> tuple[float, float]:
    """train() over cfg.steps steps (no validation or checkpoint inside): (seconds the trainer waited for its first
    batch, rows/s from the 3rd batch to the last one asked for, the steady state)."""
    clock = BatchClock(source)
    with tempfile.TemporaryDirectory(dir=run_scratch()) as out:
        train([cfg], clock, [Path(out) / "run"], device, progress=False)
    return clock.first_wait, steady_rows_per_s(clock.asked, cfg.batch_size)


def steady_rows_per_s(asked: list[float], batch_size: int) -> float:
    """Rows/s from the 3rd batch the trainer got to the last (asked: when it got each, s), past the start's waits."""
    return (len(asked) - 3) * batch_size / (asked[-1] - asked[2])


def run_scratch() -> str | None:
    """Where the timed runs write their checkpoint and SAE, untimed but at each run's end: memory (/dev/shm) when it
    has room for a 16x/d_model 1536 checkpoint, which takes seconds to fsync to a disk."""
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 4 << 30 else None


def loader_rows_per_s(loader: ShardLoader, n_batches: int, device: torch.device) -> tuple[float, bool]:
    """Rows/s of the loader alone over the first n_batches batches of an epoch, and whether that is its steady state.

    Steady: from the batch that begins window WINDOWS_AHEAD (the first window its readers start only once batches are
    taken) to the batch that begins the last window reached, the rows of the batches between. Where the batches reach
    fewer windows, from asking for the first batch to the last, the first windows' reads included. Either way the
    clock stops before the close, which waits for the windows read ahead.
    """
    firsts = [b for b in window_first_batches(loader, epoch=1)[WINDOWS_AHEAD:] if b < n_batches]
    batches, asked, rows = loader.train_batches(epoch=1), [time.perf_counter()], [0]  # asked[i + 1]: batch i's arrival
    for i, (x, _) in enumerate(itertools.islice(batches, n_batches)):
        if device.type == "cuda" and i in (n_batches - 1, *firsts[:1], *firsts[-1:]):
            torch.cuda.synchronize()  # a batch the clock may stop at: its copy to the device has landed
        asked.append(time.perf_counter())
        rows.append(len(x))
    batches.close()
    steady = len(firsts) >= 2 and bool(firsts[-1] > firsts[0])
    begin, end = (firsts[0] + 1, firsts[-1] + 1) if steady else (0, len(asked) - 1)
    return sum(rows[begin + 1 : end + 1]) / (asked[end] - asked[begin]), steady


def window_first_batches(loader: ShardLoader, epoch: int) -> np.ndarray:
    """For each of the epoch's shuffled windows, the batch that holds its first row."""
    window_rows = [sum(loader.chunks[c].n_rows for c in window) for window in loader._windows(epoch)]
    return np.cumsum([0, *window_rows[:-1]]) // loader.batch_size


def step_rows_per_s(source, cfg: TrainConfig, device: torch.device, n_steps: int) -> float:
    """One Run's train_step alone, on a batch already on the device."""
    x, layer = next(iter(source.train_batches(0)))
    with tempfile.TemporaryDirectory() as out:
        run = Run(cfg, Path(out), source, device, resume=False)
        for _ in range(2):  # warm-up: Adam's state; with a CUDA graph, its eager run and the capture
            run.train_step(x, layer)
        run.sync()
        start = time.perf_counter()
        for _ in range(n_steps):
            run.train_step(x, layer)
        run.sync()  # the last step's metrics: all the steps are done
        return n_steps * len(x) / (time.perf_counter() - start)


def main(
    shards: str = typer.Option(None, help="A store written by cache-acts; or give --synthetic-rows."),
    synthetic_rows: str = typer.Option(None, help="Write a random bf16 store of this many rows (e.g. 2M) and use it."),
    d_model: int = typer.Option(1536, help="Width of the synthetic store."),
    batch_size: int = 1024,
    steps: int = 30,
    repeats: int = typer.Option(3, help="Training runs from memory and from shards, alternated; the fastest of each "
                                        "counts, and of the SAE step alone too."),
    workers: str = typer.Option("4", help="Loader reader threads; a list (4,8,16) times the loader alone with each "
                                          "and trains with the last."),
    loader_only: bool = typer.Option(False, help="Time the loader alone, without training."),
    layers: str = typer.Option(None, help="Also time the loader alone keeping these hidden states' rows (train-sae --layers)."),
    decoder: str = typer.Option("auto", help="The training step: dense, sparse, triton or auto (TrainConfig.decoder)."),
    cuda_graph: bool = typer.Option(False, help="Train with each step replayed from a CUDA graph."),
    device: str = "auto",
):
    try:  # a device or step this machine cannot take is refused before the store is written
        torch_device = resolve_device(device)
        check_device(TrainConfig(decoder=decoder, cuda_graph=cuda_graph), torch_device)
    except CrosscodersError as error:
        raise typer.BadParameter(str(error)) from None
    scratch = tempfile.TemporaryDirectory()
    store = synthetic_store(Path(scratch.name) / "s", parse_count(synthetic_rows), d_model) if synthetic_rows else Store(shards)
    counts = [int(n) for n in workers.split(",")]
    loaders = [ShardLoader(store, batch_size, seed=0, device=torch_device, workers=n) for n in counts]
    loader = loaders[-1]
    steps = min(steps, loader.n_train_batches() - 1)
    if repeats < 1:
        raise typer.BadParameter(f"--repeats {repeats} must be at least 1")
    if steps < 4:  # the steady state runs from the third batch asked for to the last
        raise typer.BadParameter(f"{steps} steps time no steady state; give --steps 4 or more, and a store of 5 batches or more")
    table = Table(title=f"stage two: d_model {store.d_model}, batch {batch_size}, {torch_device}, {loader.n_rows:,} rows")
    for column in ("measure", "expansion", "k", "step", "rows/s", "ratio", "first batch s"):
        table.add_column(column, justify="right")
    if torch_device.type == "cuda":  # untimed: the CUDA context, the side stream and the first pinned window buffers
        loader_rows_per_s(loaders[0], steps, torch_device)
    for count, each in zip(counts, loaders):
        rate, steady = loader_rows_per_s(each, steps, torch_device)
        add_row(table, f"loader alone, {count} threads{'' if steady else ', start included'}", "-", "-", "-", f"{rate:,.0f}", "", "")
    if layers is not None:
        kept = stored_layers(layers, store.metadata["layers"], store.n_hidden_states)
        for count in counts:
            each = ShardLoader(store, batch_size, seed=0, device=torch_device, workers=count, layers=kept)
            rate, steady = loader_rows_per_s(each, min(steps, each.n_train_batches()), torch_device)
            add_row(table, f"loader alone, {count} threads, layers {layers}{'' if steady else ', start included'}", "-", "-", "-",
                    f"{rate:,.0f}", "", "")
    if not loader_only:
        memory = Prefetched(loader, steps)
        name = decoder + ("+graph" if cuda_graph else "")
        for expansion, k in SIZES:
            base = TrainConfig(expansion=expansion, k=k, batch_size=batch_size, steps=steps, val_every=10**9, save_every=10**9,
                               warmup_steps=1, decoder=decoder, cuda_graph=cuda_graph)
            timings = [(timed_training(memory, base, torch_device), timed_training(loader, base, torch_device)) for _ in range(repeats)]
            (memory_wait, from_memory), (shards_wait, from_shards) = (max(side, key=lambda t: t[1]) for side in zip(*timings))
            add_row(table, "train from memory", str(expansion), str(k), name, f"{from_memory:,.0f}", "", f"{memory_wait:.2f}")
            add_row(table, "train from shards", str(expansion), str(k), name, f"{from_shards:,.0f}", f"{from_shards / from_memory:.2f}", f"{shards_wait:.2f}")
            alone = {"dense": replace(base, decoder="dense", cuda_graph=False), "sparse": replace(base, decoder="sparse", cuda_graph=False), name: base}
            for step_name, cfg in alone.items():
                rate = max(step_rows_per_s(memory, replace(cfg, steps=None), torch_device, max(steps // 3, 3)) for _ in range(repeats))
                add_row(table, "SAE step alone", str(expansion), str(k), step_name, f"{rate:,.0f}", "", "")
    Console(width=160).print(table)


if __name__ == "__main__":
    typer.run(main)

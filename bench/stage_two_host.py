"""Stage two's host work alone: how many rows/s the host lets `train-sae` train from shards, whatever the SAE step's speed.

Usage: python -m bench.stage_two_host --synthetic-rows 1M --step-ms 20,15 [--workers 4] [--device cuda]
train() runs as train-sae runs it (the loader reading, decompressing and shuffling windows in its threads, each batch
sent to the device and widened there, every step's metrics logged), except that the SAE step is a stand-in device
that takes --step-ms per step and does nothing: queuing a step returns at once, and reading the step before's
metrics waits, without the GIL, until that step would have ended, as TrainStep's read-back waits on a GPU. So from
memory (the same batches held on the device) training runs at the step's rate, and from shards at most at it: the
gap is the host's. Idle: how long the device waited for each step to be queued (a step queued while the one before
runs costs nothing), in the mean, on the steps whose batch begins a shuffled window of the loader, and on the others. For the loader alone, the CPU time of all its
threads (user and system) and the minor page faults (fresh pages touched) per row: with the rate, whether its threads
are busy (CPU us/row x rows/s near the reader threads) or wait on each other.
"""

import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import typer
from rich.console import Console
from rich.table import Table

import pipeline.train as train_module
from bench.resources import usage
from bench.tables import add_row
from bench.train_throughput import BatchClock, Prefetched, loader_rows_per_s, run_scratch, steady_rows_per_s, synthetic_store, window_first_batches
from pipeline.devices import resolve_device
from pipeline.loader import ShardLoader, reader_threads
from pipeline.store import Store
from pipeline.train import TrainConfig, train
from pipeline.train_step import METRICS, TrainStep
from pipeline.units import parse_count


class StandInStep:
    """A TrainStep whose steps take `seconds` each on an imaginary device that runs them one after another: queuing
    one returns at once, and the step before's metrics (all zero) come back when that step would have ended. It notes
    how long the device sat idle before each step was queued: the host's cost. What else train() asks of a TrainStep
    (the optimizer, for a checkpoint) is the real one's."""

    def __init__(self, real: TrainStep, seconds: float):
        self.real, self.seconds = real, seconds
        self.free_at: float | None = None  # when the imaginary device ends the last step queued
        self.in_flight: tuple[float, float] | None = None  # (end, lr) of the step queued last
        self.idle: list[float] = []  # per step queued, seconds the device waited for it (none for the first)

    def __getattr__(self, name: str):
        return getattr(self.real, name)

    def __call__(self, x: torch.Tensor, layer: torch.Tensor, lr: float) -> dict[str, float] | None:
        now = time.perf_counter()
        free_at = now if self.free_at is None else self.free_at
        self.idle.append(max(0.0, now - free_at))
        self.free_at = max(now, free_at) + self.seconds
        previous, self.in_flight = self.in_flight, (self.free_at, lr)
        return None if previous is None else self.read(*previous)

    def drain(self) -> dict[str, float] | None:
        previous, self.in_flight = self.in_flight, None
        return None if previous is None else self.read(*previous)

    @staticmethod
    def read(end: float, lr: float) -> dict[str, float]:
        time.sleep(max(0.0, end - time.perf_counter()))  # sleep holds no GIL, as a wait on the GPU's stream does not
        return {**dict.fromkeys(METRICS, 0.0), "lr": lr}


def stand_in_step(sae, cfg: TrainConfig, device: torch.device, seconds: float, made: list[StandInStep]) -> StandInStep:
    """What train() builds in place of TrainStep(sae, cfg, device); each one built is appended to made."""
    made.append(StandInStep(TrainStep(sae, cfg, device), seconds))
    return made[-1]


def window_starts(loader: ShardLoader, epoch: int, n_batches: int) -> np.ndarray:
    """[n_batches] bool: the batches of the epoch whose rows begin a new shuffled window of the loader."""
    begins, batches = np.zeros(n_batches, bool), window_first_batches(loader, epoch)
    begins[batches[batches < n_batches]] = True
    return begins


def idle_ms(idle: np.ndarray, begins: np.ndarray) -> tuple[float, float | None, float | None]:
    """Mean ms the device waited for a step (idle: s per step), from the 4th step on (the steady state's): over all
    steps, over those whose batch begins a window, over the others."""
    idle, at_start = idle[3:] * 1000, begins[3 : len(idle)]

    def mean(kept: np.ndarray) -> float | None:
        return float(idle[kept].mean()) if kept.any() else None

    return float(idle.mean()), mean(at_start), mean(~at_start)


def timed(source, cfg: TrainConfig, device: torch.device, made: list[StandInStep]) -> tuple[np.ndarray, np.ndarray]:
    """train() over cfg.steps steps: when the trainer got each batch, and how long the device waited for each step (s)."""
    clock = BatchClock(source)
    with tempfile.TemporaryDirectory(dir=run_scratch()) as out:
        train([cfg], clock, [Path(out) / "run"], device, progress=False)
    return np.array(clock.asked), np.array(made[-1].idle)


def main(
    shards: str = typer.Option(None, help="A store written by cache-acts; or give --synthetic-rows."),
    synthetic_rows: str = typer.Option(None, help="Write a random bf16 store of this many rows (e.g. 1M) and use it."),
    d_model: int = typer.Option(1536, help="Width of the synthetic store."),
    batch_size: int = 4096,
    steps: int = typer.Option(200, help="Steps of each training run, at most the store's batches less one."),
    step_ms: str = typer.Option("20,15", help="The stand-in step's time, in ms; a list times each in turn."),
    workers: int = typer.Option(None, help="Loader reader threads; default: train-sae's (one per CPU, 4 to 8)."),
    repeats: int = typer.Option(2, help="Runs from memory and from shards, alternated; the fastest of each counts."),
    device: str = "auto",
):
    torch_device = resolve_device(device)
    with tempfile.TemporaryDirectory() as scratch:
        store = synthetic_store(Path(scratch) / "s", parse_count(synthetic_rows), d_model) if synthetic_rows else Store(shards)
        loader = ShardLoader(store, batch_size, seed=0, device=torch_device, workers=workers)
        steps = min(steps, loader.n_train_batches() - 1)
        if steps < 4:
            raise typer.BadParameter(f"{steps} steps time no steady state; give --steps 4 or more, and a store of 5 batches or more")
        table = Table(title=f"stage two without the SAE's work: d_model {store.d_model}, batch {batch_size}, {torch_device}, "
                            f"{loader.n_rows:,} rows, {reader_threads(workers)} reader threads")
        for column in ("step ms", "measure", "rows/s", "ratio", "idle ms/step", "at window starts", "elsewhere", "CPU us/row",
                       "page faults/row"):
            table.add_column(column, justify="right")
        loader_rows_per_s(loader, steps, torch_device)  # untimed: a GPU's context, pinned buffers; the page cache
        before = usage()
        rate, _ = loader_rows_per_s(loader, loader.n_train_batches(), torch_device)  # a whole epoch: no window read unused
        (cpu, faults), rows = (after - start for start, after in zip(before, usage())), loader.n_rows
        add_row(table, "-", "loader alone", f"{rate:,.0f}", "", "", "", "", f"{cpu / rows * 1e6:.2f}", f"{faults / rows:.3f}")
        memory, begins, made = Prefetched(loader, steps), window_starts(loader, 0, steps), []
        for milliseconds in (float(ms) for ms in step_ms.split(",")):
            cfg = TrainConfig(expansion=1, k=1, batch_size=batch_size, steps=steps, val_every=10**9, save_every=10**9, warmup_steps=1)
            train_module.TrainStep = partial(stand_in_step, seconds=milliseconds / 1000, made=made)
            runs = [(timed(memory, cfg, torch_device, made), timed(loader, cfg, torch_device, made)) for _ in range(repeats)]
            fastest = [min(side, key=lambda run: run[0][-1] - run[0][2]) for side in zip(*runs)]  # the fastest steady state
            rates = [steady_rows_per_s(asked, batch_size) for asked, _ in fastest]
            for name, (_, idle), rate in zip(("from memory", "from shards"), fastest, rates):
                cells = [f"{ms:.2f}" if ms is not None else "-" for ms in idle_ms(idle, begins)]
                ratio = f"{rate / rates[0]:.2f}" if name == "from shards" else ""
                add_row(table, f"{milliseconds:g}", f"train {name}", f"{rate:,.0f}", ratio, *cells, "", "")
    Console(width=160).print(table)


if __name__ == "__main__":
    typer.run(main)

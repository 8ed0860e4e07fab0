"""How much stage one's other threads slow its main thread, which queues the forward pass's kernels one by one.

Usage: python -m bench.host_contention [--ops 600 --seconds 6 --switch-interval 0.005]
The main thread times batches of --ops small torch ops (on a GPU, each op a kernel launch that needs the GIL),
resting between batches as it would while the GPU runs: alone; beside the corpus thread (reading and tokenizing the
next packing window of the default mined corpus, over and over) and the writer thread (writing shards of random
bf16 rows, over and over), each alone and both; and beside both run in another process, which loads the CPUs the
same way without sharing the GIL. --switch-interval sets how long a thread may hold the GIL while another waits
(sys.setswitchinterval; Python's default is 5 ms).
"""

import itertools
import multiprocessing
import sys
import tempfile
import threading
import time

import numpy as np
import torch
import typer
from rich.console import Console
from rich.table import Table

from bench.cache_throughput import tiny_tokenizer
from bench.shard_writer import recorded_batches
from bench.tables import add_row
from pipeline.corpus import CorpusConfig, iter_documents, tokenize_document
from pipeline.shard_writer import ShardWriter
from pipeline.store import create_or_open
from pipeline.windows import read_windows

SETTINGS = {  # name -> (threads beside the main thread, whether they run in another process)
    "alone": ((), False),
    "corpus and writer threads, another process": (("corpus", "writer"), True),
    "corpus and writer threads": (("corpus", "writer"), False),
    "corpus thread": (("corpus",), False),
    "writer thread": (("writer",), False),
}


def corpus_thread(stop: threading.Event, pack_window: int) -> None:
    """Reads and tokenizes packing windows of the default corpus, as cache-acts prepares the next one, until stopped."""
    tokenizer = tiny_tokenizer()
    while not stop.is_set():
        windows = read_windows(lambda start: iter_documents(CorpusConfig(), start=start),
                               lambda doc: np.asarray(tokenize_document(doc, tokenizer, 1024), dtype=np.int32),
                               pack_window, itertools.count())
        for _ in windows:
            if stop.is_set():
                return


def writer_thread(stop: threading.Event, rows: int, d_model: int) -> None:
    """Writes shards of random rows through ShardWriter, as cache-acts does, until stopped."""
    batches = [batch for batch, _ in recorded_batches(rows, min(rows, 16384), d_model, 29, torch.device("cpu"))]
    metadata = {"model": {"name": "random", "fingerprint": "-", "d_model": d_model, "n_hidden_states": 29},
                "dtype": "bf16", "layers": list(range(29))}
    with tempfile.TemporaryDirectory() as scratch:
        for attempt in itertools.count():
            if stop.is_set():
                return
            writer = ShardWriter(create_or_open(f"{scratch}/store-{attempt}", metadata), rows // 2)
            for batch in batches:
                writer.submit(batch)
            writer.close()


def run_threads(names: tuple[str, ...], stop, ready, pack_window: int, rows: int, d_model: int) -> None:
    targets = {"corpus": (corpus_thread, (stop, pack_window)), "writer": (writer_thread, (stop, rows, d_model))}
    threads = [threading.Thread(target=targets[name][0], args=targets[name][1], daemon=True) for name in names]
    for thread in threads:
        thread.start()
    ready.set()
    for thread in threads:
        thread.join()


def batch_times(ops: int, seconds: float, rest: float) -> np.ndarray:
    """Seconds each batch of `ops` small in-place torch ops took, over `seconds`."""
    x, times = torch.zeros(64), []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        for _ in range(ops):
            x.add_(1)
        times.append(time.perf_counter() - start)
        time.sleep(rest)
    return np.array(times)


def main(
    ops: int = typer.Option(600, help="Ops per batch (a forward pass of the 1.5B model queues several hundred kernels)."),
    seconds: float = typer.Option(6.0, help="How long each setting is timed."),
    rest: float = typer.Option(0.03, help="Seconds between batches, as the main thread waits on the GPU."),
    warm_up: float = typer.Option(3.0, help="Seconds the other threads run before the timing starts."),
    pack_window: int = typer.Option(256, help="Documents per packing window (cache-acts' default)."),
    writer_rows: int = typer.Option(131072, help="Rows the writer thread writes per round, in two shards."),
    d_model: int = typer.Option(1536, help="Width of the writer's rows (1536: Qwen2.5-Coder-1.5B)."),
    switch_interval: float = typer.Option(0.005, help="Seconds a thread may hold the GIL while another waits for it."),
):
    torch.set_num_threads(1)
    sys.setswitchinterval(switch_interval)
    table = Table(title=f"the main thread's batches of {ops} small torch ops, beside stage one's other threads "
                        f"(GIL switch interval {switch_interval * 1e3:g} ms)")
    for column in ("beside", "batches", "median ms", "p90 ms"):
        table.add_column(column, justify="right")
    for name, (threads, elsewhere) in SETTINGS.items():
        context = multiprocessing.get_context("spawn")
        stop, ready = (context.Event(), context.Event()) if elsewhere else (threading.Event(), threading.Event())
        arguments = (threads, stop, ready, pack_window, writer_rows, d_model)
        runner = context.Process(target=run_threads, args=arguments) if elsewhere else threading.Thread(target=run_threads, args=arguments)
        runner.start()
        ready.wait()
        time.sleep(warm_up if threads else 0)
        times = batch_times(ops, seconds, rest) * 1e3
        stop.set()
        runner.join()
        add_row(table, name, f"{len(times)}", f"{np.median(times):.2f}", f"{np.percentile(times, 90):.2f}")
    Console(width=160).print(table)


if __name__ == "__main__":
    typer.run(main)

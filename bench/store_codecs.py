"""Codec choice for stored activations: ratio and speeds on a real store's chunks.

Usage: python -m bench.store_codecs --shards /tmp/s [--chunk-rows 1024]
Prints one row per codec: compression ratio, compress and decompress MB/s (one thread).
"""

import time

import numcodecs.blosc
import numpy as np
import typer
from numcodecs import Blosc, Zstd
from rich.console import Console
from rich.table import Table

from pipeline.store import Store

CODECS = {
    "none": None,
    "blosc lz4 shuffle": Blosc("lz4", 5, Blosc.SHUFFLE),
    "blosc lz4 bitshuffle": Blosc("lz4", 5, Blosc.BITSHUFFLE),
    "blosc zstd-1 bitshuffle": Blosc("zstd", 1, Blosc.BITSHUFFLE),
    "blosc zstd-3 shuffle": Blosc("zstd", 3, Blosc.SHUFFLE),
    "blosc zstd-3 bitshuffle": Blosc("zstd", 3, Blosc.BITSHUFFLE),
    "blosc zstd-5 bitshuffle": Blosc("zstd", 5, Blosc.BITSHUFFLE),
    "zstd-3 (no shuffle)": Zstd(3),
}


def main(shards: str = typer.Option(..., help="A store written by cache-acts."), chunk_rows: int = 1024):
    numcodecs.blosc.set_nthreads(1)  # per-thread speeds; the loader runs several readers
    store = Store(shards)
    acts = np.concatenate([store.read(s, "train/acts") for s in store.shards])
    chunks = [np.ascontiguousarray(acts[i : i + chunk_rows]) for i in range(0, len(acts) - chunk_rows + 1, chunk_rows)]
    raw_bytes = sum(c.nbytes for c in chunks)
    table = Table(title=f"{len(chunks)} chunks of {chunk_rows} x {acts.shape[1]} {store.dtype} ({raw_bytes / 2**20:.0f} MiB), model {store.metadata['model']['name']}")
    for column in ("codec", "ratio", "compress MB/s", "decompress MB/s"):
        table.add_column(column, justify="right")
    for name, codec in CODECS.items():
        if codec is None:
            table.add_row(name, "1.00", "-", "-")
            continue
        start = time.perf_counter()
        encoded = [codec.encode(c) for c in chunks]
        encode_s = time.perf_counter() - start
        start = time.perf_counter()
        for e in encoded:
            codec.decode(e)
        decode_s = time.perf_counter() - start
        ratio = raw_bytes / sum(len(e) for e in encoded)
        table.add_row(name, f"{ratio:.3f}", f"{raw_bytes / encode_s / 1e6:,.0f}", f"{raw_bytes / decode_s / 1e6:,.0f}")
    Console().print(table)


if __name__ == "__main__":
    typer.run(main)

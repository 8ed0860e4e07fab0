"""Batches of (activation, layer) rows for SAE training: shuffled, exact per epoch, resumable."""

from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Iterator, Protocol

import numpy as np
import torch

from pipeline import distributed
from pipeline.cli import option
from pipeline.devices import to_device, usable_cpus
from pipeline.errors import CrosscodersError
from pipeline.store import CHUNK_ROWS, STORAGE_DTYPES, ShardInfo, Store, layer_sums, storage_bits

WINDOWS_AHEAD = 2  # windows read and shuffled ahead of the one batches are taken from


@dataclass(frozen=True)
class LayerStats:
    """Per-layer statistics of the raw residual stream, for normalization."""

    mean: torch.Tensor  # [n_layers, d_model] float64, as are the sums, so E||x||^2 - ||mean||^2 keeps its digits
    mean_sq_norm: torch.Tensor  # [n_layers] float64: E||x||^2
    count: torch.Tensor  # [n_layers] int64: rows seen per layer


class BatchSource(Protocol):
    """What the trainer reads from: the shard loader, or rows already in memory."""

    d_model: int
    n_layers: int  # layer ids lie in [0, n_layers)
    stats: LayerStats

    def n_train_batches(self) -> int:
        """Batches in one training epoch; the last may be smaller, so every row is seen once."""

    def train_batches(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yields (x: [batch, d_model] float32, layer: [batch] int64) on the device, in epoch order.

        Under data parallelism, each process gets its rank's share of every batch (see rank_rows).
        """

    def val_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The held-out rows in a fixed order, same shapes (and shares) as training batches."""


def check_split(batch_size: int, world_size: int):
    """Data parallelism splits every batch evenly over the processes."""
    if batch_size % world_size:
        raise CrosscodersError(f"batch_size={batch_size} must be a multiple of the {world_size} training processes")


def rank_rows(n_rows: int, rank: int, world_size: int) -> slice:
    """Rank's contiguous share of a batch of n_rows; the shares of all ranks make up the batch, in order."""
    return slice(rank * n_rows // world_size, (rank + 1) * n_rows // world_size)


def epoch_permutation(n_rows: int, seed: int, epoch: int) -> torch.Tensor:
    """A permutation of row ids that depends only on (seed, epoch): the order of one epoch."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n_rows, generator=generator)


class MemoryLoader:
    """Rows held in memory (a notebook's tensors, a planted dictionary), as `train` takes them: ShardLoader's batches
    without a store."""

    def __init__(
        self,
        acts: torch.Tensor,  # [n_rows, d_model]
        layers: torch.Tensor,  # [n_rows]
        n_layers: int,
        batch_size: int,
        seed: int = 0,
        device: torch.device | str = "cpu",
        val_acts: torch.Tensor | None = None,
        val_layers: torch.Tensor | None = None,
        rank: int = 0,
        world_size: int = 1,
    ):
        check_split(batch_size, world_size)
        self.acts, self.layers = acts, layers.long()
        self.val_acts = acts[:0] if val_acts is None else val_acts
        self.val_layers = layers[:0].long() if val_layers is None else val_layers.long()
        self.d_model, self.n_layers = acts.shape[1], n_layers
        self.batch_size, self.seed, self.device = batch_size, seed, torch.device(device)
        self.stats = layer_stats_of(acts, self.layers, n_layers)
        self.rank, self.world_size = rank, world_size

    def n_train_batches(self) -> int:
        return -(-len(self.acts) // self.batch_size)

    def train_batches(self, epoch: int, start_batch: int = 0):
        order = epoch_permutation(len(self.acts), self.seed, epoch)
        for b in range(start_batch, self.n_train_batches()):
            rows = order[b * self.batch_size : (b + 1) * self.batch_size]
            rows = rows[rank_rows(len(rows), self.rank, self.world_size)]
            yield self._to_device(self.acts[rows], self.layers[rows])

    def val_batches(self):
        for start in range(0, len(self.val_acts), self.batch_size):
            acts, layers = self.val_acts[start : start + self.batch_size], self.val_layers[start : start + self.batch_size]
            share = rank_rows(len(acts), self.rank, self.world_size)
            yield self._to_device(acts[share], layers[share])

    def _to_device(self, acts: torch.Tensor, layers: torch.Tensor):
        return acts.to(self.device, torch.float32), layers.to(self.device)


def layer_stats_of(acts: torch.Tensor, layers: torch.Tensor, n_layers: int) -> LayerStats:
    """Exact per-layer mean and mean squared norm of rows (acts: [n, d], layers: [n])."""
    return stats_from_sums(*layer_sums(acts, layers, n_layers))


def stats_from_sums(count: np.ndarray, total: np.ndarray, sq: np.ndarray) -> LayerStats:
    denominator = np.maximum(count, 1).astype(np.float64)
    return LayerStats(
        torch.from_numpy(total / denominator[:, None]),
        torch.from_numpy(sq / denominator),
        torch.from_numpy(count.astype(np.int64)),
    )


@dataclass(frozen=True)
class Chunk:
    """Training rows [start, end) of a shard, one compressed chunk; of them, only the `kept` offsets when not None."""

    shard: ShardInfo
    start: int
    end: int
    kept: np.ndarray | None = None  # [n_rows] int64 offsets from start

    @property
    def n_rows(self) -> int:
        return self.end - self.start if self.kept is None else len(self.kept)


@dataclass(frozen=True)
class LoaderConfig:
    """Where training rows come from and how they are read."""

    shards: str = option("./shards", "Activation store written by cache-acts: a folder or an fsspec URL.")
    window_chunks: int = option(64, "Chunks (of 1024 rows) shuffled together; more mixes better and uses more memory.")
    workers: int | None = option(None, "Threads reading and decompressing chunks; default: one per CPU this process may use, 4 at least and 8 at most.")
    val_rows: int = option(65536, "Held-out rows used for validation, each layer its share.")
    shuffle_seed: int = option(0, "Seed of the row order; every run of a sweep reads the same batches.")
    layers: str = option("all", "Hidden states to train on: all (the store's), 12, 0-8 or 4,8,12; the others' rows are read "
                                "and skipped.")

    def __post_init__(self):
        for name, value, least in (("window-chunks", self.window_chunks, 1), ("workers", self.workers, 1), ("val-rows", self.val_rows, 0)):
            if value is not None and value < least:
                raise CrosscodersError(f"--{name} {value} must be at least {least}")
        if not 0 <= self.shuffle_seed < 2**32:
            raise CrosscodersError(f"--shuffle-seed {self.shuffle_seed} must be from 0 to {2**32 - 1}")


def reader_threads(workers: int | None) -> int:
    """`workers`, or one thread per CPU this process may use, 4 at least and 8 at most. On an H200's host of 16 CPUs
    (d_model 1536, docs/BENCHMARKS.md) the loader alone read 0.98M rows/s with 4 threads, 1.75-1.95M with 8 and
    1.87-1.92M with 14 (6-7% more than 8 in the same run); the SAE step there takes 1.1-1.65M rows/s at 4x/k32."""
    return workers if workers is not None else min(max(usable_cpus(), 4), 8)


class ShardLoader:
    """Training rows of an activation store in a shuffled order that spans the whole store.

    An epoch visits the store's compressed chunks in a seeded random order; `window_chunks` of them
    at a time are read by worker threads (decompression releases the GIL), concatenated and
    shuffled row by row. A batch thus mixes rows of many shards while memory stays bounded by a
    few windows, whatever the store's size. The order depends only on (seed, epoch), so a run
    resumes mid-epoch by skipping whole windows without reading them. Under data parallelism each
    process reads every N-th chunk and the processes trade rows (train_batches). Given `layers`, the loader
    keeps only their rows, training and held out, as if the store held nothing else.
    """

    def __init__(
        self,
        store: Store,
        batch_size: int,
        seed: int = 0,
        device: torch.device | str = "cpu",
        window_chunks: int = 64,
        workers: int | None = None,
        val_rows: int = 65536,
        rank: int = 0,
        world_size: int = 1,
        layers: list[int] | None = None,
    ):
        check_split(batch_size, world_size)
        if not store.shards:
            raise CrosscodersError(f"{store.url} holds no complete shard yet; run cache-acts --out {store.url} first")
        if store.n_rows("train") == 0:
            raise CrosscodersError(f"{store.url} holds no training rows; cache more tokens or lower --val-fraction")
        self.store, self.batch_size, self.seed = store, batch_size, seed
        self.device, self.window_chunks, self.val_rows = torch.device(device), window_chunks, val_rows
        self.d_model, self.n_layers, self.layers = store.d_model, store.n_hidden_states, store.kept_layers(layers)
        self._layers: dict[str, np.ndarray] = {}  # shard name -> its training rows' layer ids
        self.chunks = [chunk for shard in store.shards for chunk in self._shard_chunks(shard) if chunk.n_rows]
        self.n_rows = sum(chunk.n_rows for chunk in self.chunks)
        if self.n_rows == 0:
            raise CrosscodersError(f"{store.url} holds no training rows of hidden states {layers}; pick others with --layers")
        self.pool = ThreadPoolExecutor(max_workers=reader_threads(workers), thread_name_prefix="chunk-reader")
        # windows are assembled in their own threads: waiting on chunk reads there must never starve the readers
        self.window_pool = ThreadPoolExecutor(max_workers=WINDOWS_AHEAD, thread_name_prefix="window-reader")
        self.stats = stats_from_sums(*store.layer_stats_sums())
        self._val: tuple[torch.Tensor, torch.Tensor] | None = None
        self.rank, self.world_size = rank, world_size

    def _shard_chunks(self, shard: ShardInfo) -> list[Chunk]:
        """The shard's training rows by chunk, but for the rows of other layers than self.layers."""
        n_rows = shard.n_rows["train"]
        starts = range(0, n_rows, CHUNK_ROWS)
        if self.layers is None:
            return [Chunk(shard, start, min(start + CHUNK_ROWS, n_rows)) for start in starts]
        kept = np.isin(self._layer_ids(shard), self.layers)
        return [Chunk(shard, start, min(start + CHUNK_ROWS, n_rows), np.flatnonzero(kept[start : start + CHUNK_ROWS])) for start in starts]

    def _layer_ids(self, shard: ShardInfo) -> np.ndarray:
        """The layer ids of a shard's training rows, read once, not per chunk: the row fields' chunks hold 65,536 rows,
        all decompressed to read a 1,024-row chunk's (12% more decompression at d_model 896). Kept in one byte a row
        (1 GB at 1e9 rows), as every model here has fewer than 256 hidden states."""
        if shard.name not in self._layers:
            ids = self.store.read(shard, "train/layer")
            self._layers[shard.name] = ids.astype(np.uint8) if self.n_layers <= 256 else ids
        return self._layers[shard.name]

    def n_train_batches(self) -> int:
        return -(-self.n_rows // self.batch_size)

    def _windows(self, epoch: int) -> list[list[int]]:
        order = epoch_permutation(len(self.chunks), self.seed, epoch).tolist()
        return [order[i : i + self.window_chunks] for i in range(0, len(order), self.window_chunks)]

    def _read_chunk(self, chunk_id: int) -> tuple[np.ndarray, np.ndarray]:
        """A chunk's training rows: (acts as the store's bits [rows, d_model], layer ids [rows])."""
        chunk = self.chunks[chunk_id]
        acts, layers = self.store.read(chunk.shard, "train/acts", chunk.start, chunk.end), self._layer_ids(chunk.shard)[chunk.start : chunk.end]
        return (acts, layers) if chunk.kept is None else (acts[chunk.kept], layers[chunk.kept])

    def _read_window(self, epoch: int, window: int, chunk_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This process's part of a window, every N-th chunk of the epoch, in the window's shuffled order:
        (acts in the storage dtype, layers, each row's place in that order). Runs in a window thread; the
        reader threads copy each chunk's rows straight to their shuffled rows (pinned for a GPU), one copy."""
        sizes = [self.chunks[c].n_rows for c in chunk_ids]
        starts = np.concatenate([[0], np.cumsum(sizes)])
        order = epoch_permutation(int(starts[-1]), self.seed + 7919 * (window + 1), epoch)
        mine = [j for j in range(len(chunk_ids)) if (window * self.window_chunks + j) % self.world_size == self.rank]
        if not mine:  # fewer chunks than processes
            return torch.zeros(0, self.d_model, dtype=STORAGE_DTYPES[self.store.dtype]), order[:0], order[:0]
        shuffled = torch.empty_like(order)
        shuffled[order] = torch.arange(len(order))  # each window row's place in the shuffled order
        place, by_place = shuffled[torch.cat([torch.arange(starts[j], starts[j + 1]) for j in mine])].sort()
        destination = torch.empty_like(by_place)
        destination[by_place] = torch.arange(len(by_place))  # where each of this process's rows goes
        pin = self.device.type == "cuda" and self.world_size == 1  # batches are slices of it: copied without staging
        acts = torch.empty(len(place), self.d_model, dtype=STORAGE_DTYPES[self.store.dtype], pin_memory=pin)
        layers = torch.empty(len(place), dtype=torch.int64, pin_memory=pin)
        acts_bits, layer_ids, rows_of = storage_bits(acts), layers.numpy(), destination.numpy()
        offsets = np.concatenate([[0], np.cumsum([sizes[j] for j in mine])])

        def place_chunk(i: int):  # numpy's row scatter: 4x torch's index_copy_ here, without the GIL
            chunk_acts, chunk_layers = self._read_chunk(chunk_ids[mine[i]])
            rows = rows_of[offsets[i] : offsets[i + 1]]
            acts_bits[rows], layer_ids[rows] = chunk_acts, chunk_layers

        list(self.pool.map(place_chunk, range(len(mine))))
        return acts, layers, place

    def _owner(self, position: torch.Tensor) -> torch.Tensor:
        """The process whose share of its batch holds each position of the epoch's row stream (see rank_rows)."""
        batch = position // self.batch_size
        offset = position - batch * self.batch_size
        batch_rows = (self.n_rows - batch * self.batch_size).clamp(max=self.batch_size)
        return ((offset + 1) * self.world_size - 1) // batch_rows

    def train_batches(self, epoch: int, start_batch: int = 0):
        """The epoch's row stream is its windows' rows, each window shuffled; batch b is rows [b * B, (b + 1) * B).

        Each process reads a disjoint part of every window, sends each row to the process whose batch
        share holds it, and yields its shares: together, exactly the single-process batches.
        """
        return sent_ahead(self._host_batches(epoch, start_batch), self.device)

    def _host_batches(self, epoch: int, start_batch: int):
        """train_batches before they move to the device (under NCCL the traded rows are there already)."""
        ahead = []  # window reads submitted and not yet taken
        try:
            yield from self._window_batches(epoch, start_batch, ahead)
        finally:  # an epoch left before its end (a run's last, a benchmark's): no window read outlives it
            for future in ahead:
                future.cancel()
            wait(ahead)

    def _window_batches(self, epoch: int, start_batch: int, ahead: list):
        windows = self._windows(epoch)
        sizes = [sum(self.chunks[c].n_rows for c in w) for w in windows]
        window_end = np.cumsum(sizes)
        first = int(np.searchsorted(window_end, start_batch * self.batch_size, side="right"))
        ahead.extend(self.window_pool.submit(self._read_window, epoch, w, windows[w]) for w in range(first, min(first + WINDOWS_AHEAD, len(windows))))
        pending, batch = None, start_batch  # pending: (acts, layers) of a share that continues in the next window
        for w in range(first, len(windows)):
            acts, layers, place = ahead.pop(0).result()
            if w + WINDOWS_AHEAD < len(windows):
                ahead.append(self.window_pool.submit(self._read_window, epoch, w + WINDOWS_AHEAD, windows[w + WINDOWS_AHEAD]))
            window_start = int(window_end[w] - sizes[w])  # the window's first position in the epoch's row stream
            position = place + window_start
            if window_start < start_batch * self.batch_size:  # resuming inside this window
                wanted = position >= start_batch * self.batch_size
                acts, layers, position = acts[wanted], layers[wanted], position[wanted]
            if self.world_size > 1:
                acts, layers, position = self._exchange(acts, layers, position)
                in_order = torch.argsort(position)  # the senders' rows, interleaved
                acts, layers = acts[in_order], layers[in_order]
            while batch < self.n_train_batches():
                batch_rows = min(self.batch_size, self.n_rows - batch * self.batch_size)
                if batch * self.batch_size + batch_rows > window_end[w]:
                    # the batch continues in the next window: every process trades that window's rows before any
                    # yields the batch, so that all enter their collectives in the same order (this share may be whole)
                    break
                share = rank_rows(batch_rows, self.rank, self.world_size)
                n = share.stop - share.start - (len(pending[0]) if pending else 0)
                x, layer = (torch.cat([pending[0], acts[:n]]), torch.cat([pending[1], layers[:n]])) if pending else (acts[:n], layers[:n])
                yield x, layer
                acts, layers, batch, pending = acts[n:], layers[n:], batch + 1, None
            if len(acts):
                pending = (torch.cat([pending[0], acts]), torch.cat([pending[1], layers])) if pending else (acts, layers)

    def _exchange(self, acts: torch.Tensor, layers: torch.Tensor, position: torch.Tensor):
        """Rows to the processes that train on them (on the GPU under NCCL, whose collectives need it)."""
        acts, layers, position = (to_device(t, self.device) for t in (acts, layers, position))
        owner = self._owner(position)
        return distributed.all_to_all_rows([acts, layers, position], owner)

    def val_batches(self):
        if self._val is None:
            self._val = self._read_val()
        return sent_ahead(self._val_shares(*self._val), self.device)

    def _val_shares(self, acts: torch.Tensor, layers: torch.Tensor):
        """This process's share of each validation batch, on the host."""
        for start in range(0, len(acts), self.batch_size):
            share = rank_rows(min(self.batch_size, len(acts) - start), self.rank, self.world_size)
            yield acts[start:][share], layers[start:][share]

    def _read_val(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`val_rows` held-out rows (of self.layers; each layer its share, Store.rows_of_layers), kept in memory in the storage dtype."""
        acts, layers = [], []
        for shard, (rows, layer_ids) in zip(self.store.shards, self.store.rows_of_layers("val", self.val_rows, self.layers)):
            if len(rows):
                acts.append(self.store.read_acts(shard, "val", 0, int(rows[-1]) + 1)[torch.from_numpy(rows)])
                layers.append(torch.from_numpy(layer_ids.astype(np.int64)))
        if not acts:
            return torch.zeros(0, self.d_model), torch.zeros(0, dtype=torch.int64)
        return torch.cat(acts), torch.cat(layers)


def sent_ahead(batches: Iterator[tuple[torch.Tensor, torch.Tensor]], device: torch.device):
    """(acts, layers) batches moved to device in the storage dtype (half the bytes of float32), acts widened there.

    On CUDA each batch is sent from pinned memory on a side stream while the caller still works on the one
    before: on the compute stream a 4096 x 1536 bf16 batch would stall the next step for its whole transfer.
    """
    if device.type != "cuda":
        yield from ((acts.to(device).float(), layers.to(device)) for acts, layers in batches)
        return
    side, sent = torch.cuda.Stream(device), None
    for acts, layers in batches:
        if acts.device.type == "cpu" and not acts.is_pinned():  # window slices are pinned already
            acts, layers = acts.pin_memory(), layers.pin_memory()
        with torch.cuda.stream(side):
            batch = (acts.to(device, non_blocking=True), layers.to(device, non_blocking=True))
            copied = torch.cuda.Event()
            copied.record(side)
        if sent is not None:
            yield received(*sent)
        sent = batch, copied
    if sent is not None:
        yield received(*sent)


def received(batch: tuple[torch.Tensor, torch.Tensor], copied: "torch.cuda.Event") -> tuple[torch.Tensor, torch.Tensor]:
    """A batch sent on the side stream, made safe to use (and to free) on the current one. The current stream waits
    for this batch's copy alone (its event), not for the next batch's, queued behind it on the side stream."""
    current = torch.cuda.current_stream(batch[0].device)
    current.wait_event(copied)
    for tensor in batch:
        tensor.record_stream(current)
    acts, layers = batch
    return acts.float(), layers

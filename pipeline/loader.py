"""Batches of (activation, layer) rows for SAE training: shuffled, exact per epoch, resumable."""

from dataclasses import dataclass
from typing import Iterator, Protocol

import torch


@dataclass(frozen=True)
class LayerStats:
    """Per-layer statistics of the raw residual stream, for normalization."""

    mean: torch.Tensor  # [n_layers, d_model] float32
    mean_sq_norm: torch.Tensor  # [n_layers] float32: E||x||^2
    count: torch.Tensor  # [n_layers] int64: rows seen per layer


class BatchSource(Protocol):
    """What the trainer reads from: the shard loader, or rows already in memory."""

    d_model: int
    n_layers: int  # layer ids lie in [0, n_layers)
    stats: LayerStats

    def n_train_batches(self) -> int:
        """Full batches in one training epoch (a partial last batch is dropped)."""

    def train_batches(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yields (x: [batch, d_model] float32, layer: [batch] int64) on the device, in epoch order."""

    def val_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The held-out rows in a fixed order, same shapes as training batches."""


def epoch_permutation(n_rows: int, seed: int, epoch: int) -> torch.Tensor:
    """A permutation of row ids that depends only on (seed, epoch): the order of one epoch."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n_rows, generator=generator)


class MemoryLoader:
    """Rows held in memory; the reference the shard loader is measured and tested against."""

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
    ):
        self.acts, self.layers = acts, layers.long()
        self.val_acts = acts[:0] if val_acts is None else val_acts
        self.val_layers = layers[:0].long() if val_layers is None else val_layers.long()
        self.d_model, self.n_layers = acts.shape[1], n_layers
        self.batch_size, self.seed, self.device = batch_size, seed, torch.device(device)
        self.stats = layer_stats_of(acts, self.layers, n_layers)

    def n_train_batches(self) -> int:
        return len(self.acts) // self.batch_size

    def train_batches(self, epoch: int, start_batch: int = 0):
        order = epoch_permutation(len(self.acts), self.seed, epoch)
        for b in range(start_batch, self.n_train_batches()):
            rows = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield self._to_device(self.acts[rows], self.layers[rows])

    def val_batches(self):
        for start in range(0, len(self.val_acts), self.batch_size):
            end = start + self.batch_size
            yield self._to_device(self.val_acts[start:end], self.val_layers[start:end])

    def _to_device(self, acts: torch.Tensor, layers: torch.Tensor):
        return acts.to(self.device, torch.float32), layers.to(self.device)


def layer_stats_of(acts: torch.Tensor, layers: torch.Tensor, n_layers: int) -> LayerStats:
    """Exact per-layer mean and mean squared norm of rows (acts: [n, d], layers: [n])."""
    acts64 = acts.double()
    count = torch.bincount(layers, minlength=n_layers)
    total = torch.zeros(n_layers, acts.shape[1], dtype=torch.float64).index_add_(0, layers, acts64)
    sq = torch.zeros(n_layers, dtype=torch.float64).index_add_(0, layers, acts64.pow(2).sum(1))
    denominator = count.clamp(min=1).double()
    return LayerStats((total / denominator[:, None]).float(), (sq / denominator).float(), count)

"""A sweep of N SAEs on the same tokens: the seed notebook's way against the two-stage pipeline.

Usage: python -m bench.seed_vs_pipeline --model qwen2.5-coder-0.5b-instruct --n-tokens 3K --sweep k=16,32,48,64

Seed: every SAE step runs the model's forward pass (`output_hidden_states=True`) on a batch of
documents and trains on one random layer per token, so N SAEs cost N forward passes over the
tokens plus N trainings; it runs over the documents cache-acts ran, for the steps the pipeline trains.
Pipeline: one `cache-acts` over the tokens, then one `train-sae` sweep that feeds each batch read
from the shards to all N SAEs. Both train with the same trainer code.
"""

import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import typer
from rich.console import Console
from rich.table import Table

import pipeline.cache as cache_module
from pipeline.cache import CacheConfig, cache_activations, pack_batches
from pipeline.corpus import CorpusConfig
from pipeline.devices import resolve_device, resolve_model_dtype
from pipeline.loader import LayerStats, LoaderConfig, ShardLoader
from pipeline.models import load_model
from pipeline.positions import SkippedPositions
from pipeline.store import Store
from pipeline.train import Run, TrainConfig, expand_sweep, train_on_store
from pipeline.units import parse_count
from pipeline.windows import choose_pairs


class SeedSource:
    """Shapes and normalization statistics for a Run; the seed loop feeds it batches directly."""

    def __init__(self, d_model: int, n_layers: int, stats: LayerStats, n_batches: int):
        self.d_model, self.n_layers, self.stats, self.n_batches = d_model, n_layers, stats, n_batches

    def n_train_batches(self) -> int:
        return self.n_batches


def seed_training(loaded, cfg: TrainConfig, store: Store, stats: LayerStats, device, batch_tokens: int) -> float:
    """One SAE the seed's way: a forward pass per training batch over the documents cache-acts ran (the store's
    training split, packed as stage one packs them), for as many steps as the pipeline trains; returns seconds."""
    tokenizer, model = loaded.tokenizer, loaded.model
    skipped = SkippedPositions.from_dict(store.metadata["skipped"])
    layers, seed = store.metadata["layers"], store.metadata["corpus"]["seed"]
    docs = list(store.documents(split="train"))
    source = SeedSource(loaded.info.d_model, store.n_hidden_states, stats, cfg.steps)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        run = Run(cfg, Path(out), source, device, resume=False)
        buffer_x, buffer_layer = [], []
        while run.step < cfg.steps:  # epochs over the same documents, as the pipeline's loader goes over its rows
            for packed in pack_batches(iter(docs), batch_tokens, tokenizer.pad_token_id or 0, window=len(docs)):
                with torch.no_grad():
                    states = model.model(input_ids=packed.input_ids.to(device), attention_mask=packed.attention_mask.to(device),
                                         output_hidden_states=True, use_cache=False).hidden_states
                for b, (doc, tokens) in enumerate(zip(packed.doc_index, packed.doc_tokens)):
                    positions, chosen = choose_pairs(doc, layers, 1, skipped.mask(tokens), seed)
                    buffer_x.append(torch.stack([states[layer][b, pos] for pos, layer in zip(positions, chosen)]).float())
                    buffer_layer.append(torch.from_numpy(chosen.astype(np.int64)))
                x, layer = torch.cat(buffer_x), torch.cat(buffer_layer).to(device)
                while len(x) >= cfg.batch_size and run.step < cfg.steps:
                    run.train_step(x[: cfg.batch_size], layer[: cfg.batch_size])
                    x, layer = x[cfg.batch_size :], layer[cfg.batch_size :]
                buffer_x, buffer_layer = [x], [layer]
                if run.step == cfg.steps:
                    break
        run.sync()  # the last step's metrics: all the steps are done
    return time.perf_counter() - start


def main(
    model: str = "qwen2.5-coder-0.5b-instruct",
    n_tokens: str = "3K",
    sweep: list[str] = typer.Option(["k=16,32,48,64"], help="The sweep both ways train."),
    batch_size: int = 256,
    batch_tokens: int = 4096,
    max_seq_len: int = 512,
    device: str = "auto",
):
    torch_device = resolve_device(device)
    loaded = load_model(model, torch_device, resolve_model_dtype("auto", torch_device))
    cache_module.load_model = lambda *args, **kwargs: loaded  # the model stays loaded across both measurements
    n_pairs = parse_count(n_tokens)
    base = TrainConfig(batch_size=batch_size, steps=n_pairs // batch_size, val_every=10**9, save_every=10**9, warmup_steps=5)
    runs = expand_sweep(base, sweep)
    with tempfile.TemporaryDirectory() as scratch:
        shards = Path(scratch) / "shards"
        start = time.perf_counter()
        cache_activations(CacheConfig(model=model, out=str(shards), n_tokens=n_pairs, batch_tokens=batch_tokens, max_seq_len=max_seq_len,
                                      device=str(torch_device)), CorpusConfig(), progress=False)
        cache_s = time.perf_counter() - start
        start = time.perf_counter()
        train_on_store(LoaderConfig(shards=str(shards)), base, Path(scratch) / "runs", sweep, torch_device, resume=False, progress=False)
        sweep_s = time.perf_counter() - start
        store = Store(shards)
        stats = ShardLoader(store, batch_size).stats  # the seed way gets the same normalization, for free
        seed_s = [seed_training(loaded, cfg, store, stats, torch_device, batch_tokens) for _, cfg in runs]
    table = Table(title=f"{len(runs)} SAEs on {n_pairs:,} pairs of {loaded.info.name}, {torch_device}")
    for column in ("way", "stage", "seconds"):
        table.add_column(column, justify="right")
    for (name, _), seconds in zip(runs, seed_s):
        table.add_row("seed", f"forward + train {name}", f"{seconds:.1f}")
    table.add_row("seed", "total", f"{sum(seed_s):.1f}")
    table.add_row("pipeline", "cache-acts once", f"{cache_s:.1f}")
    table.add_row("pipeline", f"train-sae sweep of {len(runs)}", f"{sweep_s:.1f}")
    table.add_row("pipeline", "total", f"{cache_s + sweep_s:.1f}")
    table.add_row("", "speed-up", f"{sum(seed_s) / (cache_s + sweep_s):.2f}x")
    Console().print(table)


if __name__ == "__main__":
    typer.run(main)

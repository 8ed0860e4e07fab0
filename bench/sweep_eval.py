"""Evaluating a sweep: eval-sae on each run one by one against eval-sae on the sweep's folder.

Usage: python -m bench.sweep_eval --model qwen2.5-coder-0.5b-instruct --sweep k=16,32,64 --layers 0,12,24 --n-docs 8

Caches a small store, trains the sweep for a few steps (the cost of evaluating does not depend on the weights), then
times `run_eval` on each run in turn, as n commands would, and `run_sweep_eval` on the folder, which runs the model
clean and ablated once for all the SAEs. Both load the model from the same local copy; the passes column counts the
model's forward passes.
"""

import tempfile
import time
from dataclasses import replace
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

import pipeline.evaluate as evaluate_module
from pipeline.cache import CacheConfig, cache_activations
from pipeline.corpus import CorpusConfig
from pipeline.devices import resolve_device
from pipeline.evaluate import EvalConfig, run_eval
from pipeline.loader import LoaderConfig
from pipeline.sweep_eval import run_sweep_eval
from pipeline.train import TrainConfig, train_on_store
from pipeline.units import parse_count


def counted_passes() -> list[int]:
    """Counts the model's forward passes of the evaluation from now on: one entry per pass."""
    passes, forward = [], evaluate_module.next_token_log_probs

    def counting(*args):
        passes.append(1)
        return forward(*args)

    evaluate_module.next_token_log_probs = counting
    return passes


def main(
    model: str = "qwen2.5-coder-0.5b-instruct",
    n_tokens: str = "10K",
    val_fraction: float = typer.Option(0.3, help="Documents held out: the evaluation scores n-docs of them."),
    sweep: list[str] = typer.Option(["k=16,32,64"], help="The sweep trained, then evaluated both ways."),
    layers: str = "0,12,24",
    n_docs: int = 8,
    batch_tokens: int = 2048,
    max_seq_len: int = 512,
    device: str = "auto",
):
    torch_device = resolve_device(device)
    passes = counted_passes()
    with tempfile.TemporaryDirectory() as scratch:
        shards, runs = Path(scratch) / "shards", Path(scratch) / "sweep"
        cache_activations(CacheConfig(model=model, out=str(shards), n_tokens=parse_count(n_tokens), max_seq_len=max_seq_len,
                                      device=str(torch_device)), CorpusConfig(val_fraction=val_fraction), progress=False)
        base = TrainConfig(batch_size=256, steps=4, warmup_steps=1, val_every=10**9, save_every=10**9)
        train_on_store(LoaderConfig(shards=str(shards)), base, runs, sweep, torch_device, resume=False, progress=False)
        config = EvalConfig(sae=str(runs), layers=layers, n_docs=n_docs, batch_tokens=batch_tokens, device=str(torch_device))
        run_folders = sorted(path.parent for path in runs.glob("*/cfg.json"))
        start = time.perf_counter()
        for run in run_folders:
            run_eval(replace(config, sae=str(run), out=str(Path(scratch) / "alone" / run.name)), progress=False)
        alone_s, alone_passes = time.perf_counter() - start, len(passes)
        passes.clear()
        start = time.perf_counter()
        evaluated = run_sweep_eval(config, progress=False).runs
        sweep_s, sweep_passes = time.perf_counter() - start, len(passes)
    n_tokens_scored = evaluated[0].results[0].n_tokens
    table = Table(title=f"{len(run_folders)} SAEs evaluated at hidden states {layers} on {n_tokens_scored:,} held-out tokens of "
                        f"{evaluated[0].config.model}, {torch_device}")
    for column in ("way", "seconds", "forward passes"):
        table.add_column(column, justify="right")
    table.add_row(f"eval-sae on each of the {len(run_folders)} runs", f"{alone_s:.1f}", f"{alone_passes:,}")
    table.add_row("eval-sae on the sweep's folder", f"{sweep_s:.1f}", f"{sweep_passes:,}")
    table.add_row("speed-up", f"{alone_s / sweep_s:.2f}x", f"{alone_passes / sweep_passes:.2f}x")
    Console().print(table)


if __name__ == "__main__":
    typer.run(main)

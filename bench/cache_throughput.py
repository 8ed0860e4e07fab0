"""Stage one against the bare forward pass, on the same batches, in one run.

Usage: python -m bench.cache_throughput --model qwen2.5-coder-0.5b-instruct --n-tokens 4K
       python -m bench.cache_throughput --model random:qwen2.5-coder-1.5b --n-tokens 2M --batch-tokens 16384   (GPU)

`random:qwen2.5-coder-1.5b` builds a model of that shape with random weights (speed does not depend
on the weights). The bare pass is `model.model(..., output_hidden_states=True)` over exactly the
batches cache-acts formed; the ratio of the two model-token rates is the figure. cache-acts is timed twice: the whole
run, as its summary line reports it, and its windows alone, from the model's start on the first window to its end on
the last (a CUDA sync closes each window), which leaves out the fixed start and end: waiting for the first window to be
planned (on a GPU, in a process that takes seconds to spawn), the writer's last shards, stopping the planner.
"""

import itertools
import os
import tempfile
import time
from pathlib import Path

import torch
import typer
from rich.console import Console
from rich.table import Table

import pipeline.cache as cache_module
from bench.tables import add_row
from pipeline.cache import CacheConfig, Packed, cache_activations, pack_batches
from pipeline.corpus import CorpusConfig
from pipeline.devices import resolve_device, resolve_model_dtype
from pipeline.models import LoadedModel, ModelInfo, load_model
from pipeline.store import Store
from pipeline.units import parse_count

RANDOM_SHAPES = {  # Qwen2.5-Coder shapes, for speed figures without the weights
    "qwen2.5-coder-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                               num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-coder-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                               num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
}


def tiny_tokenizer():
    """The tests' tiny byte-level tokenizer with Qwen's special tokens and chat template (tests/conftest.py)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import build_tiny_tokenizer

    return build_tiny_tokenizer()


def random_model(shape: str, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """A Qwen2 of a real model's shape with random weights, plus the tiny test tokenizer (ids stay in range)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**RANDOM_SHAPES[shape], max_position_embeddings=4096, attn_implementation="sdpa")
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(dtype).eval().requires_grad_(False)
    info = ModelInfo(f"random:{shape}", f"random:{shape}", config.hidden_size, config.num_hidden_layers,
                     config.num_hidden_layers + 1, config.vocab_size)
    return LoadedModel(model, tiny_tokenizer(), info)


def main(
    model: str = typer.Option("qwen2.5-coder-0.5b-instruct", help="Preset, folder, or random:<shape> for a random-weight model."),
    n_tokens: str = typer.Option("4K", help="Pairs cache-acts stores (one layer per token by default)."),
    batch_tokens: int = 4096,
    max_seq_len: int = 1024,
    layers_per_token: str = "1",
    device: str = "auto",
    model_dtype: str = typer.Option("auto", help="cache-acts --model-dtype, for both measurements."),
    repeats: int = 2,
):
    torch_device = resolve_device(device)
    dtype = resolve_model_dtype(model_dtype, torch_device)
    loaded = random_model(model.removeprefix("random:"), torch_device, dtype) if model.startswith("random:") else load_model(model, torch_device, dtype)
    cache_module.load_model = lambda *args, **kwargs: loaded  # one model in memory for both measurements
    n_pairs = parse_count(n_tokens)
    console = Console(width=160)
    table = Table(title=f"stage one vs bare forward: {loaded.info.name}, {torch_device}, {dtype}, batch_tokens {batch_tokens}")
    for column in ("repeat", "bare fwd tok/s", "cache-acts tok/s", "ratio", "windows tok/s", "windows ratio", "start+end s",
                   "bytes/pair", "compression"):
        table.add_column(column, justify="right")
    warm_up(loaded)
    clock = cache_module._cache_window = WindowClock(cache_module._cache_window, torch_device)
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(repeats):
            out = Path(scratch) / f"store{repeat}"
            config = CacheConfig(model=model, out=str(out), n_tokens=n_pairs, batch_tokens=batch_tokens, max_seq_len=max_seq_len,
                                 layers_per_token=layers_per_token, model_dtype=model_dtype, device=str(torch_device))
            clock.began = None
            report = cache_activations(config, CorpusConfig(), console=console, progress=False)
            windows_rate = report.n_model_tokens / (clock.ended - clock.began)
            store = Store(out)
            bare_tokens, bare_s = bare_forward(loaded, store, config)
            bare_rate, cache_rate = bare_tokens / bare_s, report.model_tokens_per_s
            acts_bytes = sum(f.stat().st_size for f in out.rglob("*") if f.is_file() and "/acts/" in str(f))
            all_bytes = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
            raw = store.n_pairs * store.d_model * {"bf16": 2, "float16": 2, "float32": 4}[store.dtype]
            row = (str(repeat), f"{bare_rate:,.0f}", f"{cache_rate:,.0f}", f"{cache_rate / bare_rate:.2f}", f"{windows_rate:,.0f}",
                   f"{windows_rate / bare_rate:.2f}", f"{report.seconds - (clock.ended - clock.began):.2f}",
                   f"{all_bytes / store.n_pairs:,.0f}", f"{raw / acts_bytes:.3f}")
            add_row(table, *row)
    console.print(table)


class WindowClock:
    """cache-acts' work on each packing window, timed: when the model began the first one and when it ended the last."""

    def __init__(self, cache_window, device: torch.device):
        self.cache_window, self.device, self.began, self.ended = cache_window, device, None, None

    def __call__(self, *args, **kwargs) -> int:
        if self.began is None:
            self.began = time.perf_counter()
        n_model_tokens = self.cache_window(*args, **kwargs)
        if self.device.type == "cuda":
            torch.cuda.synchronize()  # the window's batches have run
        self.ended = time.perf_counter()
        return n_model_tokens


def warm_up(loaded: LoadedModel) -> None:
    device = next(loaded.model.parameters()).device
    with torch.no_grad():
        loaded.model.model(input_ids=torch.ones(2, 128, dtype=torch.long, device=device), use_cache=False)


def cached_batches(store: Store, config: CacheConfig, pad_id: int) -> list[Packed]:
    """The batches cache-acts formed: the store keeps the documents in the order they were packed, and each packing
    window (document // pack_window) was packed on its own."""
    windows = itertools.groupby(store.documents(), key=lambda doc: doc[0] // config.pack_window)
    return [packed for _, docs in windows for packed in pack_batches(docs, config.batch_tokens, pad_id)]


def bare_forward(loaded: LoadedModel, store: Store, config: CacheConfig) -> tuple[int, float]:
    """Times model.model(..., output_hidden_states=True) over the batches cache-acts formed from the store's documents."""
    batches = cached_batches(store, config, loaded.tokenizer.pad_token_id or 0)
    device = next(loaded.model.parameters()).device
    n_tokens, start = 0, time.perf_counter()
    with torch.no_grad():
        for packed in batches:
            ids, mask = packed.input_ids.to(device), packed.attention_mask.to(device)
            loaded.model.model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
            n_tokens += int(packed.attention_mask.sum())
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n_tokens, time.perf_counter() - start


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    typer.run(main)

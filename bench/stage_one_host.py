"""Stage one's host work alone: how many pairs/s the host lets `cache-acts` store, whatever the model's speed.

Usage: python -m bench.stage_one_host --n-tokens 300K [--tokenizer qwen2.5-coder-0.5b-instruct]
`cache-acts` runs as it does (the next packing window mined, tokenized and planned ahead, the main thread forming
batches, the writer's threads gathering, compressing and writing shards), except that the device's work is
replaced: the forward pass hands back copies of rows from a pool of random bf16 activations, and the
per-layer statistics (milliseconds of a GPU) are zeros. The model is a Qwen2 of --d-model and --n-layers on the
meta device, never run. Stage one can reach the bare forward pass's rate (bench.cache_throughput) only where this
rate is higher. The windows are planned in a process of their own, as on a GPU, and in a thread, as on a CPU
(--plan-in). CPU s: CPU time (user and system) of every thread and of the planning process over the whole call, so
with the set-up that seconds leaves out (the store's creation, fingerprinting the mined files: about 5% of it on
dev-cpu); page faults: the minor ones, each a fresh page of memory touched, over the same.
"""

import itertools
import os
import tempfile

import torch
import typer
from rich.console import Console
from rich.table import Table

import pipeline.cache as cache_module
from bench.cache_throughput import tiny_tokenizer
from bench.resources import usage
from bench.tables import add_row
from pipeline.cache import CacheConfig, cache_activations
from pipeline.corpus import CorpusConfig
from pipeline.models import LoadedModel, ModelInfo, load_model
from pipeline.units import parse_count


def stand_in_model(tokenizer_spec: str, d_model: int, n_layers: int) -> LoadedModel:
    """A Qwen2 of that shape on the meta device (never run) with the tiny test tokenizer or a model's tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = tiny_tokenizer() if tokenizer_spec == "tiny" else load_model(tokenizer_spec).tokenizer
    config = Qwen2Config(hidden_size=d_model, intermediate_size=8, num_hidden_layers=n_layers, num_attention_heads=1,
                         num_key_value_heads=1, vocab_size=len(tokenizer))
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config).eval().requires_grad_(False)
    info = ModelInfo(f"stand-in:{d_model}x{n_layers}", "stand-in", d_model, n_layers, n_layers + 1, len(tokenizer))
    return LoadedModel(model, tokenizer, info)


class PoolRows:
    """The forward pass's stand-in: each selected row a copy of the next row of a pool of random activations."""

    def __init__(self, d_model: int, n_rows: int = 65536):
        self.pool, self.next = (torch.randn(n_rows, d_model) * 3).bfloat16(), 0

    def capture_rows(self, model, input_ids, attention_mask, selections: dict) -> dict[int, torch.Tensor]:
        captured = {}
        for layer, (batch_index, _) in selections.items():
            rows = (self.next + torch.arange(len(batch_index))) % len(self.pool)
            captured[layer], self.next = self.pool[rows], int(rows[-1]) + 1
        return captured


def zero_sums(acts: torch.Tensor, layers: torch.Tensor, n_layers: int, kept: torch.Tensor | None = None):
    return (torch.zeros(n_layers, dtype=torch.int64), torch.zeros(n_layers, acts.shape[1], dtype=torch.float64),
            torch.zeros(n_layers, dtype=torch.float64))


def main(
    n_tokens: str = typer.Option("300K", help="Pairs each repeat stores (one per token by default)."),
    tokenizer: str = typer.Option("tiny", help="tiny (the test tokenizer, as bench.cache_throughput's random: models "
                                               "use), or a preset or folder whose tokenizer to use."),
    d_model: int = typer.Option(1536, help="Width of the rows (1536: Qwen2.5-Coder-1.5B)."),
    n_layers: int = typer.Option(28, help="Decoder layers (28: Qwen2.5-Coder-1.5B)."),
    batch_tokens: int = typer.Option(16384, help="cache-acts --batch-tokens."),
    max_seq_len: int = typer.Option(1024, help="cache-acts --max-seq-len."),
    plan_in: str = typer.Option("process,thread", help="Where the windows are planned (read, tokenized, their pairs "
                                                      "chosen), each measured in turn: process (as on a GPU), thread."),
    repeats: int = 2,
):
    torch.set_num_threads(1)  # the main thread's torch work stands for a GPU's: it should not take every CPU
    loaded, pool = stand_in_model(tokenizer, d_model, n_layers), PoolRows(d_model)
    cache_module.load_model = lambda *args, **kwargs: loaded
    cache_module.capture_rows, cache_module.layer_sum_tensors = pool.capture_rows, zero_sums
    n_pairs = parse_count(n_tokens)
    table = Table(title=f"stage one without the model's work: {loaded.info.name}, tokenizer {tokenizer}, batch_tokens "
                        f"{batch_tokens}, {os.cpu_count()} CPUs")
    for column in ("planned in", "repeat", "seconds", "pairs/s", "model tokens/s", "CPU s", "CPU us/pair", "page faults/pair"):
        table.add_column(column, justify="right")
    with tempfile.TemporaryDirectory() as scratch:
        for repeat, place in itertools.product(range(repeats), plan_in.split(",")):
            cache_module.PLANNED_IN_A_PROCESS = {"cpu"} if place == "process" else set()
            config = CacheConfig(model=loaded.info.name, out=f"{scratch}/{place}{repeat}", n_tokens=n_pairs, batch_tokens=batch_tokens,
                                 max_seq_len=max_seq_len, device="cpu", model_dtype="bf16")
            before = usage()
            report = cache_activations(config, CorpusConfig(), progress=False)
            cpu, faults = (b - a for a, b in zip(before, usage()))
            pairs = report.n_pairs_written
            add_row(table, place, str(repeat), f"{report.seconds:.2f}", f"{pairs / report.seconds:,.0f}", f"{report.model_tokens_per_s:,.0f}",
                    f"{cpu:.2f}", f"{cpu / pairs * 1e6:.1f}", f"{faults / pairs:.2f}")
    Console(width=160).print(table)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    typer.run(main)

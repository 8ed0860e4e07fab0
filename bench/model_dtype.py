"""The model in bf16 against float32 on the same documents: how far its hidden states and its next-token
predictions move, and how much faster it runs (cache-acts --model-dtype).

Usage: python -m bench.model_dtype --model qwen2.5-coder-0.5b-instruct --n-docs 12

Both models see each document of the default mined corpus alone, one after the other; only the positions
cache-acts records count (not the first, special tokens or the chat's shared start). Per hidden state:
the relative error ||h_bf16 - h_f32|| / ||h_f32|| and the error's share of the float32 states' variance
(what an SAE's FVU would be if it reconstructed the float32 states exactly as bf16 does).
"""

import itertools
import time

import numpy as np
import torch
import typer
from rich.console import Console
from rich.table import Table

from bench.tables import add_row
from pipeline.corpus import CorpusConfig, iter_documents, tokenize_document
from pipeline.devices import resolve_device
from pipeline.models import load_model
from pipeline.positions import skipped_positions

DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16}


def main(
    model: str = typer.Option("qwen2.5-coder-0.5b-instruct", help="Preset or folder."),
    n_docs: int = typer.Option(12, help="Documents of the default mined corpus."),
    max_seq_len: int = 512,
    device: str = "auto",
):
    torch_device = resolve_device(device)
    models = {name: load_model(model, torch_device, dtype) for name, dtype in DTYPES.items()}
    tokenizer = models["float32"].tokenizer
    corpus = CorpusConfig()
    skipped = skipped_positions(tokenizer, True, True, corpus.system_prompt)
    documents = [tokenize_document(doc, tokenizer, max_seq_len) for doc in itertools.islice(iter_documents(corpus), n_docs)]

    info = models["float32"].info
    error, total = torch.zeros(info.n_hidden_states, dtype=torch.float64), torch.zeros(info.n_hidden_states, dtype=torch.float64)
    row_sums = torch.zeros(info.n_hidden_states, info.d_model, dtype=torch.float64)
    seconds, losses = dict.fromkeys(DTYPES, 0.0), dict.fromkeys(DTYPES, 0.0)
    kl, n_kept, n_predicted = 0.0, 0, 0
    for ids in documents:
        input_ids = torch.tensor([ids], device=torch_device)
        keep = torch.from_numpy(~skipped.mask(np.asarray(ids))).to(torch_device)
        predicted = keep[1:]  # the predictions of the kept positions' tokens
        states, log_probs = {}, {}
        for name, loaded in models.items():
            start = time.perf_counter()
            with torch.no_grad():
                out = loaded.model(input_ids, output_hidden_states=True, use_cache=False)
            if torch_device.type == "cuda":
                torch.cuda.synchronize()
            seconds[name] += time.perf_counter() - start
            states[name] = torch.stack([h[0][keep].double() for h in out.hidden_states]).cpu()
            log_probs[name] = out.logits[0, :-1][predicted].float().log_softmax(-1)
            losses[name] -= log_probs[name].gather(1, input_ids[0, 1:][predicted][:, None]).sum().item()
        reference = states["float32"]
        error += (states["bf16"] - reference).pow(2).sum((1, 2))
        total += reference.pow(2).sum((1, 2))
        row_sums += reference.sum(1)
        kl += (log_probs["float32"].exp() * (log_probs["float32"] - log_probs["bf16"])).sum().item()
        n_kept, n_predicted = n_kept + int(keep.sum()), n_predicted + int(predicted.sum())

    console = Console(width=160)
    console.print(f"{info.name} on {torch_device}: {len(documents)} documents, {sum(map(len, documents)):,} tokens, "
                  f"{n_kept:,} positions recorded by cache-acts")
    states_table = Table(title="bf16 hidden states against float32")
    for column in ("hidden state", "relative error", "share of variance"):
        states_table.add_column(column, justify="right")
    variance = total - row_sums.pow(2).sum(1) / n_kept
    for layer in range(info.n_hidden_states):
        add_row(states_table, str(layer), f"{(error[layer] / total[layer]).sqrt():.4f}", f"{error[layer] / variance[layer]:.2e}")
    console.print(states_table)
    model_table = Table(title=f"the whole model (KL from float32 to bf16: {kl / n_predicted:.2e} nats per token)")
    for column in ("model dtype", "tok/s", "next-token loss"):
        model_table.add_column(column, justify="right")
    for name in DTYPES:
        add_row(model_table, name, f"{sum(map(len, documents)) / seconds[name]:,.0f}", f"{losses[name] / n_predicted:.4f}")
    print(f"KL {kl / n_predicted:.2e}", flush=True)
    console.print(model_table)

if __name__ == "__main__":
    typer.run(main)

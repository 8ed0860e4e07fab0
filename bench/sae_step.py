"""Rows/s of one SAE training step, dense against sparse, to set decoder="auto". Run: python -m bench.sae_step

The step is the SAE's part of Run.train_step: forward with AuxK on (a fraction of the latents marked dead),
backward, the decoder-gradient projection, Adam and the decoder renormalization; float32 on the CPU, bf16
autocast on CUDA. Each path runs the same rows from the same initialization; the two alternate, best of --repeats.
"""

import time

import torch
import typer
from rich.console import Console
from rich.table import Table

from pipeline.cache import resolve_device
from pipeline.sae import SAEConfig, TopKSAE

N_LAYERS, AUXK_ALPHA, WEIGHT_DECAY = 29, 1 / 32, 1e-4  # train-sae's defaults


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """"4x32,16x64" -> [(4, 32), (16, 64)]: (expansion, k) pairs."""
    return [tuple(int(part) for part in shape.split("x")) for shape in text.split(",")]


def training_step(sae: TopKSAE, optimizer: torch.optim.Optimizer, x, layer, dead_mask, device: torch.device):
    """Forward, backward and optimizer step, as Run.train_step does them."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        out = sae(x, layer, dead_mask)
    loss = (out.x_hat_normalized.float() - out.x_normalized.float()).pow(2).mean() + AUXK_ALPHA * out.auxk_loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    sae.remove_gradient_parallel_to_decoder_directions()
    optimizer.step()
    sae.set_decoder_norm_to_unit_norm()


def seconds_per_step(sae, optimizer, x, layer, dead_mask, device: torch.device, steps: int) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        training_step(sae, optimizer, x, layer, dead_mask, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main(
    batch_size: int = typer.Option(1024, help="Rows per step."),
    d_model: int = typer.Option(1536, help="Width of the activations (Qwen2.5-Coder-1.5B: 1536)."),
    shapes: str = typer.Option("4x32,16x64", help="EXPANSIONxK pairs to measure, comma-separated."),
    dead_fraction: float = typer.Option(0.05, help="Fraction of the latents marked dead, so AuxK runs."),
    steps: int = typer.Option(2, help="Timed steps per repeat."),
    repeats: int = typer.Option(5, help="Repeats per path; the fastest counts."),
    device: str = typer.Option("auto", help="cpu, cuda or auto."),
):
    torch_device = resolve_device(device)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, d_model, generator=generator).to(torch_device)
    layer = torch.randint(0, N_LAYERS, (batch_size,), generator=generator).to(torch_device)
    title = f"SAE step: d_model {d_model}, batch {batch_size}, {torch_device}, {torch.get_num_threads()} threads, " \
            f"{dead_fraction:.0%} dead"
    table = Table(title=title)
    for column in ("expansion", "k", "k / n_latents", "k_aux", "dense rows/s", "sparse rows/s", "speed-up"):
        table.add_column(column, justify="right")
    for expansion, k in parse_shapes(shapes):
        n_latents = expansion * d_model
        dead_mask = (torch.rand(n_latents, generator=generator) < dead_fraction).to(torch_device)
        runs = {}
        for decoder in ("dense", "sparse"):
            torch.manual_seed(0)
            sae = TopKSAE(SAEConfig(d_model, N_LAYERS, expansion, k, decoder=decoder)).to(torch_device)
            optimizer = torch.optim.Adam(sae.parameters(), lr=1e-4, weight_decay=WEIGHT_DECAY)
            training_step(sae, optimizer, x, layer, dead_mask, torch_device)  # warm-up; Adam allocates its state
            runs[decoder] = (sae, optimizer)
        best = {decoder: float("inf") for decoder in runs}
        for _ in range(repeats):
            for decoder, (sae, optimizer) in runs.items():
                seconds = seconds_per_step(sae, optimizer, x, layer, dead_mask, torch_device, steps)
                best[decoder] = min(best[decoder], seconds)
        k_aux = runs["sparse"][0].k_aux(dead_mask)
        dense, sparse = batch_size / best["dense"], batch_size / best["sparse"]
        table.add_row(str(expansion), str(k), f"1/{n_latents // k}", str(k_aux), f"{dense:,.0f}", f"{sparse:,.0f}",
                      f"{sparse / dense:.2f}x")
        del runs
    Console().print(table)


if __name__ == "__main__":
    typer.run(main)

"""Rows/s of one SAE training step, dense against sparse (and its Triton kernels on CUDA), to set decoder="auto".
Run: python -m bench.sae_step   (on a GPU: --device cuda --batch-size 4096 --decoders dense,sparse,triton)

The step is the SAE's part of Run.train_step: forward with AuxK on (a fraction of the latents marked dead),
backward, the decoder-gradient projection, Adam and the decoder renormalization; float32 on the CPU, bf16
autocast on CUDA. Each path runs the same rows from the same initialization; they alternate, best of --repeats.
"""

import time

import torch
import typer
from rich.console import Console
from rich.table import Table

from pipeline.cache import resolve_device
from pipeline.sae import SAEConfig, TopKSAE
from pipeline.sparse_topk import TORCH_KERNELS

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


def print_profile(sae, optimizer, x, layer, dead_mask, device: torch.device, title: str):
    """Where one step's time goes: the ops with the most self time over three steps, device time on CUDA."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profile:
        seconds_per_step(sae, optimizer, x, layer, dead_mask, device, steps=3)
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    Console().print(f"[bold]{title}[/bold]")
    print(profile.key_averages().table(sort_by=sort_by, row_limit=15))


def main(
    batch_size: int = typer.Option(1024, help="Rows per step."),
    d_model: int = typer.Option(1536, help="Width of the activations (Qwen2.5-Coder-1.5B: 1536)."),
    shapes: str = typer.Option("4x32,16x64", help="EXPANSIONxK pairs to measure, comma-separated."),
    decoders: str = typer.Option("dense,sparse", help="Training steps to compare (SAEConfig.decoder), the first "
                                                      "the baseline: dense, sparse, triton."),
    dead_fraction: float = typer.Option(0.05, help="Fraction of the latents marked dead, so AuxK runs."),
    steps: int = typer.Option(2, help="Timed steps per repeat."),
    repeats: int = typer.Option(5, help="Repeats per path; the fastest counts."),
    profile: bool = typer.Option(False, help="Also print each step's top ops from torch.profiler."),
    device: str = typer.Option("auto", help="cpu, cuda or auto."),
):
    torch_device = resolve_device(device)
    names = decoders.split(",")
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, d_model, generator=generator).to(torch_device)
    layer = torch.randint(0, N_LAYERS, (batch_size,), generator=generator).to(torch_device)
    title = f"SAE step: d_model {d_model}, batch {batch_size}, {torch_device}, {torch.get_num_threads()} threads, " \
            f"{dead_fraction:.0%} dead"
    table = Table(title=title)
    for column in ("expansion", "k", "k / n_latents", "k_aux", *(f"{name} rows/s" for name in names),
                   *(f"{name} speed-up" for name in names[1:])):
        table.add_column(column, justify="right")
    for expansion, k in parse_shapes(shapes):
        n_latents = expansion * d_model
        dead_mask = (torch.rand(n_latents, generator=generator) < dead_fraction).to(torch_device)
        runs = {}
        for decoder in names:
            torch.manual_seed(0)
            sae = TopKSAE(SAEConfig(d_model, N_LAYERS, expansion, k, decoder=decoder)).to(torch_device)
            if decoder == "triton" and sae.kernels is TORCH_KERNELS:
                raise typer.BadParameter("the triton step runs on CUDA only (or on the CPU with TRITON_INTERPRET=1)")
            optimizer = torch.optim.Adam(sae.parameters(), lr=1e-4, weight_decay=WEIGHT_DECAY)
            training_step(sae, optimizer, x, layer, dead_mask, torch_device)  # warm-up; Adam allocates its state
            runs[decoder] = (sae, optimizer)
        best = {decoder: float("inf") for decoder in runs}
        for _ in range(repeats):
            for decoder, (sae, optimizer) in runs.items():
                seconds = seconds_per_step(sae, optimizer, x, layer, dead_mask, torch_device, steps)
                best[decoder] = min(best[decoder], seconds)
        rates = [batch_size / best[name] for name in names]
        k_aux = runs[names[0]][0].k_aux(int(dead_mask.sum()))
        table.add_row(str(expansion), str(k), f"1/{n_latents // k}", str(k_aux), *(f"{rate:,.0f}" for rate in rates),
                      *(f"{rate / rates[0]:.2f}x" for rate in rates[1:]))
        if profile:
            for decoder, (sae, optimizer) in runs.items():
                print_profile(sae, optimizer, x, layer, dead_mask, torch_device, f"{decoder}, {expansion}x/k{k}")
        del runs
    Console(width=160).print(table)


if __name__ == "__main__":
    typer.run(main)

"""Rows/s of one SAE training step, dense against sparse (and its Triton kernels on CUDA), to set decoder="auto";
on CUDA also each replayed from CUDA graphs (decoder+graph, TrainConfig.cuda_graph), and with each step's metrics
read back before the next step is queued (+sync) instead of while it runs, as train-sae does.
Run: python -m bench.sae_step   (on a GPU: --device cuda --batch-size 4096 --decoders dense,sparse,triton,triton+graph)

The step is train-sae's own (pipeline/train_step.py): forward with AuxK on (a fraction of the latents marked dead,
the same ones every step), backward, the decoder-gradient projection, Adam, the decoder renormalization, the
dead-latent counter and the metrics, read back once; float32 on the CPU, bf16 autocast on CUDA. Each path runs the
same rows from the same initialization; they alternate, best of --repeats.
"""

import time

import torch
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from bench.tables import add_row
from pipeline.devices import resolve_device
from pipeline.errors import CrosscodersError
from pipeline.sae import SAEConfig, TopKSAE
from pipeline.sparse_topk import TORCH_KERNELS
from pipeline.train import TrainConfig
from pipeline.train_step import TrainStep

N_LAYERS, LR = 29, 1e-4
LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch")


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """"4x32,16x64" -> [(4, 32), (16, 64)]: (expansion, k) pairs."""
    try:
        return [(int(expansion), int(k)) for expansion, k in (shape.split("x") for shape in text.split(","))]
    except ValueError:
        raise typer.BadParameter(f"--shapes {text}: give EXPANSIONxK pairs, e.g. 4x32,16x64") from None


def make_step(name: str, expansion: int, k: int, batch_size: int, d_model: int, device: torch.device) -> TrainStep:
    """The TrainStep of path name: "sparse", "triton+graph", "triton+graph+sync", ..."""
    decoder, *modifiers = name.split("+")
    if set(modifiers) - {"graph", "sync"}:
        raise typer.BadParameter(f"{name}: a path is a decoder, then +graph, +sync or both")
    cfg = TrainConfig(expansion=expansion, k=k, decoder=decoder, lr=LR, batch_size=batch_size, cuda_graph="graph" in modifiers)
    torch.manual_seed(0)
    sae = TopKSAE(cfg.sae_config(d_model, N_LAYERS)).to(device)
    if decoder == "triton" and sae.kernels is TORCH_KERNELS:
        raise typer.BadParameter("the triton step runs on CUDA only (or on the CPU with TRITON_INTERPRET=1)")
    try:
        return TrainStep(sae, cfg, device)
    except CrosscodersError as error:
        raise typer.BadParameter(str(error)) from None


def first_lines(error: BaseException) -> str:
    """The first line of error and of each error it was raised while handling, the first one first: a failed CUDA
    graph capture raises from its end, which only says that an op during the capture failed."""
    chain = [error]
    while chain[-1].__context__ is not None:
        chain.append(chain[-1].__context__)
    return "; then ".join(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}" for e in reversed(chain))


def train_steps(step: TrainStep, x, layer, dead_mask: torch.Tensor, n_steps: int, at_once: bool):
    """n_steps steps on the same rows, each with the latents of dead_mask (and only those) dead; as in train-sae,
    each step's metrics are read back while the next one runs (at_once: before it is queued), the last at the end."""
    counter, n_dead = dead_mask * step.cfg.dead_tokens, int(dead_mask.sum())
    for _ in range(n_steps):
        step.tokens_since_fired.copy_(counter)  # undo the last step's count
        step.dead_capacity = n_dead
        step(x, layer, LR)
        if at_once:
            step.drain()
    step.drain()


def seconds_per_step(step: TrainStep, x, layer, dead_mask: torch.Tensor, n_steps: int, at_once: bool) -> float:
    start = time.perf_counter()
    train_steps(step, x, layer, dead_mask, n_steps, at_once)
    return (time.perf_counter() - start) / n_steps


def print_profile(step: TrainStep, x, layer, dead_mask: torch.Tensor, at_once: bool, device: torch.device, title: str):
    """Where one step's time goes: the ops with the most self time over three steps, device time on CUDA."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profile:
        train_steps(step, x, layer, dead_mask, 3, at_once)
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    Console().print(f"[bold]{title}[/bold]")
    print(profile.key_averages().table(sort_by=sort_by, row_limit=15))
    events = profile.events()
    leaf_calls = sum(event.name.startswith("aten::") and not event.cpu_children for event in events) / 3
    launches = sum(event.name in LAUNCHES for event in events) / 3
    print(f"per step: {leaf_calls:.0f} leaf aten calls" + (f", {launches:.0f} kernel or graph launches" if launches else ""))


def main(
    batch_size: int = typer.Option(1024, help="Rows per step."),
    d_model: int = typer.Option(1536, help="Width of the activations (Qwen2.5-Coder-1.5B: 1536)."),
    shapes: str = typer.Option("4x32,16x64", help="EXPANSIONxK pairs to measure, comma-separated."),
    decoders: str = typer.Option("dense,sparse", help="Training steps to compare, the first the baseline: dense, "
                                                      "sparse, triton (SAEConfig.decoder), each also +graph on CUDA; "
                                                      "+sync reads each step's metrics before the next is queued."),
    dead_fraction: float = typer.Option(0.05, help="Fraction of the latents marked dead, so AuxK runs."),
    steps_per_repeat: int = typer.Option(2, "--steps", help="Timed steps per repeat."),
    repeats: int = typer.Option(5, help="Repeats per path; the fastest counts."),
    profile: bool = typer.Option(False, help="Also print each step's top ops from torch.profiler."),
    device: str = typer.Option("auto", help="cpu, cuda or auto."),
):
    try:
        torch_device = resolve_device(device)
    except CrosscodersError as error:
        raise typer.BadParameter(str(error)) from None
    names = decoders.split(",")
    if profile and torch_device.type == "cuda":  # a CUDA graph captured before the profiler's first use can hang under it
        torch.profiler._utils._init_for_cuda_graphs()  # (pytorch#75504; the workaround PyTorch provides)
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
        steps = {name: make_step(name, expansion, k, batch_size, d_model, torch_device) for name in names}
        for name, step in list(steps.items()):
            try:  # warm-up: Adam's state; with +graph the eager run and the capture
                train_steps(step, x, layer, dead_mask, 3, at_once=False)
            except Exception as error:  # one path failing (a capture, a Triton compilation) leaves the others' figures
                Console(width=160).print(f"[red]{name}, {expansion}x/k{k} failed:[/red]", Text(first_lines(error)))
                del steps[name]
        best = {name: float("inf") for name in names}
        for _ in range(repeats):
            for name, step in steps.items():
                best[name] = min(best[name], seconds_per_step(step, x, layer, dead_mask, steps_per_repeat, "+sync" in name))
        rates = [batch_size / best[name] for name in names]  # 0 for a path that failed
        k_aux = SAEConfig(d_model, N_LAYERS, expansion, k).k_aux(int(dead_mask.sum()))
        row = (str(expansion), str(k), f"1/{n_latents // k}", str(k_aux), *(f"{rate:,.0f}" if rate else "failed" for rate in rates),
               *(f"{rate / rates[0]:.2f}x" if rate and rates[0] else "-" for rate in rates[1:]))
        add_row(table, *row)
        if profile:
            for name, step in steps.items():
                print_profile(step, x, layer, dead_mask, "+sync" in name, torch_device, f"{name}, {expansion}x/k{k}")
        del steps
    Console(width=160).print(table)


if __name__ == "__main__":
    typer.run(main)

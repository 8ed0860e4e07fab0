"""`train-sae`: stage two, train one layer-agnostic TopK SAE (or a sweep of them) on cached activations."""

from pipeline.errors import importing_quietly

with importing_quietly():
    from pathlib import Path

    import typer
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from pipeline.cli import config_command, extra_option, local_path, run_app
    from pipeline.devices import resolve_device
    from pipeline.loader import LoaderConfig
    from pipeline.train import TrainConfig, train_on_store

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
METRICS = ("fvu", "fvu_layer_mean", "mse", "l0", "dead_fraction")  # all of them are in metrics.jsonl


def run(loader: LoaderConfig, train: TrainConfig, out: str, sweep: list[str], resume: bool, device: str) -> None:
    results = train_on_store(loader, train, local_path(out, "--out"), sweep or [], resolve_device(device), resume)
    if not results:  # another process of a torchrun run reports
        return
    title = f"final metrics of the runs in {out}" if sweep else "final metrics"
    table = Table(title=Text(f"{title} (validation when held-out rows exist)"))  # text: a path may hold brackets
    table.add_column("run", overflow="fold")
    for name in METRICS:
        table.add_column(name, justify="right", min_width=len(name))
    for run_dir, metrics in results.items():
        table.add_row(Text(Path(run_dir).name if sweep else out), *(f"{metrics[m]:.4g}" if isinstance(metrics.get(m), (int, float)) else "-" for m in METRICS))
    Console().print(table)


config_command(
    app,
    [LoaderConfig, TrainConfig],
    run,
    extra=[
        extra_option("out", "./runs/sae", "Run folder; a sweep puts each run in a subfolder named by its values.", str),
        extra_option("sweep", None, "FIELD=V1,V2,... (repeatable): train every combination in one pass over the shards.", list[str]),
        extra_option("resume", False, "Continue the run(s) in --out from their last checkpoint.", bool),
        extra_option("device", "auto", "Training device: auto, cpu, cuda, cuda:1, ...", str),
    ],
    help=__doc__,
)


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()

"""`eval-sae`: stage three, splice a trained SAE (or each of a sweep's) into the model at each layer and measure the loss it costs."""

from pathlib import Path

from pipeline.errors import importing_quietly

with importing_quietly():
    import typer
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from pipeline.cli import config_command, local_path, run_app
    from pipeline.evaluate import EvalConfig, LayerEval, average, run_eval, sweep_runs
    from pipeline.layers import layer_ranges
    from pipeline.sweep_eval import SweepEval, run_sweep_eval

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
WIDTH = 110  # the whole table
COLUMNS = {  # header -> LayerEval field
    "CE clean": "ce_clean", "CE SAE": "ce_sae", "CE zero": "ce_zero", "CE mean": "ce_mean",
    "recovered": "recovered_loss", "recovered vs mean": "recovered_loss_mean",
    "KL": "kl", "MSE": "mse", "FVU": "fvu", "L0": "l0",
}


def run(config: EvalConfig) -> None:
    if sweep_runs(local_path(config.sae, "--sae")):
        print_sweep(run_sweep_eval(config))
    else:
        print_layers(*run_eval(config))


def print_layers(results: list[LayerEval], eval_path: Path, plot_path: Path) -> None:
    """One row per hidden state, and their mean."""
    table = metrics_table(f"SAE spliced in, {results[0].n_tokens:,} held-out tokens (CE and KL in nats per token)", "layer", "right")
    for r in results:
        table.add_row(str(r.layer), *(f"{getattr(r, name):.3g}" if getattr(r, name) is not None else "-" for name in COLUMNS.values()))
    table.add_row("mean", *mean_cells(results), style="bold")
    print_table(table)
    Console(stderr=True).print(Text(f"wrote {eval_path}\nwrote {plot_path}"), soft_wrap=True)


def print_sweep(sweep: SweepEval) -> None:
    """One row per run: its metrics averaged over the hidden states; each run's own eval.json holds them per layer."""
    evaluated = sweep.runs
    results = evaluated[0].results
    layers = layer_ranges([r.layer for r in results])
    table = metrics_table(f"SAEs spliced in, mean over hidden states {layers}, {results[0].n_tokens:,} held-out tokens "
                          "(CE and KL in nats per token)", "run", "left")
    names = [Path(run.config.sae).name for run in evaluated]
    for name, run in zip(names, evaluated):
        table.add_row(Text(name), *mean_cells(run.results))
    print_table(table, WIDTH + max(map(len, names)))  # the runs' names whole: they tell the runs apart
    wrote = [f"wrote {run.eval_path} and {run.plot_path.name}" for run in evaluated] + [f"wrote {sweep.summary} and {sweep.frontier.name}"]
    Console(stderr=True).print(Text("\n".join(wrote)), soft_wrap=True)


def mean_cells(results: list[LayerEval]) -> list[str]:
    """Each column's metric averaged over the hidden states, "-" where there is none (L0 of a plain function)."""
    mean = average(results)
    return [f"{mean[name]:.3g}" if name in mean else "-" for name in COLUMNS.values()]


def metrics_table(title: str, first_column: str, justify: str) -> Table:
    table = Table(title=title, box=box.SIMPLE_HEAD)
    table.add_column(first_column, justify=justify)
    for header in COLUMNS:
        table.add_column(header, justify="right")
    return table


def print_table(table: Table, width: int = WIDTH) -> None:
    console = Console()
    console.width = max(console.width, width)  # logs default to 80 columns, which would cut numbers
    console.print(table)


config_command(app, [EvalConfig], run, help=__doc__, memory_advice="lower --batch-tokens, or use --model-dtype bf16 or another --device")


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()

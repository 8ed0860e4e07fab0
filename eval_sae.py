"""`eval-sae`: stage three, splice a trained SAE into the model at each layer and measure the loss it costs."""

from pipeline.errors import importing_quietly

with importing_quietly():
    import typer
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from pipeline.cli import config_command, run_app
    from pipeline.evaluate import EvalConfig, average, run_eval

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
WIDTH = 110  # the whole table
COLUMNS = {  # header -> LayerEval field
    "CE clean": "ce_clean", "CE SAE": "ce_sae", "CE zero": "ce_zero", "CE mean": "ce_mean",
    "recovered": "recovered_loss", "recovered vs mean": "recovered_loss_mean",
    "KL": "kl", "MSE": "mse", "FVU": "fvu", "L0": "l0",
}


def run(config: EvalConfig) -> None:
    results, eval_path, plot_path = run_eval(config)
    table = Table(title=f"SAE spliced in, {results[0].n_tokens:,} held-out tokens (CE and KL in nats per token)", box=box.SIMPLE_HEAD)
    table.add_column("layer", justify="right")
    for header in COLUMNS:
        table.add_column(header, justify="right")
    for r in results:
        table.add_row(str(r.layer), *(f"{getattr(r, name):.3g}" if getattr(r, name) is not None else "-" for name in COLUMNS.values()))
    mean = average(results)
    table.add_row("mean", *(f"{mean[name]:.3g}" if name in mean else "-" for name in COLUMNS.values()), style="bold")
    console = Console()
    console.width = max(console.width, WIDTH)  # logs default to 80 columns, which would cut numbers
    console.print(table)
    Console(stderr=True).print(Text(f"wrote {eval_path}\nwrote {plot_path}"), soft_wrap=True)


config_command(app, [EvalConfig], run, help=__doc__, memory_advice="lower --batch-tokens, or use --model-dtype bf16 or another --device")


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()

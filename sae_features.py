"""`sae-features`: what the SAE's latents mean: density, layer profile, activations, top contexts, promoted and suppressed tokens,
an HTML report; or the latents of a text of one's own (--text)."""

from pipeline.errors import importing_quietly

with importing_quietly():
    import typer
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from pipeline.cli import config_command, local_path, run_app
    from pipeline.evaluate import sweep_runs
    from pipeline.features import DENSE_FREQUENCY, FeaturesConfig, SweepFeatures, breadth_quartiles, explore_features, explore_sweep
    from pipeline.text_latents import explore_text

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def run(features: FeaturesConfig) -> None:
    if features.reads_text:
        explore_text(features, Console())
    elif sweep_runs(local_path(features.sae, "--sae")):
        print_sweep(explore_sweep(features, Console(stderr=True)))
    else:
        explore_features(features, Console())


def print_sweep(found: list[SweepFeatures]) -> None:
    """One row per run: its latents alive, dead and dense, and how many layers they spread over."""
    scan = found[0].scan
    table = Table(title=f"{scan.n_rows:,} {scan.split} rows scanned by each SAE", box=box.SIMPLE_HEAD)
    for header in ("run", "latents", "alive", "dead", f"dense (> {DENSE_FREQUENCY:.0%})", "layers spread over (quartiles)"):
        table.add_column(header, justify="left" if header == "run" else "right")
    for run in found:
        scan = run.scan
        quartiles = breadth_quartiles(scan)
        table.add_row(Text(run.run.name), f"{len(scan.dead):,}", f"{int((~scan.dead).sum()):,}", f"{int(scan.dead.sum()):,}",
                      f"{int(scan.dense.sum()):,}", " / ".join(f"{q:.1f}" for q in quartiles) if quartiles else "-")
    Console().print(table)
    Console(stderr=True).print(Text("\n".join(f"wrote {run.report}" for run in found)), soft_wrap=True)


config_command(app, [FeaturesConfig], run, help=__doc__)


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()

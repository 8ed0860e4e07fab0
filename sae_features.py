"""`sae-features`: what the SAE's latents mean: density, layer profile, top contexts, promoted tokens, an HTML report."""

from pipeline.errors import importing_quietly

with importing_quietly():
    import typer
    from rich.console import Console

    from pipeline.cli import config_command, run_app
    from pipeline.features import FeaturesConfig, explore_features

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def run(features: FeaturesConfig) -> None:
    explore_features(features, Console())


config_command(app, [FeaturesConfig], run, help=__doc__)


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()

"""`cache-acts`: stage one, run the model once and store (layer, activation) pairs."""

from pipeline.errors import importing_quietly

with importing_quietly():
    import typer
    from rich.console import Console

    from pipeline.cache import CacheConfig, cache_activations
    from pipeline.cli import config_command, run_app
    from pipeline.corpus import CorpusConfig

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def run(cache: CacheConfig, corpus: CorpusConfig) -> None:
    cache_activations(cache, corpus, console=Console(stderr=True))


config_command(app, [CacheConfig, CorpusConfig], run, help=__doc__)


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()

"""`cache-acts`: stage one, run the model once and store (layer, activation) pairs."""

from pipeline.errors import importing_quietly

with importing_quietly():
    import typer
    from rich.console import Console
    from rich.text import Text

    from pipeline.cache import CacheConfig, cache_activations
    from pipeline.cli import config_command, run_app
    from pipeline.corpus import CorpusConfig

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def run(cache: CacheConfig, corpus: CorpusConfig) -> None:
    console = Console(stderr=True)
    report = cache_activations(cache, corpus, console=console)
    if not report.n_model_tokens:  # the store already held the pairs asked for, and cache_activations said so
        return
    console.print(Text(  # text: the store's path may hold brackets or :codes:
        f"stored {report.n_pairs_written:,} pairs in {report.seconds:.1f} s "
        f"({report.model_tokens_per_s:,.0f} model tokens/s); {report.out} holds {report.n_pairs_total:,} pairs"
    ), soft_wrap=True)


config_command(app, [CacheConfig, CorpusConfig], run, help=__doc__)


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()

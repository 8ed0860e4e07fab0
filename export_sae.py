"""`export-sae`: the SAE at each hidden state as a standard TopK SAE in SAELens's or sparsify's files, for their tools."""

from pipeline.errors import importing_quietly

with importing_quietly():
    import typer
    from rich.console import Console
    from rich.text import Text

    from pipeline.cli import config_command, run_app
    from pipeline.export import ExportConfig, export_layers

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
LOADERS = {  # how each format's library loads one folder (saelens) or all of them (sparsify)
    "saelens": "from sae_lens import SAE; SAE.load_from_disk('{folder}')",
    "sparsify": "from sparsify import SparseCoder; SparseCoder.load_many('{out}', local=True)",
}


def run(config: ExportConfig) -> None:
    folders = export_layers(config)
    lines = [f"wrote {folder}" for folder in folders]
    lines.append("load with: " + LOADERS[config.format].format(folder=folders[0], out=folders[0].parent))
    Console().print(Text("\n".join(lines)), soft_wrap=True)


config_command(app, [ExportConfig], run, help=__doc__)


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()

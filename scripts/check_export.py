"""Loads an SAE's export with SAELens and sparsify themselves and compares them with the SAE on held-out rows of its
store: the latents each fires on every row, and the reconstructions (docs/FORMAT.md, "Exported SAEs").

Usage, where both are installed (pip install sae-lens eai-sparsify; neither is a dependency of this package):
    python scripts/check_export.py --sae runs/k32 --layers 0,12,24
"""

import tempfile
from pathlib import Path

import torch
import typer
from rich.console import Console
from rich.table import Table

from pipeline.cli import print_error
from pipeline.errors import CrosscodersError
from pipeline.evaluate import store_of_run
from pipeline.export import ExportConfig, export_layers
from pipeline.sae import load
from pipeline.train import run_data

ROWS = 500  # held-out rows per hidden state at most


def held_out_rows(store, layer: int) -> torch.Tensor:
    """Up to ROWS held-out rows of hidden state `layer`, from the first shards holding any: [n, d_model]."""
    found = []
    for shard in store.shards:
        layers = store.read(shard, "val/layer")
        if (layers == layer).any():
            found.append(store.read_acts(shard, "val").float()[torch.from_numpy(layers == layer)])
        if sum(map(len, found)) >= ROWS:
            break
    return torch.cat(found)[:ROWS] if found else torch.zeros(0, store.d_model)


@torch.no_grad()
def main(sae: str = typer.Option(..., help="Training run folder (or its checkpoint/)."),
         layers: str = typer.Option("0,12", help="Hidden states to export and check.")):
    from sae_lens import SAE
    from sparsify import SparseCoder

    try:
        ours = load(sae)
        store = store_of_run(Path(sae), None, run_data(Path(sae)))
        with tempfile.TemporaryDirectory() as folder:
            exported = {fmt: export_layers(ExportConfig(sae=sae, layers=layers, format=fmt, out=f"{folder}/{fmt}"))
                        for fmt in ("saelens", "sparsify")}
            coders = SparseCoder.load_many(f"{folder}/sparsify", local=True)
            table = Table("hidden state", "rows", "library", "same latents on every row", "relative error of x_hat")
            for saelens_folder, sparsify_folder in zip(exported["saelens"], exported["sparsify"]):  # the same layers
                saelens, coder = SAE.load_from_disk(saelens_folder), coders[sparsify_folder.name]
                layer = saelens.cfg.metadata.crosscoders["hidden_state"]
                x = held_out_rows(store, layer)
                if not len(x):
                    continue
                values, indices = ours.encode(x, layer)
                fired = torch.zeros(len(x), ours.cfg.n_latents).scatter(1, indices, values) > 0
                x_hat = ours.decode(values, indices, layer)
                saelens_acts, code = saelens.encode(x), coder.encode(x)
                sparsify_acts = torch.zeros(len(x), ours.cfg.n_latents).scatter(1, code.top_indices, code.top_acts)
                results = {"sae-lens": (saelens_acts, saelens.decode(saelens_acts)),
                           "sparsify": (sparsify_acts, coder.decode(code.top_acts, code.top_indices))}
                for library, (acts, their_x_hat) in results.items():
                    error = float((their_x_hat - x_hat).norm() / x_hat.norm())
                    table.add_row(str(layer), f"{len(x):,}", library, str(bool(((acts > 0) == fired).all())), f"{error:.2e}")
        Console().print(table)
    except CrosscodersError as error:
        print_error(error)
        raise typer.Exit(2) from None


if __name__ == "__main__":
    typer.run(main)
